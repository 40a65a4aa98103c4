"""Never a silently wrong model: layers whose behaviour a factorized chain would not reproduce are left alone
(generated schedules) or refused with the layer and the reason (named in a schedule), and a plugin's chain that
breaks the contract is refused before it is swapped in. Every refusal leaves the model as it was."""
from __future__ import annotations

import json
import logging
import re
import types
import warnings

import attrs
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn
from torch.nn.utils import parametrize, prune

from musco_core import Compressor, ConfigError, ModelStats, hookimpl
from musco_core.components import Allocation, FactorLayout, LayerAdapter, LayerSpec, RankSelector
from musco_core.config import generate_model_compr_kwargs
from musco_core.errors import CompressionError, PluginError
from musco_core.plugins import make_plugin_manager
from musco_core.registry import Registry
from musco_core.surgery import layer_aliases
from musco_core.verify import full_rank_problem
from musco_plugins.adapters import ConvAdapter
from musco_plugins.cp import CP3
from musco_plugins.svd import SVD
from musco_plugins.tucker2 import Tucker2
from musco_spatial_svd import SpatialSVD


def registry_with(*plugins: tuple[str, object], strict: bool = True) -> Registry:
    manager = make_plugin_manager(entry_points=False, strict=strict, plugins=list(plugins))
    return Registry.from_plugin_manager(manager, strict=strict)


def plugin(**hooks) -> types.ModuleType:
    module = types.ModuleType("test_safety_plugin")
    for hook_name, components in hooks.items():
        setattr(module, hook_name, hookimpl(lambda components=components: components))
    return module


def manual(rank, decomposition: str = "svd") -> dict:
    return {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": [rank]}


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    return ({key: value.clone() for key, value in model.state_dict().items()},
            {name: type(module) for name, module in model.named_modules()})


def assert_unchanged(model: nn.Module, before) -> None:
    state, module_types = snapshot(model)
    assert module_types == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[key], before[0][key]) for key in state)


def refused(model: nn.Module, schedule: dict, match: str, **kwargs) -> str:
    """The ConfigError message of a Compressor on ``model`` (in place) for ``schedule``; the model is unchanged."""
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match) as info:
        Compressor(model, model_compr_kwargs=schedule, inplace=True, progress=False, **kwargs)
    assert_unchanged(model, before)
    return str(info.value)


# --------------------------------------------------------------------------------------------------------------
# 1. adapters only claim what they reproduce


class TFSameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding computed in forward, as EfficientNet ports do (asymmetric for even totals)."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation)):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


class PlainSubLinear(nn.Linear):
    """A subclass that computes exactly what nn.Linear does."""


class TFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = TFSameConv2d(3, 16, 3, stride=2)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.scaled = ScaledLinear(32, 24)
        self.fc = PlainSubLinear(24, 10)

    def forward(self, x):
        return self.fc(self.scaled(self.conv(torch.relu(self.stem(x))).mean((2, 3))))


def test_subclasses_with_their_own_computation_are_not_claimed(registry):
    model = TFNet()
    assert registry.adapter_for(model.stem) is None
    assert "TFSameConv2d.forward" in registry.unsupported_reason(model.stem)
    assert "stock Conv2d" in registry.unsupported_reason(model.stem)
    assert registry.adapter_for(model.scaled) is None
    assert "ScaledLinear.forward" in registry.unsupported_reason(model.scaled)
    assert registry.adapter_for(model.fc).name == "linear" and registry.unsupported_reason(model.fc) is None
    assert registry.adapter_for(model.conv).name == "conv"
    quantizable = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)  # overrides nothing
    assert registry.adapter_for(quantizable).name == "linear"
    assert registry.match(nn.BatchNorm2d(4)) is None
    assert registry.unsupported_reason(nn.BatchNorm2d(4)).startswith("no adapter handles BatchNorm2d")


def test_a_module_named_like_a_handled_type_is_named_by_its_full_type(registry):
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear},
                                                       dtype=torch.qint8)
    assert registry.unsupported_reason(quantized[0]).startswith(
        "no adapter handles torch.ao.nn.quantized.dynamic.modules.linear.Linear; known adapters: ")

    class Linear(nn.Module):  # a class of the user's, named like an adapter
        pass

    assert f"handles {__name__}.test_a_module_named_like" in registry.unsupported_reason(Linear())

    # a subclass with a computation of its own, named like its base: the reason read "Linear defines Linear.forward"
    qat = torch.ao.nn.qat.Linear(4, 4, qconfig=torch.ao.quantization.get_default_qat_qconfig("fbgemm"))
    assert ("but torch.ao.nn.qat.modules.linear.Linear defines torch.ao.nn.qat.modules.linear.Linear.forward, so it "
            "may compute something else") in registry.unsupported_reason(qat)


class CallOverride(nn.Linear):
    def __call__(self, x):
        return super().__call__(x) + 1


class WeightProperty(nn.Linear):
    @property
    def weight(self):
        return self.raw * 2

    @weight.setter
    def weight(self, value):
        self.raw = nn.Parameter(value)


@pytest.mark.parametrize(("module", "expected"), [
    (CallOverride(4, 4), "CallOverride.__call__"),
    (WeightProperty(4, 4), "WeightProperty.weight"),
])
def test_overriding_the_call_machinery_or_the_weight_is_a_computation_of_its_own(registry, module, expected):
    assert registry.adapter_for(module) is None
    assert expected in registry.unsupported_reason(module)


class OneSidedPaddingConv2d(nn.Conv2d):
    """Pads all on one side through its instance's _reversed_padding_repeated_twice (what non-zeros padding modes
    pad with), overriding no method."""

    def __init__(self):
        super().__init__(4, 6, 3, padding=1, padding_mode="replicate")
        self._reversed_padding_repeated_twice = [0, 2, 0, 2]


def test_a_conv_that_pads_other_than_its_padding_says_is_left_alone_or_refused(registry):
    model, x = nn.Sequential(OneSidedPaddingConv2d()), torch.randn(1, 4, 7, 7)
    assert registry.adapter_for(model[0]) is None
    expected = "its _reversed_padding_repeated_twice is [0, 2, 0, 2] where its padding (1, 1) gives [1, 1, 1, 1]"
    assert expected in registry.unsupported_reason(model[0])
    assert "0" in ModelStats.from_model(model, registry, x).excluded
    refused(model, {"0": manual([4, 4], "tucker2")}, r'\$\.layers\["0"\]: cannot be compressed: .*padding',
            example_input=x)
    same = nn.Conv2d(4, 6, (2, 4), padding="same", dilation=(1, 3), padding_mode="reflect")  # pads more after
    assert registry.adapter_for(same).name == "conv"
    dilated = nn.Conv2d(4, 6, 3, padding=1)
    dilated.dilation, dilated.padding = (2, 2), (2, 2)  # as segmentation code dilates a backbone: zero padding
    assert registry.adapter_for(dilated).name == "conv"  # reads padding alone, the stale attribute is harmless


def test_an_adapter_declares_a_subclass_it_reproduces_by_listing_it(registry):
    class TFSameAdapter(ConvAdapter):
        name = "tf_same_conv"
        module_types = (TFSameConv2d,)

    reg = registry_with(("tf_same", plugin(musco_register_layer_adapters=[TFSameAdapter])))
    assert reg.adapter_for(TFSameConv2d(3, 4, 3)).name == "tf_same_conv"
    assert reg.adapter_for(nn.Conv2d(3, 4, 3)).name == "conv"


def test_generated_schedule_leaves_out_subclasses_with_the_reason(registry, caplog):
    model, x = TFNet(), torch.randn(1, 3, 16, 16)
    stats = ModelStats.from_model(model, registry, x)
    assert set(stats.excluded) == {"stem", "scaled"}
    assert "TFSameConv2d.forward" in stats.excluded["stem"]
    with caplog.at_level(logging.INFO, logger="musco_core.config"):
        config = generate_model_compr_kwargs(stats, "param_reduction", registry=registry)
    assert "stem" not in config and "scaled" not in config and config["conv"] is not None
    assert any("'stem' left out" in record.getMessage() and "forward" in record.getMessage()
               for record in caplog.records)
    compressor = Compressor(model, config_type="param_reduction", example_input=x, progress=False, registry=registry)
    assert set(compressor.lnames) == {"conv"} and "stem" in compressor.model_stats.excluded  # fc: the output layer
    while not compressor.done:
        compressor.compression_step()
    assert type(compressor.compressed_model.stem) is TFSameConv2d  # left alone


@pytest.mark.parametrize(("layer", "decomposition", "what"), [
    ("stem", "tucker2", r"TFSameConv2d\.forward"),
    ("scaled", "svd", r"ScaledLinear\.forward"),
])
@pytest.mark.parametrize("example", [False, True])
def test_a_schedule_naming_a_subclass_with_its_own_computation_is_refused(layer, decomposition, what, example):
    model = TFNet()
    rank = [8, 8] if decomposition == "tucker2" else 8
    message = refused(model, {layer: manual(rank, decomposition)}, rf'\$\.layers\["{layer}"\].*{what}',
                      example_input=torch.randn(1, 3, 16, 16) if example else None)
    assert "\n" not in message


def _prune(layer):
    prune.l1_unstructured(layer, "weight", amount=0.5)


def _weight_norm(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated hook-based weight_norm, still in use
        nn.utils.weight_norm(layer)


def _orthogonal(layer):
    nn.utils.parametrizations.orthogonal(layer)


def _scale_parametrization(layer):
    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    parametrize.register_parametrization(layer, "weight", Double())


def _forward_hook(layer):
    layer.register_forward_hook(lambda module, inputs, output: output * 2)


def _forward_pre_hook(layer):
    layer.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))


def _backward_hook(layer):
    layer.register_full_backward_hook(lambda module, grad_input, grad_output: None)


def _instance_forward(layer):
    plain = layer.forward
    layer.forward = lambda x: plain(x) + 1  # as accelerate's hooks do


def _gradient_hook(layer):
    layer.weight.register_hook(lambda grad: grad * 0)  # a frozen block or a sparsity mask during fine-tuning


def _post_accumulate_grad_hook(layer):
    layer.bias.register_post_accumulate_grad_hook(lambda parameter: None)  # an optimizer step in backward


@pytest.mark.parametrize(("attach", "expected"), [
    (_prune, "pruned"), (_weight_norm, "weight_norm"), (_orthogonal, "weight is parametrized"),
    (_scale_parametrization, "weight is parametrized"), (_forward_hook, "forward hook"),
    (_forward_pre_hook, "forward pre-hook"), (_backward_hook, "backward hook"),
    (_instance_forward, "the instance's own forward"), (_gradient_hook, "weight has a gradient hook"),
    (_post_accumulate_grad_hook, "bias has a post-accumulate-grad hook"),
])
def test_modules_with_hooks_or_reparametrized_weights_are_left_alone_or_refused(registry, attach, expected):
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 6))
    attach(model[0])
    x = torch.randn(2, 12)
    with torch.no_grad():
        output = model(x)
    assert registry.adapter_for(model[0]) is None and expected in registry.unsupported_reason(model[0])
    stats = ModelStats.from_model(model, registry, x)
    assert expected in stats.excluded["0"] and "0" not in stats.layers
    assert "0" not in generate_model_compr_kwargs(stats, "param_reduction", registry=registry)
    refused(model, {"0": manual(4)}, rf'\$\.layers\["0"\]: cannot be compressed: .*{expected}')
    with torch.no_grad():
        assert torch.equal(model(x), output)  # the hook or reparametrization still works as before


@pytest.mark.parametrize(("attach", "expected"), [
    (_forward_hook, "but it has a forward hook"), (_instance_forward, "but the instance has its own forward"),
    (lambda layer: _forward_hook(layer[1]), "its factor 1 (Linear): it has a forward hook"),
    (lambda layer: _prune(layer[0]), "its factor 0 (Linear): it is pruned"),
    (lambda layer: _scale_parametrization(layer[1]), "its factor 1 (ParametrizedLinear): its weight is parametrized"),
    (lambda layer: _gradient_hook(layer[0]), "its factor 0 (Linear): its weight has a gradient hook"),
])
def test_hooks_added_to_a_factorized_layer_between_stages_are_refused(registry, attach, expected):
    model, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6)), torch.randn(2, 16)
    schedule = {"0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4, 2]}}
    compressor = Compressor(model, model_compr_kwargs=schedule, nglobal_compress_iters=2,
                            example_input=x, progress=False)
    compressor.compression_step()
    compressed = compressor.compressed_model
    attach(compressed[0])  # during fine-tuning
    with torch.no_grad():
        output = compressed(x)
    before = snapshot(compressed)
    with pytest.raises(CompressionError, match=rf"layer '0': re-compressing rebuilds it .*{re.escape(expected)}"):
        compressor.compression_step()
    assert_unchanged(compressed, before)
    with torch.no_grad():
        assert torch.equal(compressed(x), output)
    stats = ModelStats.from_model(compressed, registry, x)
    assert expected in stats.excluded["0"] and "0" not in stats.layers and "0.0" not in stats.layers
    refused(compressed, {"0": manual(2)}, rf'\$\.layers\["0"\]: cannot be compressed: .*{re.escape(expected)}')


@pytest.mark.parametrize(("layer", "x", "decomposition"), [
    (nn.Linear(8, 6, dtype=torch.cfloat), torch.randn(2, 8, dtype=torch.cfloat), "svd"),
    (nn.Conv2d(6, 8, 3, dtype=torch.cfloat), torch.randn(1, 6, 5, 5, dtype=torch.cfloat), "tucker2")])
def test_complex_layers_are_left_alone_or_refused(registry, layer, x, decomposition):
    """Torch runs complex Linear and Conv layers; the decompositions dropped the imaginary part of their weights,
    so at full rank the model's output changed by 0.42 (svd) and 0.71 (tucker2), with a weight error of 7e-8
    reported (measured on the real part)."""
    model = nn.Sequential(layer, nn.Flatten())
    expected = "its weight is torch.complex64: the decompositions factorize real floating-point weights"
    stats = ModelStats.from_model(model, registry, x)
    assert expected in stats.excluded["0"] and "0" not in stats.layers
    refused(model, {"0": manual([8, 6] if decomposition == "tucker2" else 6, decomposition)},
            rf'\$\.layers\["0"\]: cannot be compressed: .*{re.escape(expected)}', example_input=x)


def _doubling_hook(module, *args):
    """A hook for every module that doubles what each Linear gives (output) or takes (pre-hook, gradients)."""
    if isinstance(module, nn.Linear):
        return tuple(2 * t for t in args[-1]) if isinstance(args[-1], tuple) else 2 * args[-1]
    return None


@pytest.mark.parametrize("register", [
    "register_module_forward_hook", "register_module_forward_pre_hook", "register_module_full_backward_hook",
    "register_module_full_backward_pre_hook"])
def test_hooks_for_every_module_leave_every_layer_alone(registry, register):
    """A hook for every module runs on each factor of a chain too: with one doubling each Linear's output, svd at
    full rank changed the model's output by 0.59 (relative), or, in a process whose cached miniature verdict was
    still missing, failed with the svd plugin blamed for not being exact."""
    model, x = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 6)), torch.randn(2, 12)
    schedule = {"0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [12, 12], "force": True}}
    compressor = Compressor(model, model_compr_kwargs=schedule, nglobal_compress_iters=2, example_input=x,
                            progress=False)
    compressor.compression_step()
    expected = f"a hook for every module is registered (_doubling_hook, by torch.nn.modules.module.{register})"
    handle = getattr(torch.nn.modules.module, register)(_doubling_hook)
    try:
        assert expected in registry.unsupported_reason(model[0])
        stats = ModelStats.from_model(model, registry, x)
        assert expected in stats.excluded["0"] and "0" not in stats.layers
        refused(model, {"0": manual(4)}, rf'\$\.layers\["0"\]: cannot be compressed: .*{re.escape(expected)}')
        before = snapshot(compressor.compressed_model)  # registered during fine-tuning, before the second stage
        with pytest.raises(CompressionError, match=rf"layer '0': re-compressing it .*{re.escape(expected)}"):
            compressor.compression_step()
        assert_unchanged(compressor.compressed_model, before)
    finally:
        handle.remove()


@pytest.mark.parametrize("register", ["register_module_forward_hook", "register_module_forward_pre_hook"])
def test_hooks_for_every_module_do_not_keep_a_saved_model_from_loading(registry, tmp_path, register):
    """Loading rebuilds the chain that was compressed without them, which they then run on as they would had they
    been registered after the load: the load was refused ("remove it while compressing")."""
    from musco_core.io import load_compressed, save_compressed

    model, x = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 6)), torch.randn(2, 12)
    compressor = Compressor(model, model_compr_kwargs={"0": manual(4)}, example_input=x, registry=registry,
                            progress=False)
    compressor.compression_step()
    save_compressed(compressor, tmp_path / "out", registry)
    expected = load_compressed(model, tmp_path / "out", registry)
    handle = getattr(torch.nn.modules.module, register)(_doubling_hook)
    try:
        loaded = load_compressed(model, tmp_path / "out", registry)
        torch.testing.assert_close(loaded(x), expected(x))  # the hook runs on both alike
        assert type(loaded[0]).__name__ == "FactorizedLayer"
        refused(model, {"0": manual(4)}, r"a hook for every module is registered")  # compressing still refuses
    finally:
        handle.remove()


class WritingOwner(nn.Module):
    """Sets its child's weight or bias from parameters of its own before each call, as AWD-LSTM's WeightDrop and
    weight standardization do: the child's tensor is a plain attribute, not a Parameter."""

    def __init__(self, written: str):
        super().__init__()
        self.written = written
        self.fc = nn.Linear(8, 8)
        self.raw = nn.Parameter(getattr(self.fc, written).detach().clone())
        self.gain = nn.Parameter(torch.tensor(2.0))
        delattr(self.fc, written)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        setattr(self.fc, self.written, self.raw * self.gain)
        return self.out(torch.relu(self.fc(x)))


@pytest.mark.parametrize("written", ["weight", "bias"])
@pytest.mark.parametrize("example", [False, True])
def test_a_weight_or_bias_set_by_the_owner_is_left_alone_or_refused(registry, written, example):
    model, x = WritingOwner(written), torch.randn(2, 8)
    with torch.no_grad():
        output = model(x)  # sets the child's tensor, as training would
    stats = ModelStats.from_model(model, registry, x if example else None)
    assert f"its {written} is not a Parameter of its own" in stats.excluded["fc"] and "fc" not in stats.layers
    refused(model, {"fc": manual(4)}, rf'\$\.layers\["fc"\]: cannot be compressed: .*{written} is not a Parameter',
            example_input=x if example else None)
    with torch.no_grad():
        assert torch.equal(model(x), output)


def _sliced_linear_in() -> nn.Module:
    layer = nn.Linear(8, 6)
    layer.weight = nn.Parameter(torch.randn(6, 10))
    return layer


def _sliced_linear_out() -> nn.Module:
    layer = nn.Linear(8, 6)
    layer.weight, layer.bias = nn.Parameter(torch.randn(5, 8)), nn.Parameter(torch.randn(5))
    return layer


def _sliced_conv_kernel() -> nn.Module:
    layer = nn.Conv2d(4, 8, 3)
    layer.weight = nn.Parameter(torch.randn(8, 4, 1, 3))
    return layer


@pytest.mark.parametrize(("make", "x", "expected"), [
    (_sliced_linear_in, torch.randn(2, 10), "its weight has shape (6, 10) where its attributes, a linear 8->6"),
    (_sliced_linear_out, torch.randn(2, 8), "its weight has shape (5, 8)"),
    (_sliced_conv_kernel, torch.randn(1, 4, 6, 6), "its weight has shape (8, 4, 1, 3)")])
def test_a_layer_whose_weights_were_sliced_without_its_attributes_is_left_alone_or_refused(registry, make, x,
                                                                                            expected):
    """Channel pruning that slices a layer's weight but not its attributes leaves a layer torch still runs (it
    computes with the tensors alone); its chain would be built, and its weights counted, for the geometry the
    attributes give (48 weights reported for a weight of 60, and the step failing with the plugin to blame)."""
    model = nn.Sequential(make(), nn.Flatten())
    stats = ModelStats.from_model(model, registry, x)
    assert expected in stats.excluded["0"] and "0" not in stats.layers
    refused(model, {"0": manual(2)}, rf'\$\.layers\["0"\]: cannot be compressed: .*{re.escape(expected)}',
            example_input=x)


# --------------------------------------------------------------------------------------------------------------
# 2. layers read by their owner, not called


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


@pytest.mark.parametrize("example", [False, True])
def test_multihead_attention_out_proj_is_refused_by_its_owner(registry, example):
    model, x = Attention().eval(), torch.randn(2, 5, 16)
    stats = ModelStats.from_model(model, registry, x if example else None)
    assert "MultiheadAttention" in stats.excluded["attn.out_proj"]
    assert list(generate_model_compr_kwargs(stats, "param_reduction", registry=registry)) == ["head"]
    refused(model, {"attn.out_proj": manual(4)},
            r"attn\.out_proj.*'attn' \(MultiheadAttention\) reads its weight directly",
            example_input=x if example else None)
    compressor = Compressor(model, config_type="param_reduction", example_input=x if example else None,
                            progress=False)
    while not compressor.done:
        compressor.compression_step()
    assert compressor.compressed_model(x).shape == (2, 5, 4)


@pytest.mark.parametrize("example", [False, True])
def test_transformer_encoder_layer_linears_are_refused_in_eval(registry, example):
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1,
                                  enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    stats = ModelStats.from_model(model, registry, x if example else None)
    assert {"layers.0.linear1", "layers.0.linear2", "layers.0.self_attn.out_proj"} <= set(stats.excluded)
    assert "TransformerEncoderLayer" in stats.excluded["layers.0.linear1"]
    assert generate_model_compr_kwargs(stats, "param_reduction", registry=registry) == {}
    message = refused(model, {"layers.0.linear1": manual(4), "layers.0.linear2": manual(4)},
                      r"linear1.*TransformerEncoderLayer", example_input=x if example else None)
    assert "layers.0.linear2" in message


class FusedLossHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.loss = nn.LinearCrossEntropyLoss(32, 40)

    def forward(self, x, target):
        return self.loss(torch.relu(self.body(x)), target)


@pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="torch < 2.13")
def test_linear_cross_entropy_loss_linear_is_refused_by_its_owner(registry):
    """It passes self.linear.weight to F.linear_cross_entropy: without an example input to show that, its Linear
    was factorized and the model then failed ('FactorizedLayer' object has no attribute 'weight')."""
    model = FusedLossHead()
    stats = ModelStats.from_model(model, registry)
    assert "'loss' (LinearCrossEntropyLoss) reads its weight directly" in stats.excluded["loss.linear"]
    refused(model, {"loss.linear": manual(8)}, r"loss\.linear.*'loss' \(LinearCrossEntropyLoss\) reads its weight")


class FunctionalOwner(nn.Module):
    """Reads its child's weight in its own forward (as fused or custom code does) instead of calling the child."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(F.linear(x, self.proj.weight, self.proj.bias))


class AuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.aux = nn.Linear(8, 4)  # used in training only

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_weight_read_outside_the_layers_call_is_told_from_a_layer_never_reached(registry):
    owner = FunctionalOwner()
    stats = ModelStats.from_model(owner, registry, torch.randn(2, 8))
    assert list(stats.layers) == ["out"]
    assert "used outside its own call by the model (FunctionalOwner)" in stats.excluded["proj"]
    aux = AuxHead()
    stats = ModelStats.from_model(aux, registry, torch.randn(1, 3, 8, 8))
    assert list(stats.layers) == ["conv", "fc"]
    assert "never reaches it" in stats.excluded["aux"]
    refused(owner, {"proj": manual(4)}, r'\$\.layers\["proj"\].*outside its own call', example_input=torch.randn(2, 8))
    message = refused(aux, {"aux": manual(4)}, r'\$\.layers\["aux"\].*never reaches it',
                      example_input=torch.randn(1, 3, 8, 8))
    assert "NoneType" not in message


def test_statistics_passed_in_keep_the_checks_on_the_example_input(registry):
    stats = ModelStats.from_model(FunctionalOwner(), registry)  # made without an input: proj looks like a layer
    assert "proj" in stats.layers
    refused(FunctionalOwner(), {"proj": manual(4)}, r'\$\.layers\["proj"\].*outside its own call',
            model_stats=stats, example_input=torch.randn(2, 8))


def test_tied_weights_used_by_their_other_owner_are_not_a_foreign_read(registry):
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.hidden = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.hidden(self.embed(ids))))

    stats = ModelStats.from_model(TiedLM(), registry, torch.randint(0, 20, (2, 5)))
    assert list(stats.layers) == ["hidden", "head"] and stats.excluded == {}


def test_report_totals_survive_a_layer_without_statistics(registry):
    model, x = AuxHead(), torch.randn(1, 3, 8, 8)
    stats = ModelStats.from_model(model, registry, x)
    partial = attrs.evolve(stats, layers={"conv": stats.layers["conv"]})  # as from a tool that missed fc
    compressor = Compressor(model, partial, {"fc": manual(2)}, progress=False)
    compressor.compression_step()
    report = compressor.report()
    assert report.macs_before is None and report.macs_after is None  # not a total that leaves fc out
    assert "fc" in report.to_table() and report.params_after < report.params_before


# --------------------------------------------------------------------------------------------------------------
# 3. the plugin contract, enforced before swap-in


class UnownedAxisSVD(SpatialSVD):
    """A third-party spatial SVD whose second factor forgets that it owns axis 1 (its padding is lost)."""

    name = "unowned_axis_svd"

    def layout(self, spec, ranks):
        first, second = super().layout(spec, ranks)
        return [first, attrs.evolve(second, axes=())]


class LossySVD(SVD):
    """Claims to be exact at its max rank but drops the last singular direction."""

    name = "lossy_svd"
    exact_at_max_rank = True

    def decompose(self, source, ranks, params, seed=0):
        first, second = super().decompose(source, ranks, params, seed)
        first = first.clone()
        first[-1] = 0
        return [first, second]


class ExactCP3(CP3):
    """CP3 declaring what it cannot keep: its max rank (the largest that does not grow the layer) is not exact."""

    name = "exact_cp3"
    exact_at_max_rank = True


def contract_registry() -> Registry:
    return registry_with(("broken_decomposers", plugin(musco_register_decompositions=[UnownedAxisSVD, LossySVD,
                                                                                        ExactCP3])))


def compress_refused(model: nn.Module, schedule: dict, match: str, registry: Registry, x: torch.Tensor) -> str:
    compressor = Compressor(model, model_compr_kwargs=schedule, example_input=x, inplace=True, progress=False,
                            registry=registry)
    before = snapshot(model)
    with pytest.raises(CompressionError, match=match) as info:
        compressor.compression_step()
    assert_unchanged(model, before)
    assert compressor.curr_iter == 0 and compressor.history == []
    return str(info.value)


def test_a_layout_that_leaves_an_axis_without_an_owner_is_refused_naming_the_plugin():
    model, x = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1)), torch.randn(1, 6, 6, 6)
    message = compress_refused(model, {"0": manual(4, "unowned_axis_svd")}, r"layer '0'.*unowned_axis_svd",
                               contract_registry(), x)
    assert "plugin 'broken_decomposers'" in message and "<registered in code>" in message
    assert "spatial axis 1 without an owner" in message
    assert model(x).shape == (1, 12, 6, 6)


def test_an_adapter_that_loses_the_geometry_is_caught_by_the_output_shape_probe():
    class MyConv(nn.Conv2d):
        pass

    class NoPaddingAdapter(ConvAdapter):
        """Builds its factors without padding: the layout is fine, the modules are not."""

        name = "no_padding"
        module_types = (MyConv,)

        @staticmethod
        def _padding(spec, layout):
            return (0,) * spec.spatial_dims

    reg = registry_with(("sloppy_adapter", plugin(musco_register_layer_adapters=[NoPaddingAdapter])))
    model, x = nn.Sequential(MyConv(6, 12, 3, padding=1)), torch.randn(1, 6, 6, 6)
    message = compress_refused(model, {"0": manual([6, 6], "tucker2")}, r"\(1, 12, 4, 4\) instead of .*\(1, 12, 6, 6\)",
                               reg, x)
    assert "adapter 'no_padding' of plugin 'sloppy_adapter' does not reproduce the layer" in message


class BlockSVD(SVD):
    """Two column blocks, each of rank r: a grouped first factor ``in -> 2r`` (groups=2), then ``2r -> out``."""

    name = "block_svd"
    exact_at_max_rank = False

    def layout(self, spec, ranks):
        first, second = super().layout(spec, (2 * ranks[0],))
        return [attrs.evolve(first, groups=2), second]

    def decompose(self, source, ranks, params, seed=0):
        weight = source.weight.reshape(source.spec.out_channels, 2, -1)  # (out, block, in / 2)
        u, s, vh = torch.linalg.svd(weight.transpose(0, 1), full_matrices=False)  # per block
        r = ranks[0]
        first = (s[:, :r, None].sqrt() * vh[:, :r]).reshape(2 * r, -1)
        second = (u[:, :, :r] * s[:, None, :r].sqrt()).transpose(0, 1).reshape(source.spec.out_channels, 2 * r)
        return [first.reshape(2 * r, -1, *source.spec.kernel_size), second.reshape(-1, 2 * r, *source.spec.kernel_size)]


def test_a_grouped_factor_the_linear_adapter_cannot_build_is_refused_with_the_reason():
    """A decomposition with a grouped factor (a block SVD) works on a 1x1 convolution, but on a Linear layer the linear
    adapter built an ungrouped nn.Linear and failed with torch's "shape '[8, 32]' is invalid for input of size 128";
    now the adapter says it builds no grouped factors."""
    reg = registry_with(("block_plugin", plugin(musco_register_decompositions=[BlockSVD])))
    conv = Compressor(nn.Sequential(nn.Conv2d(32, 16, 1)), model_compr_kwargs={"0": manual(4, "block_svd")},
                      example_input=torch.randn(1, 32, 4, 4), progress=False, registry=reg)
    assert [result.ranks for result in conv.compression_step()] == [(4,)]
    assert conv.compressed_model[0][0].groups == 2
    model, x = nn.Sequential(nn.Linear(32, 16)), torch.randn(1, 32)
    compress_refused(model, {"0": manual(4, "block_svd")},
                     r"layer '0'.*the linear adapter builds ungrouped nn.Linear factors, factor 0 has groups=2", reg, x)


class InOutLinear(nn.Module):
    """A linear layer that stores its weight ``(in, out)``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features ** 0.5)

    def forward(self, x):
        return x @ self.weight


class InOutAdapter(LayerAdapter):
    """Builds InOutLinear factors but leaves read_factor to the default, which reads ``weight`` as it is."""

    name = "inout"
    module_types = (InOutLinear,)

    def read(self, module):
        return LayerSpec(self.name, module.weight.shape[1], module.weight.shape[0]), module.weight.detach().T, None

    def build(self, spec, factors, like):
        modules = [InOutLinear(f.layout.in_channels, f.layout.out_channels).to(like) for f in factors]
        with torch.no_grad():
            for module, factor in zip(modules, factors):
                module.weight.copy_(factor.weight.T)
        return modules


def test_an_adapter_whose_read_factor_gives_another_shape_is_refused_naming_the_adapter():
    """The default read_factor hands back the module's weight as stored: for an adapter whose modules store it
    (in, out), re-compressing failed with an error that blamed the decomposition ("decomposition 'svd' of plugin
    'musco_plugins.svd' returned factor 0 of shape (4, 8), its layout says (4, 32)"); now the adapter is named."""
    reg = registry_with(("inout_plugin", plugin(musco_register_layer_adapters=[InOutAdapter])))
    model, x = nn.Sequential(InOutLinear(32, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(2, 32)
    compressor = Compressor(model, model_compr_kwargs={"0": {**manual(8), "manual_rank": [8, 4]}}, example_input=x,
                            nglobal_compress_iters=2, inplace=True, progress=False, registry=reg)
    compressor.compression_step()
    before = snapshot(model)
    with pytest.raises(CompressionError, match=r"layer '0': layer adapter 'inout' of plugin 'inout_plugin' "
                                               r"\(<registered in code>\) read factor 0 back with a weight of shape "
                                               r"\(32, 8\), its layout says \(8, 32\)"):
        compressor.compression_step()
    assert_unchanged(model, before)


def test_an_adapter_whose_spec_names_another_adapter_is_refused_when_the_schedule_is_checked():
    """An adapter whose read() put another adapter's name in LayerSpec.adapter (a copied 'linear') compressed the
    layer once, and the next stage took the linear adapter for its factors: "its factor 0 (InOutLinear) holds
    weight of shape (32, 8) where its layout gives weight of shape (8, 32): it was changed after it was built".
    Now the layer is refused when the Compressor is built, with the reason."""
    class Misnamed(InOutAdapter):
        def read(self, module):
            spec, weight, bias = super().read(module)
            return attrs.evolve(spec, adapter="linear"), weight, bias

    reg = registry_with(("misnamed_plugin", plugin(musco_register_layer_adapters=[Misnamed])))
    model = nn.Sequential(InOutLinear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    assert reg.unsupported_reason(model[0]) == ("the inout adapter rebuilds a stock InOutLinear, but its read() gives "
                                                "a LayerSpec of adapter 'linear': LayerSpec.adapter must be 'inout', "
                                                "the name of the adapter that read it")
    with pytest.raises(ConfigError, match=r'\$\.layers\["0"\]: cannot be compressed: .*LayerSpec\.adapter must be'):
        Compressor(model, model_compr_kwargs={"0": {**manual(8), "manual_rank": [8, 4]}},
                   example_input=torch.randn(2, 32), nglobal_compress_iters=2, progress=False, registry=reg)


class FailingSVD(SVD):
    name = "failing_svd"

    def decompose(self, source, ranks, params, seed=0):
        raise ValueError("cannot find my kernels")


class FailingSelector(RankSelector):
    name = "failing"

    def select(self, decomposer, source, stage, params):
        raise KeyError("stage")


@pytest.mark.parametrize(("schedule", "blamed"), [
    (manual(4, "failing_svd"), "decomposition 'failing_svd' of plugin 'failing_plugin' failed: ValueError: cannot "
                               "find my kernels"),
    ({"decomposition": "svd", "rank_selection": "failing"},
     "rank selector 'failing' of plugin 'failing_plugin' failed: KeyError: 'stage'")])
def test_an_exception_in_a_plugins_select_or_decompose_names_the_component_and_plugin(schedule, blamed):
    """'layer 0: ValueError: cannot find my kernels' did not say which of several plugins raised it."""
    reg = registry_with(("failing_plugin", plugin(musco_register_decompositions=[FailingSVD],
                                                  musco_register_rank_selectors=[FailingSelector])))
    model, x = nn.Sequential(nn.Linear(16, 16)), torch.randn(1, 16)
    message = compress_refused(model, {"0": schedule}, "layer '0'", reg, x)
    assert message == f"layer '0': {blamed}; the model was left as before this step"


@pytest.mark.parametrize(("decomposition", "rank"), [("lossy_svd", 4), ("exact_cp3", 4)])
def test_a_decomposer_that_is_not_exact_at_its_max_rank_is_caught_on_a_miniature(decomposition, rank):
    layer = nn.Conv2d(8, 16, 1) if decomposition == "lossy_svd" else nn.Conv2d(8, 16, 3, padding=1)
    model, x = nn.Sequential(layer), torch.randn(1, 8, 6, 6)
    message = compress_refused(model, {"0": manual(rank, decomposition)}, "declares exact_at_max_rank",
                               contract_registry(), x)
    assert f"decomposition {decomposition!r} of plugin 'broken_decomposers'" in message
    assert "miniature" in message and "relative error" in message


GEOMETRIES = [nn.Conv2d(3, 5, 3), nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
              nn.Conv2d(3, 5, (3, 5), padding="same", padding_mode="circular"), nn.Conv2d(3, 5, 1, stride=2),
              nn.Conv1d(3, 5, 3, padding=1), nn.Conv3d(3, 5, 3, stride=(1, 2, 1)), nn.Linear(3, 5)]


@pytest.mark.parametrize(("decomposer", "n_supported"), [(SVD(), 2), (Tucker2(), 6), (SpatialSVD(), 3)],
                         ids=lambda value: getattr(value, "name", str(value)))
def test_exact_bundled_decomposers_pass_the_miniature_check_at_every_geometry(registry, decomposer, n_supported):
    checked = 0
    for layer in GEOMETRIES:
        adapter = registry.adapter_for(layer)
        spec = adapter.read(layer)[0]
        if decomposer.unsupported_reason(spec) is None:
            assert full_rank_problem(decomposer, adapter, spec, decomposer.Params()) is None, layer
            checked += 1
    assert checked == n_supported


def test_whitened_svd_passes_the_miniature_check_with_statistics(registry):
    decomposer = registry.decompositions.get("whitened_svd")
    for layer in (nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Linear(3, 5)):
        adapter = registry.adapter_for(layer)
        assert full_rank_problem(decomposer, adapter, adapter.read(layer)[0], decomposer.Params()) is None


def test_the_miniature_verdict_is_cached_per_decomposer_and_geometry(registry):
    calls = []

    class CountingTucker2(Tucker2):
        name = "counting_tucker2"

        def decompose(self, source, ranks, params, seed=0):
            calls.append(source.spec.in_channels)
            return super().decompose(source, ranks, params, seed)

    reg = registry_with(("counting", plugin(musco_register_decompositions=[CountingTucker2])))
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                          nn.Conv2d(16, 16, 3, padding=2, dilation=2))
    compressor = Compressor(model, model_compr_kwargs={name: manual([8, 8], "counting_tucker2") for name in "012"},
                            ft_every=3, example_input=torch.randn(1, 16, 8, 8), progress=False, registry=reg)
    compressor.compression_step()
    assert calls == [16, 4, 16, 16, 4]  # one miniature (4 channels in) per geometry: layers 0 and 1 share one


def test_the_layout_contract_checks_channels_and_bias(registry):
    from musco_core.verify import layout_problem

    spec = registry.adapter_for(nn.Conv2d(4, 6, 3)).read(nn.Conv2d(4, 6, 3))[0]
    core = FactorLayout(6, 5, (3, 3), axes=(0, 1), bias=True)
    assert "factor 0 taking 5 channels where 4 come in" in layout_problem(spec, [core])
    assert layout_problem(spec, [FactorLayout(6, 4, (3, 3), axes=(0, 1))]) == "drops the layer's bias"
    assert "bias on factor(s) [0]" in layout_problem(spec, [FactorLayout(5, 4, (3, 3), axes=(0, 1), bias=True),
                                                            FactorLayout(6, 5, (1, 1))])
    assert "to factors [0, 1]" in layout_problem(spec, [FactorLayout(5, 4, (3, 1), axes=(0, 1)),
                                                        FactorLayout(6, 5, (1, 3), axes=(1,), bias=True)])
    assert layout_problem(spec, [FactorLayout(6, 4, (3, 3), axes=(0, 1), bias=True)]) is None


class ReturningSVD(SVD):
    """An svd whose factors (and a selector whose ranks) the test sets: what a buggy third-party plugin returns."""

    name = "returning_svd"
    exact_at_max_rank = False  # the miniature check would catch some; the factors' own checks come first
    returned = None

    def decompose(self, source, ranks, params, seed=0):
        first, second = super().decompose(source, ranks, params, seed)
        return self.returned(first, second)


class ReturningSelector(RankSelector):
    name = "returning"
    returned: object = None

    def select(self, decomposer, source, stage, params):
        return self.returned


def returning_registry() -> Registry:
    return registry_with(("returning_plugin", plugin(musco_register_decompositions=[ReturningSVD],
                                                     musco_register_rank_selectors=[ReturningSelector])))


@pytest.mark.parametrize(("factors", "problem"), [
    (lambda a, b: [(a * 10).to(torch.int64), b], "factor 0 of dtype torch.int64"),
    (lambda a, b: [a, b > 0], "factor 1 of dtype torch.bool"),
    (lambda a, b: [a.to(torch.complex64) * 1j, b], "factor 0 of dtype torch.complex64"),
    (lambda a, b: [a.numpy(), b], "factor 0 as a ndarray"),
    (lambda a, b: [a, b, b], "returned 3 factor(s); its layout has 2"),
    (lambda a, b: [a], "returned 1 factor(s); its layout has 2")])
def test_factors_of_another_dtype_or_count_are_refused_naming_the_plugin(monkeypatch, factors, problem):
    # an int or bool factor of the right shape used to be cast to float and swapped in, a complex one to lose its
    # imaginary part: a silently wrong model
    monkeypatch.setattr(ReturningSVD, "returned", staticmethod(factors))
    model, x = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)), torch.randn(2, 16)
    message = compress_refused(model, {"2": manual(4, "returning_svd")}, "returning_svd", returning_registry(), x)
    assert message.startswith("layer '2': decomposition 'returning_svd' of plugin 'returning_plugin' returned ")
    assert problem in message
    assert "real floating-point tensor" in message or "factor(s)" in problem


def test_half_precision_factors_are_a_floating_point_result_and_kept(monkeypatch):
    monkeypatch.setattr(ReturningSVD, "returned", staticmethod(lambda a, b: [a.half(), b.half()]))
    model, x = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)), torch.randn(2, 16)
    compressor = Compressor(model, model_compr_kwargs={"2": manual(4, "returning_svd")}, example_input=x,
                            progress=False, registry=returning_registry())
    assert compressor.compression_step()[0].applied
    assert compressor.compressed_model[2][0].weight.dtype == torch.float32  # the layer's dtype, as always


@pytest.mark.parametrize("ranks", [(0,), (-5,), (True,), (3.5,), (4, 4), (), 6, ("4",)])
def test_ranks_that_are_not_one_positive_int_per_rank_are_refused_naming_the_selector(monkeypatch, ranks):
    # (0,), (-5,) and (True,) used to compress the layer at rank 1 with a note that made it look intended
    monkeypatch.setattr(ReturningSelector, "returned", ranks)
    model, x = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)), torch.randn(2, 16)
    message = compress_refused(model, {"2": {"decomposition": "svd", "rank_selection": "returning"}}, "returning",
                               returning_registry(), x)
    assert message.startswith(f"layer '2': rank selector 'returning' of plugin 'returning_plugin' chose ranks "
                              f"{ranks!r}; svd takes 1 rank(s) (rank), each a positive int")


@pytest.mark.parametrize("ranks", [(np.int64(3),), [torch.tensor(3)], (3,)])
def test_integer_like_ranks_become_ints_so_the_report_and_files_can_hold_them(monkeypatch, tmp_path, ranks):
    # numpy ranks (np.searchsorted, np.argmax) used to be kept as they were, and to_json and save_state then failed
    monkeypatch.setattr(ReturningSelector, "returned", ranks)
    model, x = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)), torch.randn(2, 16)
    compressor = Compressor(model, model_compr_kwargs={"2": {"decomposition": "svd", "rank_selection": "returning"}},
                            example_input=x, progress=False, registry=returning_registry())
    result = compressor.compression_step()[0]
    assert result.applied and result.ranks == (3,) and type(result.ranks[0]) is int
    assert json.loads(compressor.report().to_json())["layers"][0]["ranks"] == [3]
    compressor.save_state(tmp_path)


def test_whole_model_ranks_are_checked_like_a_selectors(registry):
    from musco_core.config import validate_model_compr_kwargs
    from musco_core.engine import compress_layer

    schedule = validate_model_compr_kwargs({"0": {"decomposition": "svd", "rank_selection": "budget"}},
                                           registry=registry)
    layer, settings = schedule.layers["0"], schedule.settings
    with pytest.raises(CompressionError, match=r"layer '0': rank selector 'budget' of plugin '.*' chose ranks "
                                               r"\(0,\); svd takes 1 rank"):
        compress_layer(nn.Linear(16, 24), "0", layer, settings, registry, ranks=(0,))
    assert compress_layer(nn.Linear(16, 24), "0", layer, settings, registry, ranks=(np.int64(4),))[1].ranks == (4,)


class WritingSelector(RankSelector):
    """Writes to the weights it is given (the layer's own storage when not protected) in the method ``writes``."""

    name = "writing"
    writes = "select"

    def write(self, source, method):
        if method == self.writes:
            (source.factors[0].weight if source.factors else source.weight).mul_(2.0)

    def check_layer(self, params, decomposer, source, stages):
        self.write(source, "check_layer")

    def select(self, decomposer, source, stage, params):
        self.write(source, "select")
        return (2,)

    def shortfall(self, decomposer, source, ranks, params):
        self.write(source, "shortfall")


class WritingBudget(WritingSelector):
    name = "writing_budget"
    scope = "model"
    writes = "allocate"

    def allocate(self, layers, totals, pass_index, n_passes, params, rounding=None):
        for layer in layers:
            self.write(layer.sources[0], "allocate")
        return Allocation({layer.name: (2,) for layer in layers}, "params", 2.0, 2.0)


@pytest.mark.parametrize(("selection", "writes"), [("writing", "select"), ("writing", "shortfall"),
                                                   ("writing", "check_layer"), ("writing_budget", "allocate")])
@pytest.mark.parametrize("layer", [nn.Linear(16, 16), nn.Conv2d(16, 16, 1, groups=2)])
def test_a_rank_selector_that_changes_its_input_is_refused_and_the_model_kept(monkeypatch, layer, selection,
                                                                               writes):
    # a selector's source used to share the layer's storage: one that normalized it in place had the layer
    # decomposed from the changed weights (a rank-2 chain of a doubled weight: 1.24x the layer's norm), unnoticed
    monkeypatch.setattr(WritingSelector, "writes", writes)
    registry = registry_with(("writing_plugin", plugin(musco_register_rank_selectors=[WritingSelector,
                                                                                      WritingBudget])))
    model = nn.Sequential(layer)
    x = torch.randn(2, 16) if isinstance(layer, nn.Linear) else torch.randn(1, 16, 5, 5)
    before = snapshot(model)
    message = (rf"layer '0': rank selector '{selection}' of plugin 'writing_plugin' changed "
               rf"source.(weight|factors\[0\].weight) in place; a rank selector must leave its input as it is")
    with pytest.raises(CompressionError, match=message):
        compressor = Compressor(model, model_compr_kwargs={"0": {"decomposition": "svd", "rank_selection": selection}},
                                example_input=x, inplace=True, progress=False, registry=registry)
        compressor.compression_step()
    assert_unchanged(model, before)



class StatsWritingSelector(RankSelector):
    """Scales the layer's input statistics it is given (shared, not copied: each is F x F)."""

    name = "stats_writing"

    def select(self, decomposer, source, stage, params):
        source.input_stats.second_moment.mul_(2.0)
        return (2,)


def test_a_rank_selector_that_changes_the_layers_statistics_is_refused_and_the_model_kept():
    # the statistics reach every plugin of the layer uncopied: a selector that rescaled them changed the whitening
    # the decomposition then used, unnoticed
    registry = registry_with(("stats_plugin", plugin(musco_register_rank_selectors=[StatsWritingSelector])))
    model, data = nn.Sequential(nn.Linear(16, 16)), [torch.randn(8, 16) for _ in range(2)]
    before = snapshot(model)
    with pytest.raises(CompressionError, match=r"layer '0': rank selector 'stats_writing' of plugin 'stats_plugin' "
                                               r"changed source.input_stats.second_moment in place"):
        compressor = Compressor(model, model_compr_kwargs={"0": {"decomposition": "whitened_svd",
                                                                 "rank_selection": "stats_writing"}},
                                calibration_data=data, example_input=data[0], inplace=True, progress=False,
                                registry=registry)
        compressor.compression_step()
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------------------------
# 4. Params must be an attrs class


class PlainParams:
    rate = 2.0


class PlainParamsSVD(SVD):
    name = "plain_params_svd"
    Params = PlainParams


def test_params_that_are_not_an_attrs_class_are_refused_at_registration():
    bad = plugin(musco_register_decompositions=[PlainParamsSVD])
    with pytest.raises(PluginError, match=r"plugin 'plain_params'.*PlainParamsSVD\.Params must be an attrs class"):
        registry_with(("plain_params", bad))
    reg = registry_with(("plain_params", bad), strict=False)  # a broken plugin is skipped, the others load
    assert "plain_params_svd" not in reg.decompositions.names() and "svd" in reg.decompositions.names()
    assert [failure.name for failure in reg.manager.failures] == ["plain_params"]
    assert "must be an attrs class" in reg.manager.failures[0].error


# --------------------------------------------------------------------------------------------------------------
# 5. a module reachable under two names


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = self.first  # the same module under a second name
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.second(torch.relu(self.first(x)))))


def test_layer_aliases_map_every_name_to_the_first(registry):
    assert layer_aliases(Shared()) == {"": "", "first": "first", "second": "first", "out": "out"}


def test_a_schedule_may_name_a_layer_by_either_name(registry, caplog):
    model, x = Shared(), torch.randn(2, 8)
    with caplog.at_level(logging.INFO, logger="musco_core.surgery"):
        compressor = Compressor(model, model_compr_kwargs={"second": manual(2)}, example_input=x, progress=False)
    assert compressor.lnames == ["first"] and list(compressor.model_compr_kwargs) == ["first"]
    assert any("'second'" in record.getMessage() and "'first'" in record.getMessage() for record in caplog.records)
    result, = compressor.compression_step()
    assert result.name == "first" and result.applied
    compressed = compressor.compressed_model
    assert compressed.first is compressed.second and compressed(x).shape == (2, 4)


def test_a_schedule_naming_both_names_of_one_module_is_refused():
    message = refused(Shared(), {"first": manual(4), "second": manual(2)},
                      r'\$\.layers\["second"\]: names the same module as \'first\'')
    assert "\n" not in message


# --------------------------------------------------------------------------------------------------------------
# 6. an example input the model cannot run


def test_an_example_input_the_model_cannot_run_is_one_line(registry):
    model = AuxHead()
    message = refused(model, {"fc": manual(2)}, r"example input of float32 \(1, 5\): the model's forward raised "
                                                r"RuntimeError", example_input=torch.randn(1, 5))
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"\{input: float32 \(2, 3\)\}.*TypeError"):
        ModelStats.from_model(model, registry, {"input": torch.randn(2, 3)})
