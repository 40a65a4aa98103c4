"""The example third-party plugin in examples/musco-spatial-svd, installed with pip as a user would (make install
does it): found through the `musco` entry-point group, exact against the math, usable from YAML, listed by
`musco plugins`, and its bad settings are ConfigErrors.

These tests install nothing: when the package is missing they fail, saying how to install it.
"""
from __future__ import annotations

import importlib
import importlib.metadata

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from musco_core import Compressor, ConfigError, FactorLayout, LayerSpec, WeightSource, default_registry
from musco_core.cli import main

INSTALL = "install it with `pip install ./examples/musco-spatial-svd` (make install does)"


def plugin():
    """The installed plugin module; a missing package is a failure, not a skip."""
    try:
        return importlib.import_module("musco_spatial_svd")
    except ImportError as exc:
        pytest.fail(f"the example plugin musco-spatial-svd is not importable ({exc}); {INSTALL}")


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def kernel_with_spectrum(out_channels, in_channels, kh, kw, singular_values, dtype=torch.float64):
    """A kernel W whose matrix M[(c, i), (o, j)] = W[o, c, i, j] has exactly these singular values."""
    generator = torch.Generator().manual_seed(1)
    rows, cols, k = in_channels * kh, out_channels * kw, len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=dtype))
    matrix = u @ torch.diag(torch.tensor(singular_values, dtype=dtype)) @ v.T
    return matrix.reshape(in_channels, kh, out_channels, kw).permute(2, 0, 1, 3).contiguous()


def write(tmp_path, layers, **settings):
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "settings": {"ft_every": 2, **settings}, "layers": layers}))
    return path


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected).detach() / torch.linalg.vector_norm(expected).detach())


def test_the_package_is_installed_and_registered():
    try:
        version = importlib.metadata.version("musco-spatial-svd")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the example plugin musco-spatial-svd is not installed; {INSTALL}")
    assert version == "0.1.0"
    registry = default_registry(strict=True)
    assert not [f for f in registry.manager.failures if "spatial" in f.name]
    sources = {(p.role, p.name): p.source for p in registry.provided()}
    for key in (("decomposition", "spatial_svd"), ("rank selector", "energy")):
        source = sources[key]
        assert (source.name, source.distribution, source.version) == ("spatial_svd", "musco-spatial-svd", "0.1.0")


def test_the_kernel_matrix_and_the_factors_have_the_documented_layout():
    module = plugin()
    weight = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    matrix = module._kernel_matrix(weight)
    assert matrix.shape == (4 * 3, 5 * 2)
    for o, c, i, j in ((0, 0, 0, 0), (4, 3, 2, 1), (2, 1, 0, 1), (3, 2, 1, 0)):
        assert matrix[c * 3 + i, o * 2 + j] == weight[o, c, i, j]
    decomposer = module.SpatialSVD()
    spec = LayerSpec("conv", 5, 4, (3, 2), (1, 1), (0, 0), (1, 1), has_bias=True)
    assert decomposer.layout(spec, (3,)) == [FactorLayout(3, 4, (3, 1), axes=(0,)),
                                             FactorLayout(5, 3, (1, 2), axes=(1,), bias=True)]
    source = WeightSource(spec, dense=weight)
    assert decomposer.max_ranks(source) == (10,)
    first, second = decomposer.decompose(source, (10,), decomposer.Params())
    assert (first.shape, second.shape, first.dtype) == ((10, 4, 3, 1), (5, 10, 1, 2), torch.float64)
    # sum_r first[r, c, i] * second[o, r, j] rebuilds W[o, c, i, j] at full rank
    torch.testing.assert_close(torch.einsum("rci,orj->ocij", first[..., 0], second[:, :, 0]), weight)
    for dtype in (torch.float16, torch.float32):  # computed in float32; the core casts to the layer's dtype
        factors = decomposer.decompose(WeightSource(spec, dense=weight.to(dtype)), (3,), decomposer.Params())
        assert [(w.dtype, w.shape) for w in factors] == [(torch.float32, (3, 4, 3, 1)), (torch.float32, (5, 3, 1, 2))]


@pytest.mark.parametrize("threshold,rank", [(0.0, 1), (0.75, 1), (0.76, 2), (0.95, 3), (0.99, 4), (1.0, 5)])
def test_energy_keeps_the_smallest_rank_holding_the_threshold(threshold, rank):
    module = plugin()
    # squared singular values 64, 16, 4, 1, 0.25 of 85.25: ranks 1..5 hold 0.751, 0.938, 0.985, 0.997, 1
    weight = kernel_with_spectrum(8, 6, 3, 3, [8.0, 4.0, 2.0, 1.0, 0.5])
    source = WeightSource(LayerSpec("conv", 8, 6, (3, 3), (1, 1), (1, 1), (1, 1)), dense=weight)
    energy, decomposer = module.Energy(), module.SpatialSVD()
    assert energy.select(decomposer, source, 0, module.EnergyParams(threshold)) == (rank,)
    zero = WeightSource(source.spec, dense=torch.zeros_like(weight))
    assert energy.select(decomposer, zero, 0, module.EnergyParams(threshold)) == (1,)


def test_a_yaml_schedule_naming_the_plugin_compresses_a_model(tmp_path):
    model, x = cnn().double().eval(), torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():  # a trained-like layer 2: its kernel matrix's energy is in 3 directions (+ small noise)
        planted = kernel_with_spectrum(32, 16, 3, 3, [8.0, 4.0, 2.0, 1.0, 0.5])
        model[2].weight.copy_(0.05 * (planted + 1e-3 * torch.randn_like(planted)))
    path = write(tmp_path, {
        "2": {"decomposition": "spatial_svd", "rank_selection": "energy", "energy_threshold": 0.95},
        "0": {"decomposition": "spatial_svd", "rank_selection": "manual", "manual_rank": [4]}})
    compressor = Compressor.from_yaml(model, path, example_input=x)
    results = {r.name: r for r in compressor.compression_step()}
    assert compressor.done
    assert {name: (r.applied, r.ranks) for name, r in results.items()} == {"2": (True, (3,)), "0": (True, (4,))}
    assert results["2"].relative_error < 0.15  # the rank-3 share of 0.985 of the energy: sqrt(1 - 0.985) ~ 0.12
    compressed = compressor.compressed_model
    assert [m.kernel_size for m in compressed[2]] == [(3, 1), (1, 3)]
    assert [m.stride for m in compressed[2]] == [(2, 1), (1, 2)]
    assert [m.dilation for m in compressed[2]] == [(2, 1), (1, 2)]
    assert [m.padding for m in compressed[2]] == [(2, 0), (0, 2)]
    assert [m.bias is not None for m in compressed[2]] == [False, True]
    assert [tuple(m.weight.shape) for m in compressed[0]] == [(4, 3, 3, 1), (16, 4, 1, 3)]
    assert compressed(x).shape == model(x).shape
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in model.parameters())
    assert compressed[2][0].weight.dtype == torch.float64


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2),
    lambda: nn.Conv2d(6, 5, (3, 4), stride=(2, 1), padding=(1, 3), dilation=(1, 2), padding_mode="circular"),
    lambda: nn.Conv2d(5, 7, (2, 5), stride=(1, 3), padding=(2, 1), dilation=(3, 1), bias=False),
    lambda: nn.Conv2d(4, 6, (3, 5), padding="same", dilation=(2, 1), padding_mode="reflect"),
    lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),  # the core decomposes each group on its own
], ids=["dilated-strided", "asymmetric-circular", "no-bias", "same-reflect", "grouped"])
def test_full_rank_spatial_svd_reproduces_the_layer(tmp_path, conv):
    torch.manual_seed(0)
    model = nn.Sequential(conv()).double().eval()
    layer = model[0]
    kh, kw = layer.kernel_size
    per_group_in, per_group_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
    full = min(per_group_in * kh, per_group_out * kw)
    x = torch.randn(2, layer.in_channels, 11, 13, dtype=torch.float64)
    path = write(tmp_path, {"0": {"decomposition": "spatial_svd", "rank_selection": "manual",
                                  "manual_rank": [full], "force": True}})
    compressor = Compressor.from_yaml(model, path, example_input=x)
    (result,) = compressor.compression_step()
    assert result.applied and result.ranks == (full,)
    assert result.relative_error < 1e-10
    assert relative_error(compressor.compressed_model(x), model(x)) < 1e-5
    assert [m.kernel_size for m in compressor.compressed_model[0]] == [(kh, 1), (1, kw)]


def test_compressing_twice_equals_one_truncation(tmp_path):
    model, x = cnn().double().eval(), torch.randn(2, 3, 12, 12, dtype=torch.float64)
    twice = write(tmp_path, {"2": {"decomposition": "spatial_svd", "rank_selection": "manual",
                                   "manual_rank": [12, 5]}}, nglobal_compress_iters=2)
    compressor = Compressor.from_yaml(model, twice)
    while not compressor.done:
        compressor.compression_step()
    assert compressor.ranks == {"2": (5,)}
    once = Compressor(model, model_compr_kwargs={"2": {"decomposition": "spatial_svd", "rank_selection": "manual",
                                                       "manual_rank": [5]}})
    once.compression_step()
    # truncating a truncated SVD keeps the leading singular triplets: the same layer as truncating once
    assert relative_error(compressor.compressed_model(x), once.compressed_model(x)) < 1e-8


def test_a_second_compression_is_limited_to_the_first_rank(tmp_path):
    model = cnn().double().eval()
    growing = write(tmp_path, {"2": {"decomposition": "spatial_svd", "rank_selection": "manual",
                                     "manual_rank": [12, 20]}}, nglobal_compress_iters=2)
    with pytest.raises(ConfigError, match=r'\$\.layers\["2"\]\.manual_rank\[1\]: \[20\] grows the layer'):
        Compressor.from_yaml(model, growing)  # the kernel matrix has rank 12 after stage 1: refused when loaded
    path = write(tmp_path, {"2": {"decomposition": "spatial_svd", "rank_selection": "manual",
                                  "manual_rank": [12, 12]}}, nglobal_compress_iters=2)
    compressor = Compressor.from_yaml(model, path)
    first, second = (compressor.compression_step()[0] for _ in range(2))
    assert (first.applied, first.ranks) == (True, (12,))
    assert (second.applied, second.ranks) == (False, None)  # kept: the kernel matrix has rank 12 now
    assert "at ranks (12,) would not be smaller" in second.note


def test_musco_plugins_lists_the_plugin():
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert ["decomposition", "spatial_svd", "spatial_svd", "musco-spatial-svd", "0.1.0"] in rows
    assert ["rank", "selector", "energy", "spatial_svd", "musco-spatial-svd", "0.1.0"] in rows


@pytest.mark.parametrize("layer,settings,message", [
    ("2", {"rank_selection": "energy", "energy_threshold": 1.5},
     r'\$\.layers\["2"\]\.energy_threshold: expected a number in \[0, 1\], got 1.5'),
    ("2", {"rank_selection": "energy", "energy": 0.5}, r'\$\.layers\["2"\]: unknown keys \[\'energy\'\]'),
    ("7", {"rank_selection": "manual", "manual_rank": [4]}, r'\$\.layers\["7"\]: .*spatial_svd needs a 2-d'),
    ("4", {"rank_selection": "manual", "manual_rank": [4]}, r'\$\.layers\["4"\]: .*spatial_svd needs a 2-d'),
    ("4", {"rank_selection": "energy"}, r'\$\.layers\["4"\]: .*spatial_svd needs a 2-d'),
    ("2", {"rank_selection": "manual", "manual_rank": [49]}, r'\$\.layers\["2"\]: manual_rank\[0\]: .*exceeds'),
])
def test_bad_plugin_settings_are_config_errors(tmp_path, layer, settings, message):
    path = write(tmp_path, {layer: {"decomposition": "spatial_svd", **settings}})
    with pytest.raises(ConfigError, match=message):
        Compressor.from_yaml(cnn(), path)


def test_energy_refuses_a_decomposition_without_rank_matrices(tmp_path):
    path = write(tmp_path, {"2": {"decomposition": "cp3", "rank_selection": "energy"}})
    with pytest.raises(ConfigError, match=r'\$\.layers\["2"\]: rank_selection \'energy\' cannot be used with '
                                          r'decomposition \'cp3\': it has no matrix unfoldings'):
        Compressor.from_yaml(cnn(), path)


def test_same_padding_with_an_even_kernel_is_refused_when_the_schedule_is_loaded(tmp_path):
    path = write(tmp_path, {"0": {"decomposition": "spatial_svd", "rank_selection": "manual", "manual_rank": [2]}})
    with pytest.raises(ConfigError, match=r'\$\.layers\["0"\]: .*padding=\'same\' with an even kernel'):
        Compressor.from_yaml(nn.Sequential(nn.Conv2d(3, 4, (3, 2), padding="same")), path)
