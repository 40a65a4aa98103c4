"""Model statistics: exact per-layer counts on the example input, and no side effects on the model."""
from __future__ import annotations

import attrs
import pytest
import torch
from flopco import FlopCo
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import resnet18
from musco_core import Compressor, ConfigError, LayerSpec, LayerStats, ModelStats


class Mixed(nn.Module):
    """Grouped conv, Conv1d, Linear on a 3-D input and a functional call FlopCo cannot see."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.temporal = nn.Conv1d(16, 12, 3, stride=2)
        self.proj = nn.Linear(12, 20)
        self.extra = nn.Parameter(torch.randn(20, 20))

    def forward(self, x):
        y = self.bn(self.grouped(x))                      # B x 16 x 6 x 6
        y = self.temporal(y.flatten(2))                   # B x 12 x 17
        y = self.proj(y.transpose(1, 2))                  # B x 17 x 20
        return nn.functional.linear(y, self.extra)       # functional: only the total sees it


def test_per_layer_macs_match_torch_flop_counter_and_respect_the_batch(registry):
    model, x = Mixed(), torch.randn(3, 8, 6, 6)
    stats = ModelStats.from_model(model, registry, x, count_flops=True)
    assert set(stats.layers) == {"grouped", "temporal", "proj"}
    assert stats.layers["grouped"].macs == 3 * 16 * (8 // 4) * 9 * 36
    assert stats.layers["temporal"].macs == 3 * 12 * 16 * 3 * 17
    assert stats.layers["proj"].macs == 3 * 17 * 12 * 20
    assert stats.layers["proj"].input_shape == (3, 17, 12)
    with FlopCounterMode(display=False) as counter:
        model(x)
    per_module = {name.split(".", 1)[1]: sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                  if name.startswith("Mixed.")}
    for name, layer in stats.layers.items():
        assert 2 * layer.macs == per_module[name], name
    assert stats.total_flops == counter.get_total_flops()
    assert stats.total_flops > 2 * stats.total_macs  # the functional linear is in the total only


def test_a_conv_on_an_unbatched_input_counts_its_macs_once(registry):
    # torch runs a conv on (C, H, W): its channels were taken for the batch, and the report said 18,874,368 MACs
    # for a layer that runs 589,824 (its row) and 3,547,136 for a model that runs 892,928 (the totals)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(16, 8, 8)
    stats = ModelStats.from_model(model, registry, x)
    assert {name: layer.macs for name, layer in stats.layers.items()} == {"0": 64 * 32 * 16 * 9, "2": 64 * 32 * 32 * 9}
    compressor = Compressor(model, stats, {"2": {"decomposition": "tucker2", "rank_selection": "manual",
                                                 "manual_rank": [[8, 8]]}}, example_input=x, progress=False)
    row = compressor.compression_step()[0]
    assert (row.macs_before, row.macs_after) == (64 * 32 * 32 * 9, 64 * (32 * 8 + 8 * 8 * 9 + 8 * 32))
    report = compressor.report()
    assert (report.macs_before, report.macs_after) == (stats.layers["0"].macs + row.macs_before,
                                                       stats.layers["0"].macs + row.macs_after)


def test_a_layer_without_outputs_counts_no_macs():
    """Found by fuzzing: a zero-width Linear layer (torch runs it) made every report raise ZeroDivisionError, as
    its output positions were its output's numel divided by its 0 channels."""
    assert LayerStats("fc", nn.Linear, LayerSpec("linear", 0, 4), (2, 4), (2, 0)).macs == 0
    assert LayerStats("fc", nn.Linear, LayerSpec("linear", 8, 4), (2, 3, 4), (2, 3, 8)).macs == 2 * 3 * 8 * 4


@pytest.mark.parametrize("x", [torch.randn(0, 16), torch.randn(2, 0, 16)], ids=["empty-batch", "empty-sequence"])
def test_layers_whose_output_on_the_example_input_is_empty_are_left_out_with_the_reason(registry, x):
    """Found by fuzzing: on an empty batch every layer ran 0 MACs, so every step kept every layer ('would not be
    smaller (480 vs 1024 weights, 0 vs 0 MACs)'); a zero-width layer made every report raise ZeroDivisionError."""
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 0), nn.Linear(0, 4))
    stats = ModelStats.from_model(model, registry, x)
    assert not stats.layers and all("has no values" in reason for reason in stats.excluded.values())
    assert Compressor(model, example_input=x, config_type="param_reduction", progress=False).report().left_out == \
        stats.excluded
    schedule = {"0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}}
    with pytest.raises(ConfigError, match=r'\$\.layers\["0"\]: cannot be compressed: its output on the example input '
                                          r'has no values'):
        Compressor(model, example_input=x, model_compr_kwargs=schedule, progress=False)


def test_whole_forward_flops_are_counted_only_when_asked(registry):
    """FlopCounterMode's first use imports torch._dynamo (seconds): the default pass counts layer MACs only."""
    model, x = Mixed(), torch.randn(3, 8, 6, 6)
    plain, counted = ModelStats.from_model(model, registry, x), ModelStats.from_model(model, registry, x,
                                                                                      count_flops=True)
    assert plain.total_flops is None and counted.total_flops > 0
    assert plain.total_macs == counted.total_macs == sum(layer.macs for layer in plain.layers.values())
    assert ModelStats.from_model(model, registry, count_flops=True).total_flops is None  # no example input


class ByKeyword(nn.Module):
    """Calls its layers as ``layer(input=x)`` (or positionally, for comparison)."""

    def __init__(self, keyword: bool):
        super().__init__()
        self.keyword = keyword
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        call = (lambda layer, value: layer(input=value)) if self.keyword else (lambda layer, value: layer(value))
        return call(self.fc, call(self.conv, x).relu().mean((2, 3)))


def test_layers_called_by_keyword_get_the_statistics_of_positional_calls(registry):
    """Shapes, MACs and the output layer (which a generated schedule leaves out) do not depend on how the model's
    code passes a layer its input."""
    x = torch.randn(2, 8, 6, 6)
    by_keyword, positional = (ModelStats.from_model(ByKeyword(keyword), registry, x) for keyword in (True, False))
    assert by_keyword == positional
    assert by_keyword.layers["conv"].input_shape == (2, 8, 6, 6) and by_keyword.layers["fc"].macs == 2 * 16 * 10
    assert by_keyword.total_macs == positional.total_macs and by_keyword.output_layers == ("fc",)


def test_statistics_leave_the_model_as_it_was(registry):
    model = Mixed().train()
    model.temporal.eval()
    calls = []
    model.proj.register_forward_hook(lambda *args: calls.append("hook"))
    running_mean = model.bn.running_mean.clone()
    ModelStats.from_model(model, registry, torch.randn(2, 8, 6, 6), count_flops=True)
    assert torch.equal(model.bn.running_mean, running_mean) and model.bn.num_batches_tracked == 0
    assert model.training and model.bn.training and not model.temporal.training
    assert calls == ["hook"]  # the user's hook ran during the pass and is still registered
    model(torch.randn(2, 8, 6, 6))
    assert calls == ["hook", "hook"]


class SelfScaling(nn.Module):
    """Halves its layer's weight in place on its first call in eval mode, as RWKV does (see test_transformers)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scaled = False

    def forward(self, x):
        if not self.training and not self.scaled:
            with torch.no_grad():
                self.fc.weight.div_(2)
            self.scaled = True
        return self.fc(x) * 2


def test_a_forward_changing_the_models_parameters_is_refused_but_not_a_lazy_or_inference_mode_model(registry):
    with pytest.raises(ConfigError, match=r"SelfScaling changed its parameter fc\.weight in place when musco-core "
                                          r"ran it on the example input"):
        ModelStats.from_model(SelfScaling(), registry, torch.randn(2, 4))
    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))
    assert "2" in ModelStats.from_model(lazy, registry, torch.randn(2, 5)).layers  # not refused
    with torch.inference_mode():  # its tensors have no version counter to read
        made_there = nn.Sequential(nn.Linear(5, 4))
    assert "0" in ModelStats.from_model(made_there, registry, torch.randn(2, 5)).layers


def test_flopco_statistics_are_accepted_and_agree(registry):
    model = resnet18(num_classes=10, width=16).eval()  # FlopCo runs the model in its current mode
    ours = ModelStats.from_model(model, registry, torch.randn(1, 3, 32, 32))
    theirs = ModelStats.from_flopco(FlopCo(model, img_size=(1, 3, 32, 32)))
    assert list(theirs.layers) == list(ours.layers)
    for name, layer in ours.layers.items():
        assert theirs.layers[name].spec.kernel_size == layer.spec.kernel_size
        assert theirs.layers[name].macs == layer.macs, name
    assert ours.ltypes["layer1.0.conv1"] == {"type": nn.Conv2d, "kernel_size": (3, 3), "groups": 1}


class Shared(nn.Module):
    """A conv applied at two resolutions (a feature pyramid's shared head) and a Linear called twice per forward."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        small = nn.functional.avg_pool2d(x, 2)
        y = self.head(x).mean((2, 3)) + self.head(small).mean((2, 3))
        return self.fc(self.fc(y))


def test_a_layer_called_more_than_once_costs_its_macs_at_every_call(registry):
    # only the first call was counted: the report and a flops budget saw 10,400 of the 13,024 MACs the model runs
    model, x = Shared(), torch.randn(2, 4, 6, 6)
    stats = ModelStats.from_model(model, registry, x)
    head = stats.layers["head"]
    assert head.input_shape == (2, 4, 6, 6)  # the first call's
    assert head.calls == (((2, 4, 6, 6), (2, 4, 6, 6), 1), ((2, 4, 3, 3), (2, 4, 3, 3), 1))
    assert head.macs == 2 * (36 + 9) * 4 * 4 * 9
    assert stats.layers["fc"].calls == (((2, 4), (2, 4), 2),) and stats.layers["fc"].macs == 2 * 2 * 4 * 4
    assert stats.total_macs == 13024
    flopco = ModelStats.from_flopco(FlopCo(model, img_size=(2, 4, 6, 6)))
    assert {name: layer.macs for name, layer in flopco.layers.items()} == {"head": head.macs, "fc": 64}
    one_call = ModelStats({"fc": attrs.evolve(stats.layers["fc"], calls=(((2, 4), (2, 4), 1),))})
    with pytest.raises(ConfigError, match="layer 'fc': calls"):  # statistics that miss a call are not the model's
        Compressor(model, one_call, {"fc": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [2]}},
                   example_input=x, progress=False, registry=registry)


def small_net(width: int = 16, kernel: int = 3, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, kernel, stride=stride, padding=kernel // 2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


SCHEDULE = {"2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[8, 8]]}}


@pytest.mark.parametrize(("stats", "differences"), [
    (lambda reg, x: ModelStats.from_model(small_net(8, 5), reg, x),
     ["layer '0': out_channels 8 where the model has 16", "kernel_size (5, 5) where the model has (3, 3)"]),
    (lambda reg, x: ModelStats.from_model(small_net(stride=2), reg, x), ["layer '2': stride (2, 2) where"]),
    (lambda reg, x: ModelStats.from_model(small_net(), reg, torch.randn(1, 3, 16, 16)),
     ["layer '0': input_shape (1, 3, 16, 16) where the model has (1, 3, 8, 8)"]),
    (lambda reg, x: ModelStats.from_model(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)), reg),
     ["layer '0': adapter linear where the model has conv;", "layer '1': a ReLU in the model, which no adapter reads"]),
    (lambda reg, x: ModelStats.from_model(nn.Sequential(*small_net(), nn.Linear(10, 2)), reg, x),
     ["layer '7': no such module in the model"]),
    (lambda reg, x: FlopCo(small_net(8), img_size=(1, 3, 8, 8)), ["layer '2': out_channels 8 where"])])
def test_statistics_of_another_model_or_input_are_refused_naming_the_layers(registry, stats, differences):
    # the report used to state their MACs: 5.07x where the model's own gave 6.35x
    model, x = small_net(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="model_stats do not describe the model: layer ") as info:
        Compressor(model, stats(registry, x), SCHEDULE, example_input=x, progress=False, registry=registry)
    assert all(difference in str(info.value) for difference in differences), str(info.value)
    assert str(info.value).endswith("or none to have them computed")


def test_statistics_of_the_model_itself_are_accepted_with_or_without_an_example_input(registry):
    model, x = small_net(), torch.randn(1, 3, 8, 8)
    for stats, example in [(FlopCo(model, img_size=(1, 3, 8, 8)), x), (FlopCo(model, img_size=(1, 3, 8, 8)), None),
                           (ModelStats.from_model(model, registry, x), x), (ModelStats.from_model(model, registry), x),
                           (FlopCo(model, img_size=(1, 3, 16, 16)), None)]:  # no example input: no shapes to hold
        compressor = Compressor(model, stats, SCHEDULE, example_input=example, progress=False, registry=registry)
        assert compressor.compression_step()[0].applied


def test_a_run_leaves_no_global_module_hook_state_behind():
    # torch.compile warns, and every later module call pays, while any of torch's global hook tables holds an entry
    from torch.nn.modules import module as torch_module
    tables = [value for name, value in vars(torch_module).items() if name.startswith("_global_") and
              isinstance(value, dict)]
    assert tables and not any(tables)

    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(32, 64, 3), nn.Linear(64 * 6 * 6, 10)

        def forward(self, x):
            return self.fc(input=self.conv(input=x).relu().flatten(1))

    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    compressor = Compressor(ByKeyword(), example_input=x, config_type="param_reduction", progress=False)
    while not compressor.done:
        compressor.compression_step()
    assert any(ranks is not None for ranks in compressor.ranks.values())
    assert not any(tables), [table for table in tables if table]
