"""Multi-stage runs: every decomposition shrinks a layer again at every pass, its rank chosen relative to the layer
as it is then (the factorized rank), not to the original layer's dimensions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models import make_trained_like, resnet18
from musco_core import Compressor, FactorizedLayer


def run(compressor: Compressor) -> Compressor:
    while not compressor.done:
        compressor.compression_step()
    return compressor


def ranks_by_pass(compressor: Compressor) -> dict[str, list]:
    by_layer: dict[str, list] = {}
    for result in compressor.history:
        by_layer.setdefault(result.name, []).append(result)
    return by_layer


def test_generated_vbmf_schedule_recompresses_the_layers_in_the_second_pass(registry):
    model = make_trained_like(resnet18(num_classes=10, width=32)).eval()
    compressor = run(Compressor(model, example_input=torch.randn(1, 3, 32, 32), config_type="vbmf",
                                nglobal_compress_iters=2, ft_every=100, registry=registry, progress=False))
    by_layer = ranks_by_pass(compressor)
    assert len(by_layer) == 20  # every conv (the 3-channel stem at r_in 3); the classifier is the output layer
    # every layer shrinks again, layer2.0.downsample.0 included (EVBMF on its 16 x 16 svd core found no rank)
    for name, (first, second) in by_layer.items():
        assert first.applied and second.applied, (name, first.note, second.note)
        assert all(b <= a for a, b in zip(first.ranks, second.ranks)), (name, first.ranks, second.ranks)
        assert any(b < a for a, b in zip(first.ranks, second.ranks)), (name, first.ranks, second.ranks)
        assert second.params_after < second.params_before == first.params_after, name
        assert second.note is None or "clamped" not in second.note, (name, second.note)  # not cut to the limits


def correlated(n: int, features: int, seed: int) -> torch.Tensor:
    """Inputs concentrated near a low-dimensional subspace, as real activations are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features // 3, features, generator=generator)
    return torch.randn(n, features // 3, generator=generator) @ mixing + 0.1 * torch.randn(n, features,
                                                                                            generator=generator)


CASES = [(decomposition, kind, selection) for decomposition, kind in
         [("svd", "linear"), ("whitened_svd", "linear"), ("tucker2", "conv"), ("whitened_svd", "conv"),
          ("cp3", "conv"), ("cp4", "conv")]
         for selection in ("vbmf", "param_reduction")
         if not (selection == "vbmf" and decomposition.startswith("cp"))]  # cp has no unfoldings for vbmf


@pytest.mark.parametrize("decomposition,kind,selection", CASES)
def test_each_decomposition_shrinks_again_in_every_pass(registry, decomposition, kind, selection):
    if kind == "linear":
        model = make_trained_like(nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 8)), seed=3)
        data = [correlated(64, 96, seed) for seed in range(3)]
    else:
        model = make_trained_like(nn.Sequential(nn.Conv2d(24, 40, 3, padding=1), nn.ReLU(),
                                                nn.Conv2d(40, 8, 1)), seed=3)
        data = [correlated(4 * 36, 24, seed).reshape(4, 6, 6, 24).permute(0, 3, 1, 2) for seed in range(3)]
    entry = {"decomposition": decomposition, "rank_selection": selection}
    n_passes = 3
    compressor = run(Compressor(model.eval(), model_compr_kwargs={"0": entry}, nglobal_compress_iters=n_passes,
                                example_input=data[0], registry=registry, progress=False,
                                calibration_data=data if decomposition == "whitened_svd" else None))
    passes = ranks_by_pass(compressor)["0"]
    assert [r.applied for r in passes] == [True] * n_passes, [r.note for r in passes]
    for earlier, later in zip(passes, passes[1:]):
        # no rank grows (tucker2's r_out stays at 32 in pass 2: vbmf's 27 is rounded up to a multiple of 8)
        assert all(b <= a for a, b in zip(earlier.ranks, later.ranks)), (earlier.ranks, later.ranks)
        assert later.params_after < later.params_before == earlier.params_after
    layer = compressor.compressed_model[0]
    assert isinstance(layer, FactorizedLayer) and layer.ranks == passes[-1].ranks
    with torch.no_grad():
        assert torch.isfinite(compressor.compressed_model(data[0])).all()


@pytest.mark.parametrize("decomposition,ranks", [("svd", (5,)), ("whitened_svd", (5,)), ("tucker2", (9, 7)),
                                                 ("cp3", (6,)), ("cp4", (6,))])
@pytest.mark.parametrize("groups", [1, 2])
def test_a_factorized_layer_can_at_most_keep_its_current_ranks(registry, decomposition, ranks, groups):
    """Also each group of a grouped layer (read dense, its limits were the group's size)."""
    from musco_core.calibration import InputStats
    from musco_core.engine import compress_layer, read_layer, split_groups
    from musco_core.schedule import LayerSchedule, RunSettings
    from musco_plugins.rank_selectors import ManualParams

    layer = nn.Conv2d(12 * groups, 16 * groups, 1 if decomposition == "svd" else 3, groups=groups)
    features = layer.weight[0].numel() * groups  # in_channels * kernel positions
    stats = InputStats(torch.eye(features, dtype=torch.float64), 1)
    schedule = LayerSchedule(decomposition, "manual", ManualParams([ranks]))
    new, _ = compress_layer(layer, "layer", schedule, RunSettings(), registry, input_stats=stats)
    _, source, _ = read_layer(new, registry, "layer")
    for group in split_groups(source)[1]:
        assert registry.decompositions.get(decomposition).max_ranks(group) == ranks


def planted(layer: nn.Module, ranks: tuple[int, ...], noise: float) -> nn.Module:
    """``layer``'s weight set to a planted low rank (Tucker ranks ``(r_out, r_in)`` for a conv) plus Gaussian noise."""
    generator = torch.Generator().manual_seed(0)
    weight = layer.weight
    out, inn = weight.shape[:2]
    if weight.dim() == 2:
        (rank,) = ranks
        signal = torch.randn(out, rank, generator=generator) @ torch.randn(rank, inn, generator=generator) / rank ** 0.5
    else:
        core = torch.randn(*ranks, *weight.shape[2:], generator=generator)
        signal = torch.einsum("abhw,oa,ib->oihw", core, torch.randn(out, ranks[0], generator=generator),
                              torch.randn(inn, ranks[1], generator=generator)) / (ranks[0] * ranks[1]) ** 0.5
    with torch.no_grad():
        weight.copy_(signal + noise * torch.randn(weight.shape, generator=generator))
    return layer


def vbmf_after_manual(registry, layer: nn.Module, decomposition: str, first: tuple[int, ...]):
    """The layer factorized at ``first`` ranks, then the result of a vbmf pass on it (factor 0.8, no rounding)."""
    from musco_core.calibration import InputStats
    from musco_core.engine import compress_layer
    from musco_core.schedule import LayerSchedule, RunSettings
    from musco_plugins.rank_selectors import ManualParams, VBMFParams

    stats = InputStats(torch.eye(layer.weight[0].numel(), dtype=torch.float64), 1)  # whitened_svd: plain inputs
    settings = RunSettings(rank_multiple=1)
    factorized, _ = compress_layer(layer, "layer", LayerSchedule(decomposition, "manual", ManualParams([first])),
                                   settings, registry, input_stats=stats)
    _, result = compress_layer(factorized, "layer", LayerSchedule(decomposition, "vbmf", VBMFParams(0.8)), settings,
                               registry, input_stats=stats)
    return result


# a signal rank above half the factorized rank: EVBMF on svd's r x r core (or on a tucker2 core's unfoldings) cannot
# see it, so pass 2 kept the svd layers at full rank (80 and 44) and cut the tucker2 layer below its signal (to 29)
@pytest.mark.parametrize("decomposition,shape,signal,first", [
    ("svd", (256, 512), (48,), (80,)), ("svd", (128, 128), (24,), (44,)), ("whitened_svd", (256, 512), (48,), (80,)),
    ("tucker2", (96, 64, 3, 3), (40, 30), (51, 36))])
def test_a_second_vbmf_pass_shrinks_a_layer_towards_its_signal_rank(registry, decomposition, shape, signal, first):
    layer = planted(nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2:]),
                    signal, noise=0.3)
    result = vbmf_after_manual(registry, layer, decomposition, first)
    assert result.applied, result.note
    # weakened towards the signal rank: about first - 0.8 (first - signal), never below the signal
    assert all(s <= r < f for s, r, f in zip(signal, result.ranks, first)), (result.ranks, signal, first)
    assert all(r <= f - 0.7 * (f - s) for s, r, f in zip(signal, result.ranks, first) if f - s > 8), result.ranks


@pytest.mark.parametrize("decomposition,shape,first", [("svd", (256, 512), (20,)), ("whitened_svd", (256, 512), (20,)),
                                                       ("tucker2", (96, 64, 3, 3), (20, 16))])
def test_vbmf_never_grows_a_factorized_layer(registry, decomposition, shape, first):
    """A layer factorized below its signal rank (48; Tucker (40, 30)) keeps at most its current ranks under vbmf
    (cp3 and cp4 have no vbmf; their limit is the test above)."""
    signal = (48,) if len(shape) == 2 else (40, 30)
    layer = planted(nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2:]),
                    signal, noise=0.3)
    result = vbmf_after_manual(registry, layer, decomposition, first)
    assert not result.applied or all(r <= f for r, f in zip(result.ranks, first)), (result.ranks, first)


@pytest.mark.parametrize("decomposition,shape,signals,first", [
    ("svd", (128, 128, 1, 1), [(24, 24), (16, 16)], (44,)),
    ("tucker2", (48, 32, 3, 3), [(20, 16), (12, 10)], (30, 24))])
def test_a_grouped_layer_is_ranked_at_every_pass_as_its_groups_alone(registry, decomposition, shape, signals, first):
    """A grouped layer gets at each pass the largest of the ranks its groups would get alone: in a later pass each
    group is read with its current factors (before, dense without them, so its limit was the group's size: two
    128 x 128 groups of a 1x1 conv at svd rank 44 got 60 in pass 2, and the layer was kept at 44 in every pass).
    The first pass is unchanged."""
    from musco_core.engine import compress_layer
    from musco_core.schedule import LayerSchedule, RunSettings
    from musco_plugins.rank_selectors import ManualParams, VBMFParams

    settings, vbmf = RunSettings(rank_multiple=1), LayerSchedule(decomposition, "vbmf", VBMFParams(0.8))
    manual = LayerSchedule(decomposition, "manual", ManualParams([first]))
    alone = [planted(nn.Conv2d(shape[1], shape[0], shape[2:]), signal, noise=0.3) for signal in signals]
    layer = nn.Conv2d(2 * shape[1], 2 * shape[0], shape[2:], groups=2)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([group.weight for group in alone]))

    def ranks(module: nn.Module, *schedules: LayerSchedule) -> tuple[int, ...]:
        for schedule in schedules:
            module, result = compress_layer(module, "layer", schedule, settings, registry)
            assert result.applied, result.note
        return result.ranks

    largest = tuple(map(max, zip(*(ranks(group, vbmf) for group in alone))))
    assert ranks(layer, vbmf) == largest
    second = [ranks(group, manual, vbmf) for group in alone]
    assert all(r < f for rank in second for r, f in zip(rank, first)), second  # each group alone shrinks again
    assert ranks(layer, manual, vbmf) == tuple(map(max, zip(*second)))


@pytest.mark.parametrize("decomposition,layer", [("svd", nn.Conv2d(128, 128, 1, groups=2)),
                                                 ("tucker2", nn.Conv2d(64, 96, 3, groups=2))])
def test_param_reduction_halves_a_grouped_layer_at_every_pass(registry, decomposition, layer):
    """Pass 2 halves the grouped layer's current weights (its groups were read dense, their count the group's
    size: svd at rank 16 got 16 again, and the layer was kept at 4096 weights in every pass)."""
    from musco_core.engine import compress_layer
    from musco_core.schedule import LayerSchedule, RunSettings
    from musco_plugins.rank_selectors import ParamReductionParams

    schedule = LayerSchedule(decomposition, "param_reduction", ParamReductionParams(2.0))
    first, _ = compress_layer(layer, "layer", schedule, RunSettings(rank_multiple=1), registry)
    _, result = compress_layer(first, "layer", schedule, RunSettings(rank_multiple=1), registry)
    assert result.applied and result.params_after <= result.params_before / 2, result.note
