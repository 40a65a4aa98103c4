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
    # a spectrum in which EVBMF finds no signal above noise (rank 0: here layer2.0.downsample.0's 16 x 16 svd core,
    # which decays smoothly) keeps its full rank, as in the original, so that layer stays as it is
    kept = {name: second.note for name, (_, second) in by_layer.items() if not second.applied}
    assert kept == {"layer2.0.downsample.0": "kept as is: svd at ranks (16,) would not be smaller (1536 vs 1536 "
                                             "weights, 24576 vs 24576 MACs)"}
    for name, (first, second) in by_layer.items():
        if name in kept:
            continue
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
    # EVBMF finds no signal (rank 0, which keeps the layer) in the small spectra a third vbmf pass would see here
    n_passes = 2 if selection == "vbmf" else 3
    compressor = run(Compressor(model.eval(), model_compr_kwargs={"0": entry}, nglobal_compress_iters=n_passes,
                                example_input=data[0], registry=registry, progress=False,
                                calibration_data=data if decomposition == "whitened_svd" else None))
    passes = ranks_by_pass(compressor)["0"]
    assert [r.applied for r in passes] == [True] * n_passes, [r.note for r in passes]
    for earlier, later in zip(passes, passes[1:]):
        assert all(b < a for a, b in zip(earlier.ranks, later.ranks)), (earlier.ranks, later.ranks)
        assert later.params_after < later.params_before == earlier.params_after
    layer = compressor.compressed_model[0]
    assert isinstance(layer, FactorizedLayer) and layer.ranks == passes[-1].ranks
    with torch.no_grad():
        assert torch.isfinite(compressor.compressed_model(data[0])).all()


@pytest.mark.parametrize("decomposition,ranks", [("svd", (5,)), ("whitened_svd", (5,)), ("tucker2", (9, 7)),
                                                 ("cp3", (6,)), ("cp4", (6,))])
def test_a_factorized_layer_can_at_most_keep_its_current_ranks(registry, decomposition, ranks):
    from musco_core.calibration import InputStats
    from musco_core.engine import compress_layer, read_layer
    from musco_core.schedule import LayerSchedule, RunSettings
    from musco_plugins.rank_selectors import ManualParams

    layer = nn.Conv2d(12, 16, 1 if decomposition == "svd" else 3)
    features = layer.weight[0].numel()  # in_channels * kernel positions
    stats = InputStats(torch.eye(features, dtype=torch.float64), 1)
    schedule = LayerSchedule(decomposition, "manual", ManualParams([ranks]))
    new, _ = compress_layer(layer, "layer", schedule, RunSettings(), registry, input_stats=stats)
    _, source, _ = read_layer(new, registry, "layer")
    assert registry.decompositions.get(decomposition).max_ranks(source) == ranks
