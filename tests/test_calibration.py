"""Calibration statistics and the activation-aware (whitened) SVD fitted to them."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from musco_core import Compressor, ConfigError, FactorizedLayer, UnsupportedLayerError, calibration
from musco_core.calibration import InputStats, collect_input_stats, input_features
from musco_core.cli import main
from musco_core.engine import compress_layer, read_layer
from musco_core.factors import dense_weight
from musco_core.io import load_compressed, save_compressed
from musco_core.schedule import CalibrationMask, LayerSchedule, RunSettings, ScheduleCodec
from musco_plugins import factorize
from musco_plugins.rank_selectors import ManualParams, VBMFParams
from musco_plugins.whitened_svd import WhitenedSVDParams


def spec_of(registry, module):
    return read_layer(module, registry, "layer")[1].spec


def stats_of(registry, module, x):
    features = input_features(spec_of(registry, module), x).to(torch.float64)
    return InputStats(features.T @ features / features.shape[0], features.shape[0])


def relative(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def compress(registry, module, decomposition, rank, stats=None, *, selection="manual", force=True):
    params = ManualParams([(rank,)]) if selection == "manual" else VBMFParams()
    schedule = LayerSchedule(decomposition, selection, params, 0, force)
    return compress_layer(module, "layer", schedule, RunSettings(), registry, input_stats=stats)


def random_conv(seed: int):
    """A Conv1d/Conv2d with a random geometry: stride, padding (ints, 'same', 'valid'), mode, dilation, groups."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    dims = pick([1, 2])
    groups = pick([1, 2, 3])
    kernel = tuple(pick([1, 2, 3]) for _ in range(dims))
    padding = pick(["same", "valid", "ints"])
    stride = tuple(pick([1, 2]) for _ in range(dims)) if padding != "same" else (1,) * dims
    if padding == "ints":
        padding = tuple(pick([0, 1, 2]) for _ in range(dims))
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
    return conv(2 * groups, 3 * groups, kernel, stride=stride, padding=padding,
                dilation=tuple(pick([1, 2]) for _ in range(dims)), groups=groups,
                padding_mode=pick(["zeros", "reflect", "circular", "replicate"])).double()


def conv_output_from_features(registry, conv, x):
    spec = spec_of(registry, conv)
    weight = dense_weight(conv.weight.detach(), conv.groups).reshape(conv.out_channels, -1)
    return (weight @ input_features(spec, x).T).T  # (rows, out)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("seed", range(24))
def test_input_features_reproduce_random_convolutions(registry, seed):
    conv = random_conv(seed)
    x = torch.randn(2, conv.in_channels, *(9, 10)[-len(conv.kernel_size):], dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x) - conv.bias.view(1, -1, *(1,) * len(conv.kernel_size))
    rows = expected.movedim(1, -1).reshape(-1, conv.out_channels)
    assert torch.allclose(conv_output_from_features(registry, conv, x), rows, atol=1e-12), conv


def test_input_features_cover_the_named_geometries(registry):
    """The geometries the seeds above must not miss, spelled out: 'same' with reflect and circular, Conv1d."""
    convs = [nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"),
             nn.Conv2d(4, 6, (2, 3), padding="same", dilation=2, padding_mode="circular"),
             nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular"),
             nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect"),
             nn.Conv1d(4, 6, 3, stride=2, padding=1, padding_mode="replicate")]
    for conv in convs:
        conv = conv.double()
        x = torch.randn(2, 4, *(9, 11)[-len(conv.kernel_size):], dtype=torch.float64)
        with torch.no_grad():
            expected = (conv(x) - conv.bias.view(1, -1, *(1,) * len(conv.kernel_size))).movedim(1, -1)
        assert torch.allclose(conv_output_from_features(registry, conv, x), expected.reshape(-1, 6), atol=1e-12)
        unbatched = conv_output_from_features(registry, conv, x[0])
        assert torch.allclose(unbatched, expected[0].reshape(-1, 6), atol=1e-12)


def test_input_features_of_linear_on_b_t_c(registry):
    linear = nn.Linear(8, 5).double()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    features = input_features(spec_of(registry, linear), x)
    assert features.shape == (21, 8)
    with torch.no_grad():
        assert torch.allclose(features @ linear.weight.T + linear.bias, linear(x).reshape(-1, 5), atol=1e-12)


def test_conv3d_is_refused_naming_the_layer(registry):
    model = nn.Sequential(nn.Conv3d(2, 4, 3))
    spec = spec_of(registry, model[0])
    with pytest.raises(UnsupportedLayerError, match="only Linear layers and 1-D or 2-D"):
        input_features(spec, torch.randn(1, 2, 5, 5, 5))
    with pytest.raises(UnsupportedLayerError, match="layer '0'"):
        collect_input_stats(model, {"0": spec}, [torch.randn(1, 2, 5, 5, 5)], progress=False)


class TwoInputs(nn.Module):
    """A model called with two tensors (and a keyword), with a conv and a Linear on B x T x C."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.norm = nn.BatchNorm2d(4)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(4, 6)

    def forward(self, image, tokens, scale=1.0):
        pooled = self.dropout(self.norm(self.conv(image))).mean(dim=(2, 3))  # (B, 4)
        return self.head(tokens * scale + pooled[:, None, :])  # tokens: (B, T, 4)


def two_input_batches(n_batches=4, batch=3):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randn(batch, 5, 4, generator=g))
            for _ in range(n_batches)]


def test_stats_equal_those_of_the_concatenated_data_in_any_batch_form(registry, monkeypatch):
    model = TwoInputs()
    batches = two_input_batches()
    specs = {name: spec_of(registry, model.get_submodule(name)) for name in ("conv", "head")}
    stats = collect_input_stats(model, specs, batches, progress=False)
    # Reference: the layer inputs of all batches at once, from plain forward hooks.
    seen = {"conv": [], "head": []}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: seen[n].append(i[0]))
               for n in seen]
    model.eval()
    with torch.no_grad():
        for image, tokens in batches:
            model(image, tokens)
    for handle in handles:
        handle.remove()
    for name, spec in specs.items():
        features = input_features(spec, torch.cat(seen[name])).to(torch.float64)
        assert stats[name].count == features.shape[0]
        assert torch.allclose(stats[name].second_moment, features.T @ features / features.shape[0], atol=1e-12)
        assert stats[name].second_moment.dtype == torch.float64
    # Mappings are passed as keywords, and tiny chunks give the same sums.
    monkeypatch.setattr(calibration, "CHUNK_ELEMENTS", 50)
    as_dicts = [{"image": image, "tokens": tokens, "scale": 1.0} for image, tokens in batches]
    again = collect_input_stats(model, specs, as_dicts, progress=False)
    for name in specs:
        assert torch.allclose(again[name].second_moment, stats[name].second_moment, atol=1e-12)
        assert again[name].count == stats[name].count


def test_a_single_tensor_batch_is_passed_as_is(registry):
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(10, 4, dtype=torch.float64)
    model = model.double()
    stats = collect_input_stats(model, {"0": spec_of(registry, model[0])}, [x[:6], x[6:]], progress=False)
    assert torch.allclose(stats["0"].second_moment, x.T @ x / 10, atol=1e-12) and stats["0"].count == 10


def test_the_hook_keeps_only_f_by_f_sums(registry, monkeypatch):
    """Bounded memory: after every batch each accumulator holds one F x F tensor and no activations."""
    model = TwoInputs()
    specs = {name: spec_of(registry, model.get_submodule(name)) for name in ("conv", "head")}
    held = []

    class Watching(calibration.InputStatsAccumulator):
        def update(self, x):
            super().update(x)
            held.append((self.spec, [tuple(v.shape) for v in vars(self).values() if isinstance(v, torch.Tensor)]))

    monkeypatch.setattr(calibration, "InputStatsAccumulator", Watching)
    collect_input_stats(model, specs, two_input_batches(n_batches=6, batch=8), progress=False)
    assert len(held) == 12
    for spec, shapes in held:
        size = spec.in_channels * spec.kernel_numel
        assert shapes == [(size, size)]


def test_modes_restored_and_hooks_removed_even_on_error(registry):
    model = TwoInputs().train()
    model.norm.eval()
    specs = {"conv": spec_of(registry, model.conv)}
    running_mean = model.norm.running_mean.clone()
    collect_input_stats(model, specs, two_input_batches(), progress=False)
    assert model.training and model.dropout.training and not model.norm.training
    assert torch.equal(model.norm.running_mean, running_mean)  # eval mode: BatchNorm statistics untouched
    assert not model.conv._forward_pre_hooks
    bad = [(torch.randn(2, 5, 8, 8), torch.randn(2, 5, 4))]  # 5 channels where the conv takes 3
    with pytest.raises(ConfigError, match="calibration: the model failed on batch 0: RuntimeError"):
        collect_input_stats(model, specs, bad, progress=False)
    assert not model.conv._forward_pre_hooks and model.training and not model.norm.training


def test_bad_calibration_data_is_one_clear_error(registry):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    specs = {"0": spec_of(registry, model[0])}
    with pytest.raises(ConfigError, match="calibration data is empty.*'0'"):
        collect_input_stats(model, specs, [], progress=False)
    with pytest.raises(ConfigError, match="iterator.*list or a DataLoader"):
        collect_input_stats(model, specs, iter([torch.randn(2, 4)]), progress=False)
    with pytest.raises(ConfigError, match="expected an iterable of input batches"):
        collect_input_stats(model, specs, torch.randn(2, 4), progress=False)
    with pytest.raises(ConfigError, match="contain NaN or Inf"):
        collect_input_stats(model, specs, [torch.full((2, 4), math.nan)], progress=False)
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        collect_input_stats(model, {"nope": specs["0"]}, [torch.randn(2, 4)], progress=False)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    skips = Skips()
    specs = {name: spec_of(registry, skips.get_submodule(name)) for name in ("used", "unused")}
    with pytest.raises(ConfigError, match=r"layer\(s\) 'unused' never ran on the 1 calibration batch"):
        collect_input_stats(skips, specs, [torch.randn(2, 4)], progress=False)


class Keyworded(nn.Module):
    """Calls its first layer with the input as a keyword (``fc(input=x)``), or positionally."""

    def __init__(self, keyword: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head, self.keyword = nn.Linear(6, 8), nn.Linear(8, 3), keyword

    def forward(self, x):
        return self.head(torch.relu(self.fc(input=x) if self.keyword else self.fc(x)))


def test_a_layer_called_with_its_input_as_a_keyword_is_calibrated(registry):
    data = [torch.randn(5, 6) for _ in range(2)]
    layer = {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [2]}
    schedule = {"version": 1, "settings": {"ft_every": 2}, "layers": {"fc": layer, "head": layer}}
    stats, weights = [], []
    for keyword in (True, False):
        model = Keyworded(keyword)
        stats.append(collect_input_stats(model, {"fc": spec_of(registry, model.fc)}, data, progress=False)["fc"])
        compressor = Compressor(model, model_compr_kwargs=schedule, calibration_data=data, progress=False)
        compressor.compression_step()  # sequential: head's reference and actual inputs come from fc's calls
        weights.append(compressor.compressed_model.state_dict())
    assert torch.equal(stats[0].second_moment, stats[1].second_moment) and stats[0].count == stats[1].count
    assert all(torch.equal(weights[0][key], value) for key, value in weights[1].items())


def test_checking_a_dataloader_leaves_the_callers_random_state_alone():
    loader = torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=2, shuffle=True)
    before = torch.get_rng_state()
    calibration.check_reiterable(loader)  # iterating it would draw its base seed from the global generator
    assert torch.equal(torch.get_rng_state(), before)


def test_input_stats_of_a_group():
    moment = torch.arange(36.0, dtype=torch.float64).reshape(6, 6)
    stats = InputStats(moment, 7)
    assert torch.equal(stats.group(1, 3).second_moment, moment[2:4, 2:4]) and stats.group(1, 3).count == 7
    assert stats.group(1, 3).cross_moment is None and stats.group(1, 3).output_moment is None
    output = torch.arange(81.0, dtype=torch.float64).reshape(9, 9)  # out channels: 3 per group
    weighted = InputStats(moment, 7, moment + 1, output).group(1, 3)
    assert torch.equal(weighted.cross_moment, moment[2:4, 2:4] + 1) and torch.equal(weighted.output_moment,
                                                                                     output[3:6, 3:6])
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        stats.group(0, 4)


LAYERS = [
    pytest.param(lambda: nn.Linear(12, 10), (40, 3, 12), id="linear-BTC"),
    pytest.param(lambda: nn.Conv2d(6, 10, 1, stride=2, padding=1), (4, 6, 7, 7), id="1x1-stride2-padded"),
    pytest.param(lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1, padding_mode="reflect"), (4, 6, 9, 9),
                 id="3x3-stride2-reflect"),
    pytest.param(lambda: nn.Conv2d(6, 10, 3, padding="same", dilation=2, bias=False), (4, 6, 9, 9),
                 id="3x3-same-dilated"),
    pytest.param(lambda: nn.Conv1d(6, 10, 3, stride=2, padding=1, padding_mode="circular"), (4, 6, 15),
                 id="conv1d-circular"),
    pytest.param(lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (4, 6, 8, 8), id="3x3-groups2"),
]


@pytest.mark.parametrize("make,shape", LAYERS)
def test_whitened_svd_at_full_rank_reproduces_the_layer(registry, make, shape):
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    spec = spec_of(registry, layer)
    full = min(spec.out_channels // spec.groups, spec.in_channels // spec.groups * spec.kernel_numel)
    new, result = compress(registry, layer, "whitened_svd", full, stats_of(registry, layer, x))
    assert isinstance(new, FactorizedLayer) and len(new) == 2 and new.ranks == (full,)
    assert result.relative_error < 1e-9
    assert relative(new(x), layer(x)) < 1e-9
    first, second = new
    assert tuple(first.weight.shape[2:]) == tuple(spec.kernel_size) and first.bias is None
    assert (second.bias is not None) == spec.has_bias and set(second.weight.shape[2:]) <= {1}


def correlated(n_rows, n_features, dim=6, noise=0.01, seed=0):
    """Inputs on a `dim`-dimensional subspace plus small noise: strongly correlated features."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, n_features, generator=g, dtype=torch.float64)
    def sample(n):
        return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mixing + noise * torch.randn(
            n, n_features, generator=g, dtype=torch.float64)
    return sample(n_rows), sample(n_rows)


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_whitened_svd_beats_svd_on_correlated_inputs(registry, kind):
    """Same rank, same weight count: the output error on held-out inputs is far lower with whitening."""
    calibration_rows, held_out = correlated(400, 32)
    if kind == "linear":
        layer = nn.Linear(32, 24).double()
    else:
        layer = nn.Conv2d(32, 24, 1).double()
        calibration_rows = calibration_rows.reshape(4, 10, 10, 32).permute(0, 3, 1, 2)
        held_out = held_out.reshape(4, 10, 10, 32).permute(0, 3, 1, 2)
    stats = stats_of(registry, layer, calibration_rows)
    plain, plain_result = compress(registry, layer, "svd", 6)
    aware, aware_result = compress(registry, layer, "whitened_svd", 6, stats)
    assert plain_result.params_after == aware_result.params_after
    with torch.no_grad():
        expected = layer(held_out)
        plain_error, aware_error = relative(plain(held_out), expected), relative(aware(held_out), expected)
    assert plain_error > 0.3  # the weight itself has no low-rank structure
    assert aware_error / plain_error < 0.05


def test_singular_zero_and_indefinite_moments_give_finite_factors():
    weight = torch.randn(5, 8, dtype=torch.float64)
    v = torch.randn(8, 1, dtype=torch.float64)
    moments = {"zero": torch.zeros(8, 8, dtype=torch.float64), "rank one": v @ v.T,
               "indefinite": torch.diag(torch.tensor([1.0, -10.0, 0, 0, 0, 0, 0, 1.0], dtype=torch.float64))}
    for name, moment in moments.items():
        for damping in (0.0, 1e-6):
            root = factorize.whitening_factor(moment, damping)
            assert torch.isfinite(root).all() and torch.linalg.matrix_rank(root) == 8, name
            left, right = factorize.whitened_truncated_svd(weight, moment, 3, damping)
            assert torch.isfinite(left).all() and torch.isfinite(right).all(), name
    # Zero inputs: whitening by a multiple of the identity, so the result is plain truncated SVD.
    left, right = factorize.whitened_truncated_svd(weight, moments["zero"], 3)
    plain_left, plain_right = factorize.truncated_svd(weight, 3)
    assert torch.allclose(left @ right, plain_left @ plain_right, atol=1e-10)
    # A positive definite moment needs no ridge when damping is 0: S S^T is the moment itself.
    positive = torch.randn(8, 8, dtype=torch.float64)
    positive = positive @ positive.T + torch.eye(8, dtype=torch.float64)
    root = factorize.whitening_factor(positive, 0.0)
    assert torch.allclose(root @ root.T, positive, atol=1e-10)
    with pytest.raises(ValueError, match="NaN or Inf"):
        factorize.whitening_factor(torch.full((3, 3), math.nan))


def test_zero_calibration_inputs_give_a_finite_layer(registry):
    layer = nn.Conv2d(4, 6, 3, padding=1).double()
    new, _ = compress(registry, layer, "whitened_svd", 3, stats_of(registry, layer, torch.zeros(2, 4, 5, 5)))
    assert all(torch.isfinite(p).all() for p in new.parameters())


def test_whitened_svd_keeps_dtype_and_needs_stats(registry):
    for dtype in (torch.float32, torch.float64):
        layer = nn.Conv2d(6, 8, 3, padding=1).to(dtype)
        x = torch.randn(3, 6, 8, 8, dtype=dtype)
        new, _ = compress(registry, layer, "whitened_svd", 4, stats_of(registry, layer, x))
        assert {p.dtype for p in new.parameters()} == {dtype}
        assert {p.device for p in new.parameters()} == {layer.weight.device}
        assert new(x).dtype == dtype
    with pytest.raises(ConfigError, match="pass calibration_data .* or input_stats to compress_layer"):
        compress(registry, nn.Linear(8, 8), "whitened_svd", 2)


def test_vbmf_reads_the_whitened_spectrum(registry):
    """Inputs on a 6-dimensional subspace: the whitened matrix has rank about 6, the weight itself full rank."""
    layer = nn.Linear(32, 24).double()
    calibration_rows, _ = correlated(400, 32, noise=1e-4)
    new, _ = compress(registry, layer, "whitened_svd", None, stats_of(registry, layer, calibration_rows),
                      selection="vbmf")
    plain, _ = compress(registry, layer, "svd", None, selection="vbmf")
    assert new.ranks[0] < plain.ranks[0]


@pytest.mark.parametrize("damping", [1e-3, 0.1, 1.0])
def test_rank_selection_prices_the_whitened_fit_that_is_delivered(registry, monkeypatch, damping):
    # rank_matrices whitened with a ridge of 1e-6 whatever the run's damping (0.1 by default): on a 48x64 layer
    # with graded inputs it priced rank 16 at 0.5% of the whitened energy for a fit that gives up 4.3%
    selector = type(registry.rank_selectors.get("vbmf"))
    spectra = []

    def spying(self, decomposer, source, stage, params):
        spectra.append(torch.linalg.svdvals(decomposer.rank_matrices(source)[0]))
        return select(self, decomposer, source, stage, params)

    select = selector.select
    monkeypatch.setattr(selector, "select", spying)
    layer = nn.Linear(64, 48).double()
    x = torch.randn(2048, 64, dtype=torch.float64) * torch.logspace(0, -4, 64, dtype=torch.float64)
    stats = stats_of(registry, layer, x)
    settings = RunSettings(algo_kwargs={"whitened_svd": WhitenedSVDParams(damping=damping)})
    new, result = compress_layer(layer, "layer", LayerSchedule("whitened_svd", "vbmf", VBMFParams(), 0, True),
                                 settings, registry, input_stats=stats)
    (spectrum,) = spectra
    rank = result.ranks[0]
    root = factorize.whitening_factor(stats.second_moment, damping)
    weight, delivered = layer.weight.detach(), (new[1].weight @ new[0].weight).detach()
    given_up = float(((weight - delivered) @ root).norm() ** 2 / (weight @ root).norm() ** 2)
    assert given_up == pytest.approx(float((spectrum[rank:] ** 2).sum() / (spectrum ** 2).sum()), rel=1e-6)

def test_grouped_conv_uses_each_groups_statistics(registry):
    """Each group's factors come from that group's block of the statistics: compare with per-group layers."""
    layer = nn.Conv2d(6, 8, 3, padding=1, groups=2).double()
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64)
    x[:, 3:] = x[:, 3:4] + 0.01 * x[:, 3:]  # the second group's channels are nearly equal
    new, _ = compress(registry, layer, "whitened_svd", 2, stats_of(registry, layer, x))
    for g in range(2):
        single = nn.Conv2d(3, 4, 3, padding=1).double()
        with torch.no_grad():
            single.weight.copy_(layer.weight[4 * g:4 * (g + 1)])
            single.bias.copy_(layer.bias[4 * g:4 * (g + 1)])
        part = x[:, 3 * g:3 * (g + 1)]
        alone, _ = compress(registry, single, "whitened_svd", 2, stats_of(registry, single, part))
        with torch.no_grad():
            assert torch.allclose(new(x)[:, 4 * g:4 * (g + 1)], alone(part), atol=1e-10)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.pool(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_schedule_that_needs_statistics_without_calibration_data_is_refused(registry):
    schedule = {"fc1": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [8]},
                "fc2": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}}
    with pytest.raises(ConfigError, match=r"calibration_data: layer\(s\) 'fc1' use data-aware"):
        Compressor(Net(), model_compr_kwargs=schedule, registry=registry)
    with pytest.raises(ConfigError, match="iterator"):
        Compressor(Net(), model_compr_kwargs=schedule, registry=registry, calibration_data=iter([]))
    with pytest.raises(UnsupportedLayerError, match="whitened_svd cannot decompose.*1-D or 2-D"):
        registry.decompositions.get("whitened_svd").check(spec_of(registry, nn.Conv3d(2, 4, 3)))


def test_from_yaml_with_calibration_data_end_to_end(registry, tmp_path, monkeypatch):
    """Two stages: statistics are collected at each step on the model as it is then, for whitened layers only."""
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "settings": {"ft_every": 2, "nglobal_compress_iters": 2},
                                    "layers": {
                                        "conv": {"decomposition": "whitened_svd", "rank_selection": "manual",
                                                 "manual_rank": [10, 6]},
                                        "fc1": {"decomposition": "whitened_svd", "rank_selection": "vbmf",
                                                "vbmf_weakenen_factor": 0.5},
                                        "fc2": {"decomposition": "svd", "rank_selection": "manual",
                                                "manual_rank": [6, 4]}}}))
    model = Net()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    calls = []
    original = calibration.collect_input_stats

    def recording(model, layers, batches, **kwargs):
        calls.append((sorted(layers), {name: type(model.get_submodule(name)).__name__ for name in layers}))
        return original(model, layers, batches, **kwargs)

    monkeypatch.setattr("musco_core.run.collect_input_stats", recording)
    compressor = Compressor.from_yaml(model, path, registry=registry, calibration_data=batches, progress=False)
    while not compressor.done:
        compressor.compression_step()
    # sequential calibration: each layer's statistics when it comes up; fc1's are paired ones, after conv's swap
    assert calls[0] == (["conv"], {"conv": "Conv2d"})
    assert any(kinds == {"conv": "FactorizedLayer"} for _, kinds in calls)  # the re-compression saw the new layer
    assert all("fc2" not in names for names, _ in calls)
    applied = [r for r in compressor.history if r.applied]
    assert [r.ranks for r in applied if r.name == "conv"] == [(10,), (6,)]
    assert compressor.compressed_model.conv.ranks == (6,)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        out = compressor.compressed_model(x)
    assert torch.isfinite(out).all() and relative(out, expected) < 1.0
    save_compressed(compressor, tmp_path / "saved")
    loaded = load_compressed(Net(), tmp_path / "saved", registry)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_cli_compress_with_calibration(tmp_path, monkeypatch):
    (tmp_path / "calib_factories.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def mlp():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump({"version": 1, "layers": {
        "0": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [4]}}}))
    save_file({"inputs": torch.randn(50, 16)}, str(tmp_path / "calib.safetensors"))
    save_file({"a": torch.randn(5, 16), "b": torch.randn(6, 16)}, str(tmp_path / "two.safetensors"))
    args = ["compress", "--model", "calib_factories:mlp", "--config", str(tmp_path / "schedule.yaml"), "--quiet"]
    runner = CliRunner()
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "out"), "--calibration",
                                  str(tmp_path / "calib.safetensors"), "--calibration-batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "whitened_svd" in result.output and (tmp_path / "out" / "model.safetensors").exists()
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "out2")])
    assert result.exit_code == 2 and "calibration_data: layer(s) '0'" in result.output
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "out3"), "--calibration",
                                  str(tmp_path / "two.safetensors")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.endswith(f"--calibration {tmp_path / 'two.safetensors'}: its 2 tensors are the model's "
                                  f"keyword inputs, split along their first axis into batches, so they must have the "
                                  f"same first dimension (the number of inputs); got a (5, 16), b (6, 16)\n"), \
        result.output
    # one tensor's batches are tensors: a calibration_mask, which reads mapping batches, is one clear error
    (tmp_path / "masked.yaml").write_text(yaml.safe_dump({"version": 1, "settings": {
        "calibration_mask": {"key": "attention_mask", "layers": ["0"]}}, "layers": {
        "0": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [4]}}}))
    result = runner.invoke(main, [*args[:4], str(tmp_path / "masked.yaml"), "--quiet", "--out",
                                  str(tmp_path / "out4"), "--calibration", str(tmp_path / "calib.safetensors")])
    assert result.exit_code == 2 and "calibration_mask: batch 0 is a Tensor" in result.output, result.output


def seeded_net():
    torch.manual_seed(3)
    return Net()


def test_resume_collects_statistics_again_and_ends_like_an_uninterrupted_run(registry, tmp_path):
    schedule = {"conv": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [8]},
                "fc1": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [12]}}
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    whole = Compressor(seeded_net(), model_compr_kwargs=schedule, registry=registry, calibration_data=batches,
                       progress=False)
    while not whole.done:
        whole.compression_step()
    first = Compressor(seeded_net(), model_compr_kwargs=schedule, registry=registry, calibration_data=batches,
                       progress=False)
    first.compression_step()
    first.save_state(tmp_path / "state")
    with pytest.raises(ConfigError, match="calibration_data"):
        Compressor.resume(seeded_net(), tmp_path / "state", registry=registry, progress=False)
    resumed = Compressor.resume(seeded_net(), tmp_path / "state", registry=registry, progress=False,
                                calibration_data=batches)
    while not resumed.done:
        resumed.compression_step()
    expected, got = whole.compressed_model.state_dict(), resumed.compressed_model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


# --- padding left out of the statistics (settings.calibration_mask) ----------------------------------------------

class TokenEncoder(nn.Module):
    """Per-token layers over embedded ids (``encoder``), the output pooled over the real tokens (``head``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 12)
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12))
        self.head = nn.Linear(12, 6)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids))
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1))


SENTENCES = [3, 8, 5, 2, 7, 4, 6, 1]  # lengths


def sentences():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 40, (length,), generator=g) for length in SENTENCES]


def padded_batches(size=2):
    """The sentences in batches of ``size``, each padded with id 0 to its longest, mask 1 on the real tokens."""
    batches = []
    for start in range(0, len(SENTENCES), size):
        group = sentences()[start:start + size]
        ids = torch.zeros(len(group), max(map(len, group)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sentence in enumerate(group):
            ids[row, :len(sentence)], mask[row, :len(sentence)] = sentence, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def unpadded_batches():
    return [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in sentences()]


def mask_on(model, *layers):
    return calibration.token_mask(model, CalibrationMask("attention_mask", layers))


def encoder_specs(registry, model):
    return {name: spec_of(registry, model.get_submodule(name)) for name in ("encoder.0", "encoder.2", "head")}


def test_a_masked_second_moment_is_that_of_the_real_tokens(registry):
    """Brute force: the moment of the encoder layers' inputs at the real tokens only; the head (out of the mask's
    scope, one row per sentence) keeps every row. Without the mask the padding counts (52 rows for 36 real)."""
    torch.manual_seed(0)
    model, batches = TokenEncoder(), padded_batches()
    specs = encoder_specs(registry, model)
    stats = collect_input_stats(model, specs, batches, progress=False, mask=mask_on(model, "encoder"))
    with torch.no_grad():
        real = torch.cat([model.embed(b["input_ids"])[b["attention_mask"].bool()] for b in batches]).double()
        hidden = torch.relu(model.encoder[0](real.float())).double()
    assert stats["encoder.0"].count == sum(SENTENCES) == 36
    assert torch.allclose(stats["encoder.0"].second_moment, real.T @ real / len(real), atol=1e-12)
    assert torch.allclose(stats["encoder.2"].second_moment, hidden.T @ hidden / len(hidden), atol=1e-10)
    assert stats["head"].count == len(SENTENCES)
    plain = collect_input_stats(model, specs, padded_batches(), progress=False)
    assert plain["encoder.0"].count == 52 > 36
    assert relative(plain["encoder.0"].second_moment, stats["encoder.0"].second_moment) > 0.05


def test_padded_and_unpadded_sentences_give_the_same_statistics(registry):
    """Input, sequential (cross) and output moments alike."""
    torch.manual_seed(0)
    model = TokenEncoder()
    specs = encoder_specs(registry, model)
    mask = mask_on(model, r"re:encoder\.\d+")
    padded = collect_input_stats(model, specs, padded_batches(), progress=False, mask=mask)
    unpadded = collect_input_stats(model, specs, unpadded_batches(), progress=False, mask=mask)
    for name in specs:
        assert padded[name].count == unpadded[name].count
        assert torch.allclose(padded[name].second_moment, unpadded[name].second_moment, atol=1e-12)
    swap = {"encoder.0": nn.Linear(12, 16)}
    sequential = [calibration.collect_sequential_stats(model, {"encoder.2": specs["encoder.2"]}, swap, batches,
                                                       progress=False, mask=mask)["encoder.2"]
                  for batches in (padded_batches(), unpadded_batches())]
    assert sequential[0].count == sequential[1].count == 36
    assert torch.allclose(sequential[0].cross_moment, sequential[1].cross_moment, atol=1e-12)
    assert torch.allclose(sequential[0].second_moment, sequential[1].second_moment, atol=1e-12)


def test_a_masked_output_moment_counts_the_real_tokens_only(registry):
    """Brute force: a model whose output is the layer's own, so each row's gradient is the projection's noise."""
    model = nn.Linear(4, 3)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = model

        def forward(self, x, attention_mask):
            return self.layer(x)

    wrapper, mask = Tokens(), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    batch = {"x": torch.randn(2, 4, 4), "attention_mask": mask}
    moments = calibration.collect_output_moments(wrapper, {"layer": spec_of(registry, model)}, [batch],
                                                 projections=2, seed=7, progress=False, mask=mask_on(wrapper, "layer"))
    g = torch.Generator().manual_seed(7)
    noise = torch.cat([torch.randn(2, 4, 3, generator=g)[mask.bool()] for _ in range(2)]).double()
    assert torch.allclose(moments["layer"], noise.T @ noise / len(noise), atol=1e-6)


def test_whitened_svd_with_the_mask_on_padded_batches_matches_unpadded_batches(registry):
    """The compressed model is the same (to float rounding) whether the sentences come padded or one by one;
    without the mask the padding moves the fit."""
    torch.manual_seed(0)
    model = TokenEncoder()
    whitened = {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [5]}

    def compressed(batches, masked=True):
        settings = {"calibration_mask": {"key": "attention_mask", "layers": ["encoder"]}} if masked else {}
        schedule = {"version": 1, "settings": settings,
                    "layers": {"encoder.0": whitened, "encoder.2": whitened, "head": {**whitened, "manual_rank": [3]}}}
        compressor = Compressor(model, model_compr_kwargs=schedule, calibration_data=batches, registry=registry)
        compressor.compression_step()
        return compressor.compressed_model.state_dict()

    padded, unpadded = compressed(padded_batches()), compressed(unpadded_batches())
    assert all(torch.allclose(padded[key], unpadded[key], atol=1e-5) for key in padded)
    unmasked = compressed(padded_batches(), masked=False)
    assert not torch.allclose(unmasked["encoder.0.0.weight"], unpadded["encoder.0.0.weight"], atol=1e-3)


TOKEN_FACTORIES = """
import torch
from torch import nn


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 12)
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12))

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids))
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


def tokens():
    torch.manual_seed(0)
    return Tokens()
"""


def padded_file() -> dict[str, torch.Tensor]:
    """The sentences padded with id 0 to the longest of all, as one tokenizer call gives them, mask 1 on the real
    tokens: the integer tensors of a calibration file."""
    ids = torch.zeros(len(SENTENCES), max(SENTENCES), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sentence in enumerate(sentences()):
        ids[row, :len(sentence)], mask[row, :len(sentence)] = sentence, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def token_project(tmp_path, monkeypatch):
    (tmp_path / "token_factories.py").write_text(TOKEN_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    save_file(padded_file(), str(tmp_path / "tokens.safetensors"))
    yield tmp_path
    import sys
    sys.modules.pop("token_factories", None)


def token_schedule(masked: bool) -> dict:
    whitened = {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [5]}
    settings = {"calibration_mask": {"key": "attention_mask", "layers": ["encoder"]}} if masked else {}
    return {"version": 1, "settings": settings, "layers": {"encoder.0": whitened, "encoder.2": whitened}}


def compress_tokens(project, out: str, masked: bool, *extra: str):
    (project / f"{out}.yaml").write_text(yaml.safe_dump(token_schedule(masked)))
    return CliRunner().invoke(main, ["compress", "--model", "token_factories:tokens", "--config", f"{out}.yaml",
                                     "--out", out, "--calibration", "tokens.safetensors", "--calibration-batch-size",
                                     "3", "--quiet", *extra])


def test_cli_calibration_file_of_several_tensors_gives_keyword_batches(token_project):
    """A transformer is called as model(**batch) (input_ids and attention_mask): --calibration took one tensor only,
    so the CLI could neither compress it with whitened_svd nor leave the padding out (calibration_mask refused with
    "batch 0 is a Tensor"). A file of several tensors now gives the batches {name: tensor[i:i + b]}."""
    import token_factories

    runs = {}
    for masked in (False, True):
        result = compress_tokens(token_project, f"masked_{masked}", masked)
        assert result.exit_code == 0, result.output
        runs[masked] = load_compressed(token_factories.tokens(), token_project / f"masked_{masked}").state_dict()
    data = padded_file()
    batches = [dict(zip(data, parts)) for parts in zip(*(tensor.split(3) for tensor in data.values()))]
    assert [tuple(batch["input_ids"].shape) for batch in batches] == [(3, 8), (3, 8), (2, 8)]
    for masked, got in runs.items():  # as the library compresses the same batches
        compressor = Compressor(token_factories.tokens(), model_compr_kwargs=token_schedule(masked),
                                calibration_data=batches, progress=False)
        while not compressor.done:
            compressor.compression_step()
        expected = compressor.compressed_model.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.allclose(expected[key], got[key], atol=1e-6) for key in expected)
    assert not torch.allclose(runs[True]["encoder.0.0.weight"], runs[False]["encoder.0.0.weight"], atol=1e-3)


@pytest.mark.parametrize("tensors, message", [
    ({"input_ids": torch.zeros(8, 8, dtype=torch.long), "attention_mask": torch.ones(7, 8, dtype=torch.long)},
     "so they must have the same first dimension (the number of inputs); got attention_mask (7, 8), input_ids (8, 8)"),
    ({"input_ids": torch.zeros(8, 8, dtype=torch.long), "scale": torch.tensor(2.0)},
     "so they must have the same first dimension (the number of inputs); got input_ids (8, 8), scale ()"),
    ({"input_ids": torch.zeros(0, 8, dtype=torch.long), "attention_mask": torch.zeros(0, 8, dtype=torch.long)},
     "its 2 tensors hold no inputs (first dimension 0)"),
])
def test_cli_calibration_tensors_that_cannot_be_keyword_batches_are_one_error(token_project, tensors, message):
    save_file(tensors, "bad.safetensors")
    (token_project / "plain.yaml").write_text(yaml.safe_dump(token_schedule(False)))
    result = CliRunner().invoke(main, ["compress", "--model", "token_factories:tokens", "--config", "plain.yaml",
                                       "--out", "out", "--calibration", "bad.safetensors", "--quiet"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("musco: error: --calibration bad.safetensors: ") and message in result.output
    assert not (token_project / "out").exists()


def test_cli_distills_on_keyword_batches_of_integer_tensors(token_project):
    """--finetune distill checks its inputs are finite (integer ids and masks are) and runs the model on the first
    batch, as model(**batch); a model that cannot run on it names the batch's keys, dtypes and shapes."""
    result = compress_tokens(token_project, "distilled", True, "--finetune", "distill", "--distill-steps", "3")
    assert result.exit_code == 0, result.output
    data = padded_file()
    save_file({"input_ids": data["input_ids"], "mask": data["attention_mask"]}, "renamed.safetensors")
    (token_project / "plain.yaml").write_text(yaml.safe_dump(token_schedule(False)))
    result = CliRunner().invoke(main, ["compress", "--model", "token_factories:tokens", "--config", "plain.yaml",
                                       "--out", "out", "--calibration", "renamed.safetensors", "--finetune", "distill",
                                       "--quiet"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("musco: error: --calibration renamed.safetensors: --model cannot run on its first "
                                    "batch ({input_ids: int64 (8, 8), mask: int64 (8, 8)}): TypeError: "), result.output
    assert not (token_project / "out").exists()


def test_bad_masks_are_one_clear_error(registry):
    torch.manual_seed(0)
    model = TokenEncoder()
    specs = encoder_specs(registry, model)
    mask = mask_on(model, "encoder")
    good = padded_batches()[0]

    def refused(batch, match, layer_specs=specs, used=mask):
        with pytest.raises(ConfigError, match=match):
            collect_input_stats(model, layer_specs, [batch], progress=False, mask=used)

    refused((good["input_ids"], good["attention_mask"]), "calibration_mask: batch 0 is a tuple; the mask is read from "
                                                         "its key 'attention_mask'")
    refused({"input_ids": good["input_ids"], "attention_mask": good["attention_mask"]},
            "no key 'padding'", used=calibration.TokenMask("padding", mask.layers))
    refused({**good, "attention_mask": good["attention_mask"][0]}, r"'attention_mask' is \(8,\); expected a "
                                                                  r"\(batch, tokens\) tensor")
    refused({**good, "attention_mask": [[1, 0]]}, "'attention_mask' is list")
    refused({**good, "attention_mask": good["attention_mask"] * 2}, "values other than 0 and 1")
    refused({**good, "attention_mask": torch.zeros_like(good["attention_mask"])}, r"layer\(s\) 'encoder.0', "
            r"'encoder.2' never ran on the 1 calibration batch\(es\) or calibration_mask left them no real token")
    refused({**good, "attention_mask": good["attention_mask"][:, :7]},
            r"layer 'encoder.0' got an input of shape \(2, 8, 12\) on batch 0, where the mask 'attention_mask' is "
            r"\(2, 7\); a masked layer needs \(batch, tokens, features\) inputs of the mask's shape")

    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)

        def forward(self, x, mask):
            return self.layer(x.flatten(0, 1))

    flat = Flattening()
    with pytest.raises(ConfigError, match=r"layer 'layer' got an input of shape \(6, 3\) on batch 0, where the "
                                          r"mask 'mask' is \(2, 3\)"):
        collect_input_stats(flat, {"layer": spec_of(registry, flat.layer)},
                            [{"x": torch.randn(2, 3, 3), "mask": torch.ones(2, 3)}], progress=False,
                            mask=calibration.TokenMask("mask", frozenset({"layer"})))
    with pytest.raises(ConfigError, match=r"layer 'layer' got an output of shape \(6, 2\) on batch 0"):
        calibration.collect_output_moments(flat, {"layer": spec_of(registry, flat.layer)},
                                           [{"x": torch.randn(2, 3, 3), "mask": torch.ones(2, 3)}], progress=False,
                                           mask=calibration.TokenMask("mask", frozenset({"layer"})))
    conv = nn.Sequential(nn.Conv1d(3, 2, 1))
    with pytest.raises(ConfigError, match="calibration_mask: layer '0' is a .*no token axis"):
        collect_input_stats(conv, {"0": spec_of(registry, conv[0])}, [], progress=False,
                            mask=calibration.TokenMask("mask", frozenset({"0"})))
    seq_first = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0))
    with pytest.raises(ConfigError, match="layer '0.linear1' runs beside '0.self_attn', which has batch_first=False"):
        collect_input_stats(seq_first, {"0.linear1": spec_of(registry, seq_first[0].linear1)}, [], progress=False,
                            mask=calibration.token_mask(seq_first, CalibrationMask("mask", ("0",))))
    for selector, match in [("decoder", "calibration_mask.layers: 'decoder' is not a module of TokenEncoder"),
                            (r"re:decoder\..*", r"pattern 're:decoder\\\\..\*' matches no module"),
                            ("re:(", "is not a regular expression")]:
        with pytest.raises(ConfigError, match=match):
            mask_on(model, selector)


def test_the_mask_setting_round_trips_and_is_checked_against_the_model_and_batches(registry):
    whitened = {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [5]}
    schedule = {"version": 1, "settings": {"calibration_mask": {"key": "attention_mask", "layers": ["encoder"]}},
                "layers": {"encoder.0": whitened}}
    codec = ScheduleCodec(registry)
    loaded = codec.structure(schedule)
    assert loaded.settings.calibration_mask == CalibrationMask("attention_mask", ("encoder",))
    assert codec.structure(codec.unstructure(loaded)) == loaded
    assert "calibration_mask" not in codec.unstructure(codec.structure({"version": 1}))["settings"]
    with pytest.raises(ConfigError, match=r"\$.settings.calibration_mask.layers: expected a non-empty list"):
        codec.structure({"version": 1, "settings": {"calibration_mask": {"key": "attention_mask", "layers": []}}})
    wrong = {**schedule, "settings": {"calibration_mask": {"key": "attention_mask", "layers": ["decoder"]}}}
    with pytest.raises(ConfigError, match="calibration_mask.layers: 'decoder' is not a module of TokenEncoder"):
        Compressor(TokenEncoder(), model_compr_kwargs=wrong, calibration_data=padded_batches(), registry=registry)
    compressor = Compressor(TokenEncoder(), model_compr_kwargs=schedule, registry=registry,
                            calibration_data=[(b["input_ids"], b["attention_mask"]) for b in padded_batches()])
    with pytest.raises(ConfigError, match="calibration_mask: batch 0 is a tuple"):
        compressor.compression_step()
