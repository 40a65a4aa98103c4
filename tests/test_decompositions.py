"""Every bundled decomposition against the math: exact at full rank, error falling with rank, geometry kept."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from musco_core import Compressor, ConfigError, FactorizedLayer
from musco_core.engine import compress_layer
from musco_core.schedule import LayerSchedule, RunSettings
from musco_plugins.rank_selectors import ManualParams


def compress_once(registry, layer, decomposition, ranks, *, x=None, force=True, stage=0):
    schedule = LayerSchedule(decomposition, "manual", ManualParams([tuple(ranks)] * (stage + 1)), stage, force)
    return compress_layer(layer, "layer", schedule, RunSettings(), registry,
                          tuple(x.shape) if x is not None else None)


def relative(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


CONV_CASES = [
    pytest.param(nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 9, 9), id="3x3-stride2"),
    pytest.param(nn.Conv2d(6, 10, 3, padding=2, dilation=2, bias=False), (2, 6, 9, 9), id="3x3-dilated"),
    pytest.param(nn.Conv2d(6, 10, (3, 5), stride=(1, 2), padding=(1, 2), padding_mode="reflect"), (2, 6, 9, 11),
                 id="3x5-reflect"),
    pytest.param(nn.Conv2d(6, 10, 3, padding="same"), (2, 6, 9, 9), id="3x3-same"),
]


@pytest.mark.parametrize("layer,shape", CONV_CASES)
def test_tucker2_full_rank_reproduces_conv(registry, layer, shape):
    x = torch.randn(shape, dtype=torch.float64)
    layer = layer.double()
    new, result = compress_once(registry, layer, "tucker2", (10, 6), x=x)
    assert isinstance(new, FactorizedLayer) and len(new) == 3
    assert relative(new(x), layer(x)) < 1e-10
    assert result.relative_error < 1e-10


@pytest.mark.parametrize("layer,shape", CONV_CASES)
@pytest.mark.parametrize("decomposition", ["cp3", "cp4"])
def test_cp_reproduces_a_kernel_of_exact_cp_rank(registry, layer, shape, decomposition):
    """A kernel that has CP rank 4 is recovered at rank 4 and the rebuilt layer computes the same output."""
    layer = layer.double()
    out_c, in_c, *kernel = layer.weight.shape
    g = torch.Generator().manual_seed(1)
    factors = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (out_c, in_c, *kernel)]
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("ar,br,cr,dr->abcd", *factors))
    x = torch.randn(shape, dtype=torch.float64)
    new, result = compress_once(registry, layer, decomposition, (4,), x=x)
    assert len(new) == (3 if decomposition == "cp3" else 4)
    assert result.relative_error < 1e-4
    assert relative(new(x), layer(x)) < 1e-4


@pytest.mark.parametrize("layer,shape", [
    pytest.param(nn.Linear(12, 20), (3, 12), id="linear-2d"),
    pytest.param(nn.Linear(12, 20, bias=False), (2, 5, 12), id="linear-3d-input"),
    pytest.param(nn.Conv2d(12, 20, 1, stride=2), (2, 12, 7, 7), id="1x1-stride2"),
    pytest.param(nn.Conv2d(12, 20, 1, padding=1), (2, 12, 5, 5), id="1x1-padded"),
    pytest.param(nn.Conv1d(12, 20, 1), (2, 12, 7), id="conv1d-1x1"),
])
def test_svd_full_rank_reproduces(registry, layer, shape):
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    new, _ = compress_once(registry, layer, "svd", (12,), x=x)
    assert relative(new(x), layer(x)) < 1e-10


@pytest.mark.parametrize("decomposition,layer,ranks", [
    ("svd", nn.Linear(32, 24), [(2,), (6,), (12,), (20,)]),
    ("tucker2", nn.Conv2d(16, 24, 3), [(4, 4), (8, 8), (16, 12), (24, 16)]),
    ("cp3", nn.Conv2d(16, 24, 3), [(2,), (8,), (32,), (64,)]),
    ("cp4", nn.Conv2d(16, 24, 3), [(2,), (8,), (32,), (64,)]),
])
def test_error_falls_as_rank_grows(registry, decomposition, layer, ranks):
    errors = [compress_once(registry, layer, decomposition, r)[1].relative_error for r in ranks]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-30])
@pytest.mark.parametrize("decomposition,ranks", [("svd", (4,)), ("tucker2", (6, 4)), ("cp3", (6,)), ("cp4", (6,))])
def test_the_reported_error_is_the_same_at_any_weight_scale(registry, decomposition, ranks, scale):
    # a ratio of norms: float32 norms of 1e20 weights overflowed (nan), of 1e-30 ones vanished (0.0)
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 1) if decomposition == "svd" else nn.Conv2d(8, 12, 3)
    error = compress_once(registry, layer, decomposition, ranks)[1].relative_error
    with torch.no_grad():
        layer.weight.mul_(scale)
    new, result = compress_once(registry, layer, decomposition, ranks)
    assert result.relative_error == pytest.approx(error, rel=1e-3)
    composed = torch.cat([p.detach().double().flatten() for p in new.parameters()])
    assert torch.isfinite(composed).all() and composed.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("decomposition,layer,ranks,shape", [
    ("tucker2", nn.Conv2d(8, 12, 3, padding=1), (6, 4), (1, 8, 6, 6)),
    ("cp4", nn.Conv2d(8, 12, 3, padding=1), (6,), (1, 8, 6, 6)),
    ("svd", nn.Linear(8, 12), (4,), (3, 8)),
])
def test_dtype_is_kept(registry, dtype, decomposition, layer, ranks, shape):
    layer = layer.to(dtype)
    new, _ = compress_once(registry, layer, decomposition, ranks)
    assert {p.dtype for p in new.parameters()} == {dtype}
    x = torch.randn(shape).to(dtype)
    assert new(x).dtype == dtype and new(x).shape == layer(x).shape


def test_conv1d_tucker2_and_cp3(registry):
    layer = nn.Conv1d(8, 12, 5, stride=2, padding=2).double()
    x = torch.randn(2, 8, 17, dtype=torch.float64)
    new, _ = compress_once(registry, layer, "tucker2", (12, 8), x=x)
    assert relative(new(x), layer(x)) < 1e-10
    new, _ = compress_once(registry, layer, "cp3", (6,), x=x)
    assert new(x).shape == layer(x).shape


def test_svd_puts_the_stride_on_the_first_factor(registry):
    """The original's defect 3: on a 256->512 stride-2 1x1 conv the first factor ran at full resolution."""
    layer = nn.Conv2d(256, 512, 1, stride=2, bias=False)
    x = torch.randn(1, 256, 14, 14)
    new, result = compress_once(registry, layer, "svd", (128,), x=x, force=False)
    assert new[0].stride == (2, 2) and new[1].stride == (1, 1)
    assert result.macs_after / result.macs_before == pytest.approx(0.75)
    assert new(x).shape == layer(x).shape


def test_dilated_conv_keeps_its_output_shape(registry):
    """The original's defect 2: dilation was dropped, changing the output shape."""
    layer = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
    x = torch.randn(1, 16, 10, 10)
    for decomposition, ranks in [("tucker2", (8, 8)), ("cp3", (8,)), ("cp4", (8,))]:
        new, _ = compress_once(registry, layer, decomposition, ranks, x=x)
        assert new(x).shape == layer(x).shape


def test_never_worse_keeps_a_layer_that_would_grow(registry):
    layer = nn.Conv2d(8, 8, 3)
    new, result = compress_once(registry, layer, "tucker2", (8, 8), x=torch.randn(1, 8, 5, 5), force=False)
    assert new is None and not result.applied
    assert "would not be smaller" in result.note


def test_ranks_above_the_dimensions_are_clamped_with_a_note(registry):
    new, result = compress_once(registry, nn.Linear(10, 6), "svd", (50,))
    assert result.ranks == (6,) and "clamped" in result.note
    assert new[0].out_features == 6


@pytest.mark.parametrize("decomposition,layer", [("svd", nn.Conv2d(8, 8, 3)), ("tucker2", nn.Linear(8, 8)),
                                                 ("cp3", nn.Conv2d(8, 8, 1)), ("cp4", nn.Conv1d(8, 8, 3))])
def test_a_decomposition_refuses_a_layer_it_cannot_represent(registry, decomposition, layer):
    """The original's defect 5: svd on a kxk conv silently used the centre tap."""
    model = nn.Sequential(layer)
    config = {"0": {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": [4]
                    if decomposition != "tucker2" else [[4, 4]]}}
    with pytest.raises(ConfigError, match=rf'\$.layers\["0"\].*{decomposition}'):
        Compressor(model, model_compr_kwargs=config, registry=registry)


@pytest.mark.parametrize("decomposition,layer,ranks,shape", [
    ("svd", nn.Linear(24, 20), [(8,), (6,), (3,)], (3, 24)),
    ("tucker2", nn.Conv2d(16, 24, 3, stride=2, padding=1), [(16, 12), (8, 8), (4, 4)], (2, 16, 8, 8)),
    ("cp3", nn.Conv2d(16, 24, 3, padding=1), [(24,), (12,), (4,)], (2, 16, 8, 8)),
    ("cp4", nn.Conv2d(16, 24, 3, padding=1), [(24,), (12,), (4,)], (2, 16, 8, 8)),
])
def test_three_stages_with_falling_ranks(registry, decomposition, layer, ranks, shape):
    """Multi-stage: each stage re-compresses the previous factors; bias, geometry and structure are kept."""
    x = torch.randn(shape)
    model = nn.Sequential(layer)
    config = {"0": {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": ranks}}
    compressor = Compressor(model, model_compr_kwargs=config, nglobal_compress_iters=3, example_input=x,
                            registry=registry)
    errors, params = [], []
    while not compressor.done:
        (result,) = compressor.compression_step()
        assert result.applied and result.ranks == ranks[result.stage]
        errors.append(relative(compressor.compressed_model(x), layer(x)))
        params.append(result.params_after)
        new = compressor.compressed_model[0]
        assert new.decomposition == decomposition and new.ranks == ranks[result.stage]
        bias_layers = [m for m in new if m.bias is not None]
        assert len(bias_layers) == 1 and torch.equal(bias_layers[0].bias, layer.bias)
    assert len(errors) == 3
    assert errors[0] <= errors[1] <= errors[2] and errors[2] < 1.0
    assert params[0] > params[1] > params[2]
    assert compressor.compressed_model(x).shape == layer(x).shape


def test_recompression_with_another_decomposition_starts_from_the_dense_weight(registry):
    layer = nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(1, 16, 6, 6)
    first, _ = compress_once(registry, layer, "tucker2", (16, 12), x=x)
    schedule = LayerSchedule("cp3", "manual", ManualParams([(8,), (8,)]), 1)
    second, result = compress_layer(first, "layer", schedule, RunSettings(), registry, tuple(x.shape))
    assert second.decomposition == "cp3" and len(second) == 3
    assert second(x).shape == layer(x).shape and result.applied
