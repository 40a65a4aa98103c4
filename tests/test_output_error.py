"""Data-aware damage: the output error of a rank from the input statistics, and a budget that allocates by it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from musco_core import Compressor, default_registry
from musco_core.calibration import collect_input_stats, input_features
from musco_core.components import Cost, Factor, InputStats, LayerChoice, WeightSource
from musco_core.engine import split_groups
from musco_core.stats import ModelStats
from musco_plugins import factorize
from musco_plugins.budget import damage_tails, layer_options
from musco_plugins.whitened_svd import OUTPUT_DAMPING

from models import make_trained_like


def correlated(rows: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, features, generator=generator, dtype=torch.float64)
            @ torch.randn(features, features, generator=generator, dtype=torch.float64))


def relative_output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((x @ (weight - approx).T).square().sum() / (x @ weight.T).square().sum())


@pytest.mark.parametrize(("rows", "cols"), [(12, 7), (7, 12)])
def test_the_svd_output_error_is_exact(rows, cols):
    weight = correlated(rows, cols, 0)
    x = correlated(500, cols, 1)
    tails = factorize.svd_output_error(weight, x.T @ x / len(x))
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    assert len(tails) == min(rows, cols) + 1
    for k in range(len(tails)):
        truth = relative_output_error(x, weight, u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
        assert float(tails[k]) == pytest.approx(truth, rel=1e-8, abs=1e-12)
    assert float(tails[0]) == pytest.approx(1.0) and float(tails[-1]) == 0.0
    assert (tails[1:] <= tails[:-1]).all()


def test_the_svd_output_error_differs_from_the_weight_energy_where_inputs_are_anisotropic():
    weight = correlated(8, 8, 2)
    x = correlated(300, 8, 3)
    x[:, 0] = 0.0  # a feature that never varies
    by_data = factorize.svd_output_error(weight, x.T @ x / len(x))
    energy = factorize.singular_values(weight).square()
    by_weights = 1 - torch.cat([torch.zeros(1, dtype=energy.dtype), energy.cumsum(0)]) / energy.sum()
    assert not torch.allclose(by_data, by_weights, atol=1e-3)


def hosvd_error(conv: nn.Conv2d, x: torch.Tensor, ranks: tuple[int, int]) -> float:
    """The true relative output error of the conv's HOSVD at ``ranks`` on inputs ``x`` (bias left out)."""
    weight = conv.weight.detach().to(torch.float64)
    core, u_out, u_in = factorize.tucker2(weight, ranks, n_iter=0)
    approx = torch.einsum("oc...,Oo,Cc->OC...", core, u_out, u_in)
    features = input_features(spec_of(conv), x).to(torch.float64)
    return relative_output_error(features, weight.reshape(len(weight), -1), approx.reshape(len(weight), -1))


def spec_of(conv: nn.Conv2d):
    return ModelStats.from_model(nn.Sequential(conv), default_registry()).layers["0"].spec


@pytest.fixture(scope="module")
def conv_and_data():
    torch.manual_seed(0)
    conv = make_trained_like(nn.Conv2d(6, 10, 3, padding=1, bias=False), decay=0.7).double()
    mixing = torch.randn(6, 6, dtype=torch.float64)
    x = torch.einsum("bchw,dc->bdhw", torch.randn(16, 6, 9, 9, dtype=torch.float64), mixing)
    stats = collect_input_stats(nn.Sequential(conv), {"0": spec_of(conv)}, [x], progress=False)["0"]
    return conv, x, stats.second_moment


def test_tucker2_output_errors_are_exact_for_each_mode_alone(conv_and_data):
    conv, x, moment = conv_and_data
    tails_out, tails_in = factorize.tucker2_output_error(conv.weight, moment)
    assert (len(tails_out), len(tails_in)) == (11, 7)
    for r_out in range(1, 11):
        assert float(tails_out[r_out]) == pytest.approx(hosvd_error(conv, x, (r_out, 6)), rel=1e-8, abs=1e-12)
    for r_in in range(1, 7):
        assert float(tails_in[r_in]) == pytest.approx(hosvd_error(conv, x, (10, r_in)), rel=1e-8, abs=1e-12)
    assert float(tails_out[-1]) == pytest.approx(0, abs=1e-12) and float(tails_in[-1]) == pytest.approx(0, abs=1e-12)
    assert float(tails_out[0]) == pytest.approx(1.0) and float(tails_in[0]) == pytest.approx(1.0)
    assert (tails_out[1:] <= tails_out[:-1] + 1e-12).all()


def test_tucker2_output_errors_of_both_modes_add_up_to_a_bound(conv_and_data):
    conv, x, moment = conv_and_data
    tails_out, tails_in = factorize.tucker2_output_error(conv.weight, moment)
    for ranks in [(3, 2), (5, 4), (8, 3), (9, 5)]:
        joint = hosvd_error(conv, x, ranks)
        assert max(float(tails_out[ranks[0]]), float(tails_in[ranks[1]])) - 1e-9 <= joint
        assert joint <= float(tails_out[ranks[0]] + tails_in[ranks[1]]) + 1e-9


def test_a_core_inside_a_chain_is_measured_through_its_outer_factors(conv_and_data):
    """Re-compression: the core sees the first factor's outputs and its error passes through the last factor."""
    conv, x, moment = conv_and_data
    generator = torch.Generator().manual_seed(4)
    first = torch.randn(5, 6, generator=generator, dtype=torch.float64)  # not orthonormal: fine-tuned factors
    last = torch.randn(10, 7, generator=generator, dtype=torch.float64)
    core = torch.randn(7, 5, 3, 3, generator=generator, dtype=torch.float64)
    inner = factorize.moment_through(first, moment, block=9)
    patches = input_features(spec_of(conv), x).to(torch.float64).reshape(-1, 6, 9)
    inner_features = torch.einsum("rc,nck->nrk", first, patches).reshape(-1, 45)
    assert torch.allclose(inner, inner_features.T @ inner_features / len(inner_features), rtol=1e-10)
    tails_out, tails_in = factorize.tucker2_output_error(core, inner, outer=last)
    whole = last @ core.reshape(7, -1)

    def error(ranks):
        small, u_out, u_in = factorize.tucker2(core, ranks, n_iter=0)
        approx = last @ torch.einsum("oc...,Oo,Cc->OC...", small, u_out, u_in).reshape(7, -1)
        return relative_output_error(inner_features, whole, approx)

    for r_out in (2, 3, 6):
        assert float(tails_out[r_out]) == pytest.approx(error((r_out, 5)), rel=1e-8, abs=1e-12)
    for r_in in (1, 2, 4):
        assert float(tails_in[r_in]) == pytest.approx(error((7, r_in)), rel=1e-8, abs=1e-12)


def test_the_budget_damage_is_the_output_error_with_statistics_and_the_weight_energy_without(conv_and_data, registry):
    conv, _, moment = conv_and_data
    tucker2 = registry.decompositions.get("tucker2")
    spec = spec_of(conv)
    plain = damage_tails(tucker2, WeightSource(spec, dense=conv.weight.detach()))
    aware = damage_tails(tucker2, WeightSource(spec, dense=conv.weight.detach(), input_stats=InputStats(moment, 1)))
    expected = factorize.tucker2_output_error(conv.weight, moment)
    assert all(torch.allclose(torch.from_numpy(a), e) for a, e in zip(aware, expected))
    assert not all(torch.allclose(torch.from_numpy(a), torch.from_numpy(p)[:len(a)], atol=1e-3)
                   for a, p in zip(aware, plain))


@pytest.mark.parametrize("weighted", [False, True])
def test_the_whitened_svd_damage_is_the_output_error_of_its_delivered_factors(registry, weighted):
    """Inputs near a 6-dimensional subspace of 32 features: the damped spectrum of ``W S`` priced rank 6 at 5.7%
    where the fit errs by 0.05% on the data; the damage is the error of the factors decompose delivers, at every
    rank, also weighted by an output moment and once factorized (re-compression truncates the dense product)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 32, generator=generator, dtype=torch.float64)
    x = (torch.randn(512, 6, generator=generator, dtype=torch.float64)
         @ torch.randn(6, 32, generator=generator, dtype=torch.float64)
         + 0.01 * torch.randn(512, 32, generator=generator, dtype=torch.float64))
    root = torch.randn(24, 24, generator=generator, dtype=torch.float64) if weighted else torch.eye(24)
    moment = root @ root.T if weighted else None
    whitened = registry.decompositions.get("whitened_svd")
    spec = ModelStats.from_model(nn.Sequential(nn.Linear(32, 24)), default_registry()).layers["0"].spec
    stats = InputStats(x.T @ x / len(x), len(x), output_moment=moment)
    source = WeightSource(spec, dense=weight, input_stats=stats, params=whitened.Params())
    factors = whitened.decompose(source, (12,), whitened.Params())
    again = WeightSource(spec, factors=[Factor(layout, f) for layout, f in zip(whitened.layout(spec, (12,)), factors)],
                         previous="whitened_svd", dense=factors[1] @ factors[0], input_stats=stats,
                         params=whitened.Params())
    # the output moment as the fit weighs with it, with its ridge
    metric = (factorize.whitening_factor(moment, OUTPUT_DAMPING).T if weighted
              else torch.eye(24, dtype=torch.float64))
    for src in (source, again):
        (tails,) = damage_tails(whitened, src)
        for rank in (2, 4, 6, 8, 12):
            left, right = whitened.decompose(src, (rank,), whitened.Params())[::-1]
            truth = relative_output_error(x, metric @ src.weight, metric @ left @ right)
            assert tails[rank] == pytest.approx(truth, rel=1e-6, abs=1e-12)
    assert damage_tails(whitened, source)[0][6] < 0.01


def test_the_whitened_output_error_refuses_a_cross_moment():
    # with one it priced against the refit map, not the layer: rank 16 of 16 at 0, where the fit missed the
    # layer's output on the reference inputs by 3.4%
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 24, generator=generator, dtype=torch.float64)
    x = torch.randn(256, 24, generator=generator, dtype=torch.float64)
    moment = x.T @ x / len(x)
    with pytest.raises(ValueError, match="cross_moment"):
        factorize.whitened_output_error(weight, moment, 0.1, cross_moment=moment)


def test_the_damage_of_a_grouped_layer_weighs_its_groups_by_their_output_energy(registry):
    """Group 0's inputs are 100x larger and its weights have output rank 4: tucker2 at (4, 8) loses nothing of its
    output and about a third of group 1's, under 1e-3 of the layer's (the plain mean of the groups said about 0.19)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False).double()
    x = torch.randn(8, 16, 6, 6, dtype=torch.float64)
    x[:, :8] *= 100.0
    with torch.no_grad():
        conv.weight[4:8] = torch.einsum("oi,i...->o...", torch.randn(4, 4, dtype=torch.float64), conv.weight[:4])
    spec, weight, _ = registry.adapter_for(conv).read(conv)
    stats = collect_input_stats(nn.Sequential(conv), {"0": spec}, [x], progress=False)["0"]
    tucker2 = registry.decompositions.get("tucker2")
    _, groups = split_groups(WeightSource(spec, dense=weight, input_stats=stats))
    choice = LayerChoice("0", tucker2, spec, tuple(groups), (), lambda ranks: Cost(1 if ranks else 10**6))
    options, _ = layer_options(choice, "params")
    approx = []
    for group in groups:
        first, core, last = tucker2.decompose(group, (4, 8), tucker2.Params())
        approx.append(torch.einsum("oc...,Oo,cC->OC...", core, last[..., 0, 0], first[..., 0, 0]))
    with torch.no_grad():
        truth = float((conv(x) - nn.functional.conv2d(x, torch.cat(approx), padding=1, groups=2)).square().sum()
                      / conv(x).square().sum())
    assert truth < 1e-3
    assert options.damage_of((4, 8)) == pytest.approx(truth, rel=1e-6)


class TwoInputs(nn.Module):
    """Two Linear layers, each on its own half of the input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x[..., :32]), self.b(x[..., 32:])], dim=-1)


@pytest.fixture(scope="module")
def two_inputs():
    torch.manual_seed(0)
    model = make_trained_like(TwoInputs(), decay=0.9).eval()
    with torch.no_grad():
        model.b.weight.copy_(model.a.weight)  # the same weights, so the same spectra
    _, _, vh = torch.linalg.svd(model.b.weight.detach())
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):  # b's inputs vary only along its 4 strongest input directions: the rest never varies
        a_half = torch.randn(64, 32, generator=generator)
        b_half = torch.randn(64, 4, generator=generator) @ vh[:4]
        batches.append(torch.cat([a_half, b_half], dim=-1))
    return model, batches


def compress_two_inputs(model, registry, calibration_data):
    schedule = {name: {"decomposition": "svd", "rank_selection": "budget"} for name in ("a", "b")}
    compressor = Compressor(model, model_compr_kwargs=schedule, ft_every=2, registry=registry, progress=False,
                            all_algo_kwargs={"budget": {"reduction": 2.0, "metric": "params", "scope": "compressed"}},
                            calibration_data=calibration_data)
    compressor.compression_step()
    return compressor


def test_with_calibration_data_a_budget_allocates_by_the_output_error(two_inputs, registry):
    model, batches = two_inputs
    by_weights = compress_two_inputs(model, registry, None)
    by_data = compress_two_inputs(model, registry, batches)
    assert by_weights.ranks["a"] == by_weights.ranks["b"]  # the same spectra
    assert by_data.ranks["b"][0] <= 4 < by_data.ranks["a"][0]  # b needs no more than its inputs span
    for compressor in (by_weights, by_data):
        assert compressor.report().params_ratio == pytest.approx(2.0)

    def output_error(compressor):
        with torch.no_grad():
            return sum(float((compressor.compressed_model(x) - model(x)).square().sum()) for x in batches)

    assert output_error(by_data) < 0.5 * output_error(by_weights)
    assert isinstance(model.a, nn.Linear) and isinstance(model.b, nn.Linear)  # the input model is untouched


def test_the_data_aware_allocation_is_deterministic(two_inputs, registry):
    model, batches = two_inputs
    assert compress_two_inputs(model, registry, batches).ranks == compress_two_inputs(model, registry, batches).ranks


def test_a_tucker2_budget_with_calibration_data_meets_its_target_over_two_passes(registry):
    torch.manual_seed(0)
    model = make_trained_like(nn.Sequential(nn.Conv2d(8, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3),
                                            nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1))).eval()
    batches = [torch.randn(4, 8, 10, 10) for _ in range(2)]
    schedule = {"version": 1,  # every rank: multiples of 8 alone are too coarse for 24 channels to land within 5%
                "layers": {name: {"decomposition": "tucker2", "rank_selection": "budget"} for name in ("0", "2", "4")},
                "settings": {"ft_every": 3, "nglobal_compress_iters": 2, "rank_multiple": 1, "algo_kwargs": {
                    "budget": {"reduction": 1.6, "metric": "flops", "min_rank_fraction": 0}}}}
    compressor = Compressor(model, example_input=batches[0], model_compr_kwargs=schedule, calibration_data=batches,
                            registry=registry, progress=False)
    while not compressor.done:
        compressor.compression_step()
    report = compressor.report()
    assert all(b.note.startswith("output layer(s) '4' kept") for b in report.budgets)  # nothing else to say
    assert 1.6 <= report.macs_ratio <= 1.6 * 1.05
    assert any(r.stage == 1 and r.applied for r in report.layers)  # the core of a chain was priced and re-compressed


def test_layers_whose_input_features_cannot_be_formed_are_priced_by_their_weights(registry, caplog):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv3d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1)).eval()

    x = torch.randn(2, 4, 4, 4, 4)
    schedule = {"version": 1, "settings": {"ft_every": 2, "algo_kwargs": {"budget": {"reduction": 1.5}}},
                "layers": {name: {"decomposition": "tucker2", "rank_selection": "budget"} for name in ("0", "2")}}
    ranks = []
    for data in (None, [x, x + 1]):
        compressor = Compressor(make(), example_input=x[:1], model_compr_kwargs=schedule, calibration_data=data,
                                registry=registry, progress=False)
        with caplog.at_level("INFO", logger="musco_core.allocation"):
            ranks.append([result.ranks for result in compressor.compression_step()])
    assert ranks[0] == ranks[1]
    assert [r.message for r in caplog.records if "priced by their weights" in r.message] == [
        "budget: layer(s) '0', '2' priced by their weights: calibration forms the input features of Linear layers "
        "and 1-D or 2-D convolutions only"]
