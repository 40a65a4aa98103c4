"""whitened_svd's output weighting: the output moments the core collects, the weighted fit, and the run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from musco_core import Compressor, ConfigError, compress_blockwise
from musco_core.calibration import collect_output_moments
from musco_core.engine import read_layer
from musco_core.schedule import ScheduleCodec
from musco_plugins import factorize


def specs(registry, model, names):
    return {name: read_layer(model.get_submodule(name), registry, name)[1].spec for name in names}


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("kind", "projections"), [("linear", 1), ("linear", 8), ("conv", 1)])
def test_output_moments_estimate_the_jacobian_metric(registry, kind, projections):
    """For ``y = W2 (W1 x)``, the moment at the first layer's output is ``E[W2^T v v^T W2] = W2^T W2`` and at the
    model's output the identity; the random-projection estimate over 8,192 rows and projections is within a few
    percent. The model's training flags and requires_grad are restored and no parameter gets a .grad."""
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
        batches = [torch.randn(1024 // projections, 5) for _ in range(8)]
    else:
        model = nn.Sequential(nn.Conv2d(5, 4, 3, padding=1), nn.Conv2d(4, 3, 1))
        batches = [torch.randn(16, 5, 8, 8) for _ in range(8)]
    model.train()
    model[1].weight.requires_grad_(False)
    moments = collect_output_moments(model, specs(registry, model, ["0", "1"]), batches, projections=projections,
                                     seed=3, progress=False)
    second = model[1].weight.detach().double().reshape(3, 4)
    assert relative(moments["0"], second.T @ second) < 0.05
    assert relative(moments["1"], torch.eye(3, dtype=torch.float64)) < 0.05
    assert model.training and model[0].training and not model[1].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    again = collect_output_moments(model, specs(registry, model, ["0"]), batches, projections=projections, seed=3,
                                   progress=False)
    assert torch.equal(again["0"], moments["0"])  # deterministic given the seed


def test_an_in_place_activation_after_the_layer_does_not_change_its_output_moment(registry):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    in_place = nn.Sequential(plain[0], nn.ReLU(inplace=True), plain[2])
    batches = [torch.randn(64, 16) for _ in range(2)]
    moments = [collect_output_moments(model, specs(registry, model, ["0"]), batches, projections=2, seed=0,
                                      progress=False)["0"] for model in (plain, in_place)]
    torch.testing.assert_close(moments[1], moments[0], rtol=0, atol=0)


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_output_moments_do_not_depend_on_the_default_dtype(registry, default):
    """The same float32 model, data and seed give the same moments whatever torch.get_default_dtype() is (a user
    who loads an LLM in bfloat16 may set it): the projections are drawn in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [torch.randn(64, 16) for _ in range(2)]
    expected = collect_output_moments(model, specs(registry, model, ["0"]), batches, seed=0, progress=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = collect_output_moments(model, specs(registry, model, ["0"]), batches, seed=0, progress=False)
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(got["0"], expected["0"])


def test_output_moments_of_a_mapping_output_and_clear_errors(registry):
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            self.unused(x)
            return {"out": self.used(x), "ids": torch.zeros(2, dtype=torch.long)}

    model = Dict()
    batches = [torch.randn(8, 3)]
    moments = collect_output_moments(model, specs(registry, model, ["used"]), batches, progress=False)
    assert moments["used"].shape == (3, 3)
    with pytest.raises(ConfigError, match=r"does not depend on layer\(s\) 'unused'"):
        collect_output_moments(model, specs(registry, model, ["unused"]), batches, progress=False)
    with pytest.raises(ConfigError, match="calibration data is empty"):
        collect_output_moments(model, specs(registry, model, ["used"]), [], progress=False)
    with pytest.raises(ConfigError, match="model failed on batch 0: RuntimeError"):
        collect_output_moments(model, specs(registry, model, ["used"]), [torch.randn(2, 5)], progress=False)

    class FailsBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no gradient here")

    class BrokenBackward(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)

        def forward(self, x):
            return FailsBackward.apply(self.used(x))

    broken = BrokenBackward()
    with pytest.raises(ConfigError, match="output statistics: the model failed on batch 0: RuntimeError: no gradient"):
        collect_output_moments(broken, specs(registry, broken, ["used"]), [torch.randn(2, 3)] * 2, projections=3,
                               progress=False)


def test_the_output_weighted_fit_is_exact_at_full_rank_and_optimal_in_its_metric():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    inputs = torch.randn(200, 9, generator=generator, dtype=torch.float64) @ torch.randn(9, 9, generator=generator,
                                                                                        dtype=torch.float64)
    second = inputs.T @ inputs / 200
    mix = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    output = mix @ mix.T
    left, right = factorize.whitened_truncated_svd(matrix, second, 6, output_moment=output)
    torch.testing.assert_close(left @ right, matrix)
    root = factorize.whitening_factor(output, 0.1)

    def weighted_error(approximation):
        return float((root.T @ (matrix - approximation) @ inputs.T).norm())

    weighted = torch.matmul(*factorize.whitened_truncated_svd(matrix, second, 2, output_moment=output))
    plain = torch.matmul(*factorize.whitened_truncated_svd(matrix, second, 2))
    assert weighted_error(weighted) < 0.9 * weighted_error(plain)
    with pytest.raises(ValueError, match="output_moment must be 6 x 6"):
        factorize.whitened_truncated_svd(matrix, second, 2, output_moment=torch.eye(9))


def schedule(weighting: bool, calibration: str = "sequential") -> dict:
    return {"version": 1, "layers": {name: {"decomposition": "whitened_svd", "rank_selection": "manual",
                                            "manual_rank": [2], "force": True} for name in ("0", "2")},
            "settings": {"calibration": calibration,
                         "algo_kwargs": {"whitened_svd": {"output_weighting": weighting}}}}


@pytest.mark.parametrize("calibration", ["sequential", "independent"])
def test_output_weighting_keeps_what_the_next_layers_read(calibration):
    """The first layer's output feeds a layer that reads only two directions of it: at rank 2, weighting by the
    output keeps those and the model's output almost exactly, where fitting the layer's own output cannot."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Identity(), nn.Linear(8, 8), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(8))
        model[2].bias.zero_()
    batches = [torch.randn(64, 8) for _ in range(4)]
    x = torch.cat(batches)
    errors = {}
    for weighting in (False, True):
        compressor = Compressor(model, model_compr_kwargs=schedule(weighting, calibration), calibration_data=batches,
                                progress=False)
        compressor.compression_step()
        with torch.no_grad():
            errors[weighting] = relative(compressor.compressed_model(x), model(x))
    assert errors[True] < 0.2 * errors[False]


def test_a_factorized_layer_is_weighted_again_at_the_next_stage():
    """Multi-stage: the output moments of the second stage are taken on the factorized layers of the first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)).eval()
    data = schedule(True)
    data["layers"] = {"0": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [4, 2],
                            "force": True}}
    data["settings"]["nglobal_compress_iters"] = 2
    compressor = Compressor(model, model_compr_kwargs=data, calibration_data=[torch.randn(32, 8) for _ in range(2)],
                            progress=False)
    while not compressor.done:
        compressor.compression_step()
    assert [(r.stage, r.ranks, r.applied) for r in compressor.history] == [(0, (4,), True), (1, (2,), True)]
    assert all(p.requires_grad for p in compressor.compressed_model.parameters())


def test_the_setting_round_trips_and_blockwise_refuses_it(registry, tmp_path):
    codec = ScheduleCodec(registry)
    loaded = codec.structure(schedule(True), origin="schedule.yaml")
    assert loaded.settings.algo_kwargs["whitened_svd"].output_weighting is True
    assert codec.unstructure(loaded)["settings"]["algo_kwargs"]["whitened_svd"]["output_weighting"] is True
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ConfigError, match=r"layer\(s\) '0', '2' weigh their fit by the model's output"):
        compress_blockwise(model, schedule(True), ["0", "2"], tmp_path / "out", calibration_data=[torch.randn(4, 8)],
                           registry=registry)
    assert not (tmp_path / "out").exists()
