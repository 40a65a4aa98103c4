"""Property tests over random layers and models: every decomposition keeps the layer's output shape, dtype and
gradients, and reports the weights and MACs an independent count finds, also when it compresses again; a run's
report, its untouched layers, its saved model and its resumes agree with the model it leaves."""
from __future__ import annotations

import copy
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from musco_core import Compressor, ConfigError, FactorizedLayer, UnsupportedLayerError
from musco_core.calibration import input_features
from musco_core.components import InputStats
from musco_core.engine import compress_layer, read_layer, split_groups
from musco_core.factors import dense_weight
from musco_core.io import load_compressed, save_compressed
from musco_core.run import count_params
from musco_core.schedule import LayerSchedule, RunSettings
from musco_plugins.rank_selectors import ManualParams

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
DECOMPOSITIONS = ("svd", "whitened_svd", "tucker2", "cp3", "cp4")
#: Largest relative output error of a chain at its full ranks, by dtype (the decomposers compute in float32 or 64).
FULL_RANK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def counted_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of the model's Linear and convolution layers on ``x``, counted by hooks: each output value costs one
    MAC per weight of its output channel."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        out_channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        total += output.numel() // out_channels * module.weight.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if type(m) in LAYERS]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return total


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@st.composite
def layers(draw, dims=(0, 1, 2, 3)):
    """A random Linear or Conv1d/2d/3d layer of a random dtype, and an input shape for it (batch 1, 2 or none; odd
    sizes)."""
    dim = draw(st.sampled_from(dims))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float64, torch.bfloat16, torch.float16]))
    bias = draw(st.booleans())
    if dim == 0:
        layer = nn.Linear(draw(st.integers(1, 9)), draw(st.integers(1, 9)), bias=bias)
        shape = (*(draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2)))), layer.in_features)
        return layer.to(dtype), shape
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    padding = draw(st.sampled_from(["ints", "same", "valid"]))
    if padding == "ints" or padding == "same" and any(s > 1 for s in stride):
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    layer = CONV[dim](groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4)), kernel, stride=stride,
                      padding=padding, dilation=dilation, groups=groups, bias=bias,
                      padding_mode=draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"])))
    size = tuple(d * (k - 1) + 3 + draw(st.integers(0, 3)) for d, k in zip(dilation, kernel))
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    return layer.to(dtype), (*batch, layer.in_channels, *size)


def random_input_stats(layer: nn.Module) -> InputStats:
    """A random positive definite second moment of the layer's input features."""
    features = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels * math.prod(layer.kernel_size)
    a = torch.randn(features, features + 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return InputStats(a @ a.T / (features + 2), 100)


def compress(registry, layer, decomposition, ranks, shape, *, stage=0, force=True):
    stats = random_input_stats(layer) if decomposition == "whitened_svd" else None
    schedule = LayerSchedule(decomposition, "manual", ManualParams([tuple(ranks)] * (stage + 1)), stage, force)
    return compress_layer(layer, "layer", schedule, RunSettings(rank_multiple=1), registry, tuple(shape),
                          input_stats=stats)


def check_chain(new: FactorizedLayer, result, layer: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> None:
    """The chain gives the layer's output shape and dtype, its weights and MACs are the result's, and it trains."""
    dtype = layer.weight.dtype
    out = new(x)
    assert out.shape == expected.shape and out.dtype == dtype
    assert {p.dtype for p in new.parameters()} == {dtype}
    assert result.params_after == sum(factor.weight.numel() for factor in new)
    assert result.macs_after == counted_macs(new, x)
    if dtype in FULL_RANK_TOLERANCE:
        probe = x.detach().clone().requires_grad_(True)
        new(probe).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in new.parameters())
        assert probe.grad is not None


@settings(max_examples=70, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(layers(), st.sampled_from(DECOMPOSITIONS), st.data())
def test_every_decomposition_of_any_layer_keeps_its_shape_and_counts_what_it_builds(registry, case, decomposition,
                                                                                     data):
    """Any decomposition at any ranks of a Linear or Conv1d/2d/3d layer (groups, stride, dilation, every padding and
    padding mode, bias or not, any dtype, batched or not) gives the layer's output shape and dtype, weights and MACs
    as counted on the modules, gradients; at its full ranks an exact decomposition gives the layer's output; a
    second compression by any decomposition counts from the first's chain and, unless forced, shrinks it."""
    layer, shape = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(layer.weight.dtype)
    expected = layer(x)
    decomposer = registry.decompositions.get(decomposition)
    ranks = tuple(data.draw(st.integers(1, 12), label="rank") for _ in decomposer.rank_names)
    try:
        new, result = compress(registry, layer, decomposition, ranks, shape)
    except UnsupportedLayerError:
        return  # e.g. svd of a k x k conv, cp of a Linear, whitened_svd of a Conv3d: refused by design
    assert result.params_before == layer.weight.numel() and result.macs_before == counted_macs(layer, x)
    check_chain(new, result, layer, x, expected)
    _, source, _ = read_layer(layer, registry, "layer")
    limits = decomposer.max_ranks(split_groups(source)[1][0])
    dtype = layer.weight.dtype
    if decomposer.exact_at_max_rank and dtype in FULL_RANK_TOLERANCE and all(map(int.__ge__, ranks, limits)):
        assert relative(new(x), expected) < 10 * FULL_RANK_TOLERANCE[dtype]
        assert result.relative_error < 10 * FULL_RANK_TOLERANCE[dtype]

    again = data.draw(st.sampled_from(DECOMPOSITIONS), label="second decomposition")
    ranks = tuple(data.draw(st.integers(1, 12), label="rank") for _ in registry.decompositions.get(again).rank_names)
    force = data.draw(st.booleans(), label="force")
    try:
        newer, second = compress(registry, new, again, ranks, shape, stage=1, force=force)
    except UnsupportedLayerError:
        return
    assert (second.params_before, second.macs_before) == (result.params_after, result.macs_after)
    if newer is not None:
        check_chain(newer, second, layer, x, expected)
        assert force or second.params_after < second.params_before and second.macs_after < second.macs_before


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(layers(dims=(0, 1, 2)))
def test_calibration_features_reproduce_the_layer(registry, case):
    """The features whitened_svd is fitted on are the layer's: the dense weight times them is its output without
    the bias, for every padding and padding mode, stride, dilation and groups, batched or not."""
    layer, shape = case
    layer = layer.double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, source, bias = read_layer(layer, registry, "layer")
    spec = source.spec
    got = input_features(spec, x) @ dense_weight(source.weight, spec.groups).reshape(spec.out_channels, -1).T
    output = layer(x) - (0 if bias is None else bias.reshape(-1, *(1,) * spec.spatial_dims))
    if spec.spatial_dims and output.dim() == spec.spatial_dims + 1:
        output = output.unsqueeze(0)
    expected = output.movedim(1, -1).reshape(-1, spec.out_channels) if spec.spatial_dims else output.reshape(
        -1, spec.out_channels)
    assert torch.allclose(got, expected, atol=1e-10)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@st.composite
def models(draw):
    """A small CNN of plain and residual blocks (stride, 1x1 and 3x3, bias or not) ending in Linear layers, and an
    input for it."""
    channels = first = draw(st.sampled_from([3, 8, 16]))
    size = start = draw(st.integers(4, 7))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        kernel = draw(st.sampled_from([1, 3]))
        if draw(st.booleans()):
            blocks.append(Residual(nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=kernel // 2),
                                                 nn.ReLU(), nn.Conv2d(channels, channels, 1, bias=False))))
            continue
        out, stride = draw(st.sampled_from([8, 16, 24])), draw(st.sampled_from([1, 2]))
        blocks += [nn.Conv2d(channels, out, kernel, stride=stride, padding=kernel // 2, bias=draw(st.booleans())),
                   nn.ReLU()]
        channels, size = out, (size - 1) // stride + 1
    blocks += [nn.Flatten(), nn.Linear(channels * size * size, 16), nn.ReLU(), nn.Linear(16, 3)]
    torch.manual_seed(draw(st.integers(0, 9)))
    model = nn.Sequential(*blocks).double().eval()
    with torch.no_grad():  # low rank plus noise, as trained weights are, so that vbmf finds ranks to cut
        for layer in model.modules():
            if type(layer) in LAYERS:
                matrix = layer.weight.view(layer.weight.shape[0], -1)
                rank = max(1, min(matrix.shape) // 3)
                matrix.copy_(torch.randn(matrix.shape[0], rank, dtype=torch.float64)
                             @ torch.randn(rank, matrix.shape[1], dtype=torch.float64) / matrix.shape[1]
                             + 0.01 * torch.randn_like(matrix))
    return model, torch.randn(1, first, start, start, dtype=torch.float64)


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(models(), st.sampled_from(["vbmf", "param_reduction", "budget"]), st.integers(1, 2))
def test_a_run_reports_the_model_it_leaves_saves_it_and_resumes_to_it(registry, tmp_path_factory, case, selection,
                                                                     iters):
    """Through every step of a multi-stage run: the report's totals are the counts of the model it leaves, a layer
    left alone is unchanged bit for bit, no applied compression grows a layer, the saved model loads back to the
    same outputs, and a run resumed after any step ends with the same ranks and outputs."""
    model, x = case
    algo = {"budget": {"reduction": 1.5}} if selection == "budget" else None
    arguments = dict(example_input=x, registry=registry, progress=False, ft_every=2, nglobal_compress_iters=iters)
    try:
        compressor = Compressor(model, config_type=selection, all_algo_kwargs=algo, **arguments)
    except ConfigError:
        return  # a budget out of reach of the layers it may compress
    folder = tmp_path_factory.mktemp("run")
    while not compressor.done:
        compressor.compression_step()
        compressor.save_state(folder / f"after-{compressor.curr_iter}")
    compressed, report = compressor.compressed_model, compressor.report()
    assert (report.params_before, report.params_after) == (count_params(model), count_params(compressed))
    assert (report.macs_before, report.macs_after) == (counted_macs(model, x), counted_macs(compressed, x))
    applied = {result.name for result in report.layers if result.applied}
    for name, layer in model.named_modules():
        if type(layer) in LAYERS and name not in applied:
            kept = compressed.get_submodule(name)
            assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), kept.parameters(), strict=True))
    assert all(r.params_after < r.params_before and r.macs_after < r.macs_before for r in report.layers if r.applied)
    save_compressed(compressor, folder / "out")
    assert torch.equal(load_compressed(copy.deepcopy(model), folder / "out", registry)(x), compressed(x))
    for step in range(1, compressor.curr_iter):
        resumed = Compressor.resume(copy.deepcopy(model), folder / f"after-{step}", example_input=x, registry=registry,
                                    progress=False)
        while not resumed.done:
            resumed.compression_step()
        assert resumed.ranks == compressor.ranks and torch.equal(resumed.compressed_model(x), compressed(x))
