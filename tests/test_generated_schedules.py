"""Generated schedules never wreck a model: the output layer and layers below their rank floor are left out, each
with a reason that ``generated_exclusions`` returns."""
from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

from models import make_trained_like
from musco_core import Compressor, ModelStats, generate_model_compr_kwargs
from musco_core.config import RANK_FLOOR_FRACTION, generated_exclusions, output_layers, rank_floor


class LogSoftmaxNet(nn.Module):
    """A classifier that returns ``log_softmax`` of its logits, as many MNIST examples do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)


class ViewNet(nn.Module):
    """A head whose output the model reshapes before returning it (a view of the layer's output)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, 12)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))).view(-1, 3, 4)


def sequential_classifier():
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 32, 3, padding=1), relu=nn.ReLU(), flat=nn.Flatten(),
                                     fc1=nn.Linear(32 * 8 * 8, 64), relu2=nn.ReLU(), fc2=nn.Linear(64, 10)))


@pytest.mark.parametrize("build,x,expected", [
    (sequential_classifier, torch.randn(2, 1, 8, 8), ("fc2",)),
    (LogSoftmaxNet, torch.randn(2, 1, 8, 8), ("fc2",)),
    (ViewNet, torch.randn(2, 16), ("head",)),
], ids=["returned", "log_softmax", "view"])
def test_the_output_layer_is_found_on_the_example_input(registry, build, x, expected):
    stats = ModelStats.from_model(build().eval(), registry, x)
    assert stats.output_layers == expected
    assert list(output_layers(stats)) == list(expected)


def test_hugging_face_outputs_are_searched_and_an_encoder_has_no_output_layer(registry):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    inputs = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))}
    classifier = ModelStats.from_model(BertForSequenceClassification(config).eval(), registry, inputs)
    assert classifier.output_layers == ("classifier",)  # the logits of a ModelOutput
    encoder = ModelStats.from_model(BertModel(config, add_pooling_layer=False).eval(), registry, inputs)
    assert encoder.output_layers == ()  # last_hidden_state comes from a LayerNorm, no Linear layer
    config_ = generate_model_compr_kwargs(encoder, "vbmf", registry=registry)
    assert all(entry is not None for entry in config_.values()), generated_exclusions(encoder, "vbmf",
                                                                                       registry=registry)


def test_without_an_example_input_a_final_linear_layer_counts_as_the_output_layer(registry):
    stats = ModelStats.from_model(sequential_classifier(), registry)
    assert stats.output_layers is None
    reasons = output_layers(stats)
    assert list(reasons) == ["fc2"] and "no example input" in reasons["fc2"]
    conv_last = ModelStats.from_model(nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (8, 1, 1)),
                                                    nn.Conv2d(8, 8, 1)), registry)
    assert output_layers(conv_last) == {}


@pytest.mark.parametrize("kind", ["vbmf", "param_reduction", "budget"])
def test_generated_schedules_leave_out_the_output_layer_with_a_reason(registry, kind):
    stats = ModelStats.from_model(LogSoftmaxNet().eval(), registry, torch.randn(1, 1, 8, 8))
    config = generate_model_compr_kwargs(stats, kind, registry=registry)
    reasons = generated_exclusions(stats, kind, registry=registry)
    assert config["fc2"] is None and config["fc1"] is not None
    assert list(reasons) == [name for name, entry in config.items() if entry is None] == ["conv", "fc2"]
    assert reasons["fc2"].startswith("output layer (the model returns its output)")
    assert "(8, 1)" in reasons["conv"] and "would not reduce its 288 weights" in reasons["conv"]  # even at r_in 1


@pytest.mark.parametrize("kind", ["vbmf", "param_reduction", "budget"])
def test_generated_schedules_take_a_stem_whose_rank_floor_is_its_channel_count(registry, kind):
    """A 3 -> 32 3x3 stem was left out ("dimensions (32, 3) are not above tucker2's minimum rank 8", or "ranks (68,
    8) would exceed the layer's dimensions"), though ranks (8, 3) shrink it from 864 to 481 weights."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    stats = ModelStats.from_model(model, registry, torch.randn(1, 3, 8, 8))
    assert generate_model_compr_kwargs(stats, kind, registry=registry)["0"]["decomposition"] == "tucker2"
    assert rank_floor(registry.decompositions.get("tucker2"), stats.layers["0"].spec) == (8, 3)


@pytest.mark.parametrize("kind", ["none", "template"])
def test_schedules_that_compress_nothing_by_design_list_no_exclusions(registry, kind):
    stats = ModelStats.from_model(LogSoftmaxNet().eval(), registry, torch.randn(1, 1, 8, 8))
    assert generated_exclusions(stats, kind, registry=registry) == {}


def test_rank_floor(registry):
    svd, tucker2 = registry.decompositions.get("svd"), registry.decompositions.get("tucker2")
    spec_of = lambda module: registry.adapter_for(module).read(module)[0]  # noqa: E731
    assert RANK_FLOOR_FRACTION == 1 / 16
    assert rank_floor(svd, spec_of(nn.Linear(1024, 512))) == (32,)  # 512 / 16
    assert rank_floor(svd, spec_of(nn.Linear(64, 32))) == (2,)  # svd's minimum rank
    assert rank_floor(svd, spec_of(nn.Linear(512, 10)), output_layer=True) == (10,)  # the class count
    assert rank_floor(svd, spec_of(nn.Linear(4, 10)), output_layer=True) == (4,)  # but never above the full rank
    assert rank_floor(tucker2, spec_of(nn.Conv2d(256, 512, 3))) == (32, 16)  # (r_out, r_in)
    assert rank_floor(tucker2, spec_of(nn.Conv2d(32, 64, 3))) == (8, 8)  # tucker2's minimum rank


def test_a_layer_that_does_not_shrink_at_its_rank_floor_is_left_out(registry):
    model = nn.Sequential(OrderedDict(wide=nn.Linear(64, 64), relu=nn.ReLU(), tiny=nn.Linear(64, 4),
                                      relu2=nn.ReLU(), square=nn.Linear(4, 4), out=nn.Linear(4, 64)))
    stats = ModelStats.from_model(model, registry, torch.randn(2, 64))
    reasons = generated_exclusions(stats, "vbmf", registry=registry)
    assert set(reasons) == {"square", "out"}
    assert reasons["square"] == "at its rank floor (2,) svd would not reduce its 16 weights"


def test_a_generated_vbmf_schedule_keeps_a_trained_classifier_intact(registry):
    """The issue's failure: vbmf cut a 10-way classifier to rank 2; generated schedules now leave it alone."""
    model = make_trained_like(LogSoftmaxNet()).eval()
    compressor = Compressor(model, example_input=torch.randn(1, 1, 8, 8), config_type="vbmf", progress=False,
                            registry=registry)
    assert compressor.lnames == ["fc1"]
    compressor.compression_step()
    head = compressor.compressed_model.fc2
    assert isinstance(head, nn.Linear) and torch.equal(head.weight, model.fc2.weight)


def test_the_report_lists_every_layer_left_out_and_why(tmp_path, registry):
    from musco_core.io import read_report, save_compressed

    class Hooked(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), Hooked(64, 64), nn.ReLU(), nn.Linear(64, 10))
    compressor = Compressor(model, config_type="vbmf", example_input=torch.randn(1, 3, 8, 8), progress=False,
                            registry=registry)
    left_out = compressor.report().left_out
    assert "output layer" in left_out["8"] and "Hooked.forward" in left_out["6"]
    table = compressor.report().to_table()
    assert "left out (" in table and "  8: output layer" in table
    compressor.compression_step()
    save_compressed(compressor, tmp_path / "out")
    assert read_report(tmp_path / "out").left_out == left_out
    compressor.save_state(tmp_path / "ckpt")
    assert Compressor.resume(model, tmp_path / "ckpt", example_input=torch.randn(1, 3, 8, 8),
                             registry=registry).report().left_out == left_out


class Interleaved(nn.Module):
    """Layers a generated schedule leaves out for the layer's own sake (stem, head) between layers that must not be
    replaced (unused: never reached; up: no adapter)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)  # 1 channel: tucker2 at its floor (8, 1) would not shrink it
        self.unused = nn.Conv2d(32, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 32, 3, padding=1)
        self.body = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(self.up(self.stem(x).relu()).relu()).mean((2, 3)))


def test_exclusions_are_listed_in_model_order(registry):
    """Generated exclusions and the report's left_out interleave the layers that must not be replaced with the
    others as the model holds them, also where given statistics get the model's exclusions added."""
    model, x = Interleaved().eval(), torch.randn(1, 1, 6, 6)
    expected = ["stem", "unused", "up", "head"]
    assert list(generated_exclusions(ModelStats.from_model(model, registry, x), "vbmf", registry=registry)) == expected
    for given in (None, ModelStats.from_model(model, registry)):  # the latter without the example input
        compressor = Compressor(model, given, config_type="vbmf", example_input=x, progress=False, registry=registry)
        assert list(compressor.report().left_out) == expected and compressor.lnames == ["body"]
        assert compressor.model_stats.order == ("stem", "unused", "up", "body", "head")


class Decoder(nn.Module):
    """Convolution and linear layers no adapter handles, next to modules that are no layers to compress."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.norm = nn.BatchNorm2d(32)
        self.up = nn.ConvTranspose2d(32, 32, 3, stride=2, padding=1, output_padding=1)
        self.pair = nn.Bilinear(32, 32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens):
        x = self.embed(tokens).permute(0, 3, 1, 2)  # B x 16 x H x W
        x = self.up(torch.relu(self.norm(self.conv(x)))).mean((2, 3))
        return self.head(self.pair(x, x))


@pytest.mark.parametrize("example", [True, False])
def test_convolution_and_linear_layers_no_adapter_handles_are_left_out_with_the_reason(registry, caplog, example):
    # a ConvTranspose2d used to be neither compressed nor named in left_out, generated_exclusions or the log
    model, x = Decoder().eval(), torch.randint(0, 10, (1, 4, 4))
    compressor = Compressor(model, config_type="vbmf", example_input=x if example else None, progress=False,
                            registry=registry)
    left_out = compressor.report().left_out
    known = ", ".join(registry.adapters.names())
    assert left_out["up"] == f"no adapter handles ConvTranspose2d; known adapters: {known}"
    assert left_out["pair"].startswith("no adapter handles Bilinear; ")
    assert not {"embed", "norm"} & set(left_out) and compressor.lnames == ["conv"]  # head: the output layer
    with caplog.at_level(logging.INFO, logger="musco_core.config"):
        exclusions = generated_exclusions(compressor.model_stats, "param_reduction", registry=registry)
    assert exclusions["up"] == left_out["up"]
    assert any("'up' left out: no adapter handles ConvTranspose2d" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("kind", ["vbmf", "param_reduction", "budget"])
def test_grouped_convolutions_are_scheduled_group_by_group_and_depthwise_ones_left_out_with_why(registry, kind):
    # every grouped conv was left out as a bare "grouped convolution", though one of 2 groups shrinks like any conv
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1, groups=2),
                          nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Conv2d(64, 64, 3, padding=1, groups=32),
                          nn.Flatten(), nn.Linear(64 * 16, 10)).eval()
    stats = ModelStats.from_model(model, registry, torch.randn(1, 3, 4, 4))
    config, reasons = generate_model_compr_kwargs(stats, kind), generated_exclusions(stats, kind)
    assert config["1"] is not None and "1" not in reasons
    assert config["2"] is None and reasons["2"].startswith("depthwise convolution: each of its 64 groups has one "
                                                           "input channel, which tucker2 cannot make smaller")
    assert config["3"] is None and reasons["3"].startswith("grouped convolution, decomposed group by group: for "
                                                           "each of its 32 groups (2 -> 2 channels) ")


def test_a_depthwise_convolutions_reason_is_true_cp4_shrinks_its_kernels(registry):
    # the reason said "which no decomposition makes smaller", yet cp4 at rank 1 shrinks each 5x5 kernel to its
    # separable part: EfficientNet-Lite0's block-4 depthwise conv went from 6,000 to 2,880 weights, applied unforced
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 5, padding=2, groups=16),
                          nn.Conv2d(16, 16, 1, groups=16), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    reasons = generated_exclusions(ModelStats.from_model(model, registry, x), "vbmf")
    assert "no decomposition" not in reasons["1"] and "tucker2 cannot make smaller (cp4" in reasons["1"]
    assert reasons["2"].endswith("which svd cannot make smaller")  # a 1x1 kernel has nothing to factorize
    compressor = Compressor(model, model_compr_kwargs={"1": {"decomposition": "cp4", "rank_selection": "manual",
                                                             "manual_rank": [1]}}, example_input=x, progress=False)
    (result,) = compressor.compression_step()
    assert result.applied and (result.params_before, result.params_after) == (400, 192)
