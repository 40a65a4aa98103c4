"""The checks before a step commits: the whole-model check (a layer the model uses other than by calling it, through
a plain list, by its type or attributes, is kept as it is with the reason, the step's other layers are compressed,
and the model computes what it computed), and the checks of the plugins on each layer (an adapter that does not
reproduce the layer it claims, or builds in another dtype or device, and a decomposer that writes to its input are
refused naming the plugin, the model left as it was)."""
from __future__ import annotations

import logging
import types
from typing import NamedTuple

import pytest
import torch
from torch import nn

from musco_core import Compressor, ConfigError, FactorizedLayer, compress_blockwise, hookimpl
from musco_core.errors import CompressionError
from musco_core.io import load_compressed, read_manifest
from musco_core.plugins import make_plugin_manager
from musco_core.registry import Registry
from musco_core.surgery import module_paths
from musco_core.verify import seeded_output, unfaithful_swaps
from musco_plugins.adapters import LinearAdapter
from musco_plugins.svd import SVD


def manual(rank: int) -> dict:
    return {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [rank]}


class Listed(nn.Module):
    """Calls ``fc1`` through a plain list the swap cannot update."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)
        self.order = [self.fc1]

    def forward(self, x):
        return self.fc2(torch.relu(self.order[0](x)))


class ReadsAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.other = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.other(self.proj(x)) * self.proj.out_features


class BranchesOnType(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.other = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = self.proj(x)
        if isinstance(self.proj, nn.Linear):
            h = torch.relu(h)
        return self.other(h)


class BranchesOnEither(nn.Module):
    """Each layer swapped alone leaves the branch as it was; both together change it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = self.b(self.a(x))
        return torch.relu(h) if isinstance(self.a, nn.Linear) or isinstance(self.b, nn.Linear) else h


class Noisy(nn.Module):
    """Random in eval mode too: the check runs both passes with the same seed."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.fc2(self.fc1(x) + torch.randn_like(x))


def compress(model: nn.Module, layers: dict, example_input: torch.Tensor | None) -> Compressor:
    compressor = Compressor(model, example_input=example_input, model_compr_kwargs=layers, ft_every=len(layers),
                            progress=False)
    compressor.compression_step()
    assert compressor.done
    return compressor


@pytest.mark.parametrize(("model_type", "kept", "compressed", "reason"), [
    (Listed, "fc1", "fc2", "still calls the original layer after the swap"),
    (ReadsAttribute, "proj", "other", "has no attribute 'out_features'"),
    (BranchesOnType, "proj", "other", "changes the output by"),
])
def test_a_layer_used_other_than_by_calling_it_is_kept_with_the_reason(model_type, kept, compressed, reason, caplog):
    torch.manual_seed(0)
    model = model_type().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    caplog.set_level(logging.WARNING, logger="musco_core.run")
    compressor = compress(model, {kept: manual(4), compressed: manual(4)}, x)
    result = {r.name: r for r in compressor.history}
    assert not result[kept].applied and reason in result[kept].note
    assert result[kept].params_after == result[kept].params_before and result[kept].relative_error is None
    assert result[kept].ranks is None  # the refused ranks used to stay, as if the layer had them
    assert result[compressed].applied
    out = compressor.compressed_model
    assert type(out.get_submodule(kept)) is nn.Linear and isinstance(out.get_submodule(compressed), FactorizedLayer)
    assert any(kept in record.getMessage() and reason in record.getMessage() for record in caplog.records)
    assert torch.equal(out.get_submodule(kept).weight, model.get_submodule(kept).weight)
    with torch.no_grad():
        assert out(x).shape == expected.shape


def test_layers_that_fail_only_together_are_both_kept():
    torch.manual_seed(0)
    model = BranchesOnEither().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    compressor = compress(model, {"a": manual(8), "b": manual(8)}, x)
    assert [r.applied for r in compressor.history] == [False, False]
    assert all("with the step's other replacements" in r.note for r in compressor.history)
    with torch.no_grad():
        torch.testing.assert_close(compressor.compressed_model(x), expected)


def test_a_model_that_only_calls_its_layers_is_compressed_and_random_ops_do_not_count():
    torch.manual_seed(0)
    model = Noisy().eval()
    x = torch.randn(4, 32)
    compressor = compress(model, {"fc1": manual(4), "fc2": manual(4)}, x)
    assert all(r.applied for r in compressor.history)
    swaps = {"fc1": (model.fc1, nn.Linear(32, 32))}
    before = torch.random.get_rng_state()
    assert unfaithful_swaps(model, swaps, module_paths(model), x) == {}
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is left as it was


def test_the_check_runs_on_the_first_calibration_batch_without_an_example_input():
    torch.manual_seed(0)
    model = Listed().eval()
    batches = [torch.randn(4, 32) for _ in range(2)]
    compressor = Compressor(model, model_compr_kwargs={
        "version": 1, "layers": {"fc1": {"decomposition": "whitened_svd", "rank_selection": "manual",
                                         "manual_rank": [4]}}}, calibration_data=batches, progress=False)
    compressor.compression_step()
    assert not compressor.history[0].applied and "still calls the original layer" in compressor.history[0].note


def test_a_step_with_nothing_to_run_the_check_on_says_so_in_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="musco_core.run")
    compressor = Compressor(BranchesOnType().eval(), model_compr_kwargs={
        "proj": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}}, progress=False)
    compressor.compression_step()
    assert compressor.history[0].applied  # unchecked: nothing tells the branch on its type
    assert any("replacements are not checked in the whole model" in record.getMessage()
               for record in caplog.records if record.levelno == logging.WARNING)


def test_the_checked_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = BranchesOnType().train()
    x = torch.randn(4, 32)
    proj = model.proj
    problems = unfaithful_swaps(model, {"proj": (proj, nn.Sequential(nn.Linear(32, 32)))}, module_paths(model), x)
    assert "changes the output by" in problems["proj"]
    assert model.proj is proj and model.training and model.proj.training
    assert not proj._forward_hooks and not proj._forward_pre_hooks


class TwoBlocks(nn.Module):
    """Two blocks of one type, ``first`` then ``second``, for blockwise compression."""

    def __init__(self, block: type[nn.Module]):
        super().__init__()
        self.first, self.second = block(), block()

    def forward(self, x):
        return self.second(self.first(x))


def test_blockwise_compression_keeps_a_layer_its_block_uses_through_a_list(tmp_path):
    torch.manual_seed(0)
    model = TwoBlocks(Listed).eval()  # the first calls its fc1 through a plain list
    data = [torch.randn(4, 32) for _ in range(2)]
    plan = {"version": 1, "settings": {"ft_every": 2},
            "layers": {"first.fc1": manual(4), "first.fc2": manual(4)}}
    report = compress_blockwise(model, plan, ["first", "second"], tmp_path / "out", calibration_data=data,
                                progress=False)
    result = {r.name: r for r in report.layers}
    assert not result["first.fc1"].applied and "still calls the original layer" in result["first.fc1"].note
    assert result["first.fc2"].applied
    assert set(read_manifest(tmp_path / "out")) == {"first.fc2"}


class ReadsWeight(nn.Module):
    """Reads ``fc2.weight`` in its forward, as T5's ``DenseReluDense`` reads ``wo.weight.dtype``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).to(self.fc2.weight.dtype)
        return torch.relu(self.fc3(torch.relu(self.fc2(h))))


def test_blockwise_sequential_calibration_keeps_a_layer_its_block_reads_the_weight_of_before_calibrating_on(tmp_path):
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(16, 32, generator=generator) for _ in range(2)]
    whitened = {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [6]}

    def blockwise(layers, folder):
        torch.manual_seed(0)
        plan = {"version": 1, "settings": {"ft_every": len(layers)}, "layers": dict.fromkeys(layers, whitened)}
        report = compress_blockwise(TwoBlocks(ReadsWeight).eval(), plan, ["first", "second"], tmp_path / folder,
                                    calibration_data=data, progress=False)
        torch.manual_seed(0)
        return report, load_compressed(TwoBlocks(ReadsWeight), tmp_path / folder).state_dict()

    (report, got), (_, expected) = (blockwise(["first.fc1", "first.fc2", "first.fc3", "second.fc1"], "all"),
                                    blockwise(["first.fc1", "first.fc3", "second.fc1"], "without"))
    result = {r.name: r for r in report.layers}
    assert [r.applied for r in report.layers] == [True, False, True, True]
    assert "has no attribute 'weight'" in result["first.fc2"].note
    assert "uses the layer other than by calling it" in result["first.fc2"].note
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in expected)


class ChangesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        x.sub_(1.0)  # every call moves the caller's tensor
        return self.fc2(self.fc1(x))


class CountsCalls(nn.Module):
    """Keeps state across calls: two calls on the same input differ."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc2(self.fc1(x)) * self.calls


def test_a_model_that_changes_its_input_is_checked_on_a_copy_of_it():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    before = x.clone()
    compressor = compress(ChangesItsInput().eval(), {"fc1": manual(4), "fc2": manual(4)}, x)
    assert all(r.applied for r in compressor.history)
    assert torch.equal(x, before - 1.0)  # the statistics pass ran on it, and nothing else did


def test_a_model_whose_calls_differ_cannot_be_checked_and_is_compressed(caplog):
    torch.manual_seed(0)
    caplog.set_level(logging.INFO, logger="musco_core.verify")
    compressor = compress(CountsCalls().eval(), {"fc1": manual(4), "fc2": manual(4)}, torch.randn(4, 32))
    assert all(r.applied for r in compressor.history)
    assert any("cannot tell: two calls of the model on the same input differ" in record.getMessage()
               for record in caplog.records)


class ManyLayers(nn.Module):
    """32 layers, the 20th also held (and called) through a plain list."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(32))
        self.listed = [self.layers[19]]

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = torch.tanh(self.listed[0](x) if index == 19 else layer(x))
        return x


def test_one_culprit_among_many_layers_is_found_in_a_few_passes(monkeypatch):
    import musco_core.verify

    torch.manual_seed(0)
    model = ManyLayers().eval()
    swaps = {f"layers.{i}": (layer, nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 16)))
             for i, layer in enumerate(model.layers)}
    checks = []
    check = musco_core.verify._swap_problem
    monkeypatch.setattr(musco_core.verify, "_swap_problem", lambda *args: checks.append(1) or check(*args))
    problems = unfaithful_swaps(model, swaps, module_paths(model), torch.randn(2, 16))
    assert list(problems) == ["layers.19"] and "still calls the original layer" in problems["layers.19"]
    assert len(checks) <= 16  # one check per layer would take 34


class Pair(NamedTuple):
    left: torch.Tensor
    right: torch.Tensor


class ChangesItsArguments(nn.Module):
    def forward(self, pair, extra):
        pair.left.sub_(1.0)
        extra["scale"].mul_(2.0)
        return pair.left + pair.right * extra["scale"]


def test_checks_run_on_copies_of_every_tensor_of_the_input_named_tuples_and_mappings_too():
    pair, extra = Pair(torch.ones(3), torch.ones(3)), {"scale": torch.full((3,), 2.0)}
    first = seeded_output(ChangesItsArguments(), (pair, extra))
    assert torch.equal(first, seeded_output(ChangesItsArguments(), (pair, extra)))
    assert torch.equal(pair.left, torch.ones(3)) and torch.equal(extra["scale"], torch.full((3,), 2.0))


@pytest.mark.parametrize("convert", [torch.nn.Module.double, torch.nn.Module.half])
def test_a_model_that_fails_on_the_example_input_as_it_is_is_one_clear_error(convert):
    compressor = Compressor(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)),
                            example_input=torch.randn(2, 32), model_compr_kwargs={"0": manual(8), "2": manual(8)},
                            progress=False)
    compressor.compression_step()
    convert(compressor.compressed_model)  # fine-tuned in another precision; the example input stays float32
    before, state = dict(compressor.compressed_model.named_modules()), compressor.state
    with pytest.raises(ConfigError, match=r"^the model as it is \(before any replacement\) fails on the example "
                                          r"input: RuntimeError: .*; give an input it takes"):
        compressor.compression_step()
    assert dict(compressor.compressed_model.named_modules()) == before and compressor.state is state


# -- the plugins' contract on each layer -----------------------------------------------------------------------

def registry_with(plugin_name: str, **hooks: list[type]) -> Registry:
    module = types.ModuleType(plugin_name)
    for hook_name, components in hooks.items():
        setattr(module, hook_name, hookimpl(lambda components=components: components))
    return Registry.from_plugin_manager(make_plugin_manager(entry_points=False, plugins=[(plugin_name, module)]))


def refused_step(model: nn.Module, layers: dict, registry: Registry, x: torch.Tensor, match: str) -> None:
    """The step on ``model`` (compressed in place) is one CompressionError matching ``match``; the model, its
    weights and its output are as they were."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    compressor = Compressor(model, model_compr_kwargs=layers, example_input=x, inplace=True, progress=False,
                            registry=registry)
    with pytest.raises(CompressionError, match=match):
        compressor.compression_step()
    assert not any(isinstance(module, FactorizedLayer) for module in model.modules())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class Doubled(nn.Linear):
    """A Linear with a computation of its own, which the adapter below claims but reads as a plain Linear."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class DoubledAdapter(LinearAdapter):
    name = "doubled_linear"
    module_types = (Doubled,)


def test_an_adapter_whose_read_misses_the_modules_computation_is_refused_naming_its_plugin():
    registry = registry_with("doubling_plugin", musco_register_layer_adapters=[DoubledAdapter])
    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Doubled(32, 32)), torch.randn(4, 16)
    refused_step(model, {"2": {**manual(32), "force": True}}, registry, x,  # full rank: the chain is exact
                 r"^layer '2': layer adapter 'doubled_linear' of plugin 'doubling_plugin' does not reproduce the "
                 r"layer: rebuilt from what it read, it changes the output by 0.5 \(relative\) on a random probe")


class OwnLinear(nn.Linear):
    pass


class OwnDtypeAdapter(LinearAdapter):
    """Builds its modules in float64 or on the meta device, whatever the layer's dtype and device."""

    name = "own_dtype_linear"
    module_types = (OwnLinear,)
    made: dict = {}

    def build(self, spec, factors, like):
        return [nn.Linear(f.layout.in_channels, f.layout.out_channels, bias=f.bias is not None, **self.made)
                for f in factors]


@pytest.mark.parametrize(("made", "got"), [({"dtype": torch.float64}, "dtype torch.float64 on cpu"),
                                           ({"device": "meta"}, "dtype torch.float32 on meta")])
def test_an_adapter_that_builds_in_another_dtype_or_device_is_refused_naming_its_plugin(monkeypatch, made, got):
    monkeypatch.setattr(OwnDtypeAdapter, "made", made)
    registry = registry_with("dtype_plugin", musco_register_layer_adapters=[OwnDtypeAdapter])
    model, x = nn.Sequential(OwnLinear(16, 32), nn.ReLU(), nn.Linear(32, 8)), torch.randn(4, 16)
    refused_step(model, {"0": manual(4)}, registry, x,
                 rf"^layer '0': layer adapter 'own_dtype_linear' of plugin 'dtype_plugin' built the factors with "
                 rf"parameter '0.weight' of {got}, the layer's weights are torch.float32 on cpu")


class ScalingSVD(SVD):
    """Normalizes the weight it is given in place (the layer's own storage when not protected)."""

    name = "scaling_svd"

    def decompose(self, source, ranks, params, seed=0):
        source.weight.div_(source.weight.norm())
        return super().decompose(source, ranks, params, seed)


@pytest.mark.parametrize("layer", [nn.Linear(16, 16), nn.Conv2d(16, 16, 1, groups=2)])
def test_a_decomposer_that_changes_its_input_is_refused_and_the_model_kept(layer):
    registry = registry_with("scaling_plugin", musco_register_decompositions=[ScalingSVD])
    x = torch.randn(2, 16) if isinstance(layer, nn.Linear) else torch.randn(1, 16, 5, 5)
    refused_step(nn.Sequential(layer), {"0": {**manual(2), "decomposition": "scaling_svd"}}, registry, x,
                 r"^layer '0': decomposition 'scaling_svd' of plugin 'scaling_plugin' changed source.weight in place")
