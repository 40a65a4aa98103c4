"""The Compressor facade: the original README's two examples, multi-stage stepping, safety of the user's data."""
from __future__ import annotations

import copy
import io
import math
import re
import threading
import warnings

import pytest
import torch
import yaml
from flopco import FlopCo
from torch import nn
from torch.nn.utils import prune

from models import make_trained_like, resnet18, resnet50
from musco_core import (CompressionError, Compressor, ConfigError, FactorizedLayer, ModelStats, MuscoError, Registry,
                        Scheduler, hookimpl, make_plugin_manager, optimize_for_inference, standardize_model)
from musco_core.io import load_compressed, save_compressed
from musco_core.surgery import deep_copy, distinct_numel, tied_parameters
from musco_plugins.svd import SVD


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_readme_quick_start():
    """The original README's Quick Start (ResNet-50, vbmf config, ft_every=5, two global iterations)."""
    model = make_trained_like(resnet50(num_classes=10, width=16)).eval()
    model_stats = FlopCo(model, img_size=(1, 3, 64, 64), device="cpu")

    compressor = Compressor(model,
                            model_stats,
                            ft_every=5,
                            nglobal_compress_iters=2,
                            config_type='vbmf')
    while not compressor.done:
        compressor.compression_step()
    standardize_model(compressor.compressed_model)
    compressed_model = compressor.compressed_model

    assert compressor.niters == math.ceil(2 * len(compressor.lnames) / 5)
    assert n_params(compressed_model) < n_params(model)
    assert not any(isinstance(m, FactorizedLayer) for m in compressed_model.modules())
    x = torch.randn(2, 3, 64, 64)
    assert compressed_model(x).shape == model(x).shape
    compressed = [r for r in compressor.history if r.applied]
    assert len(compressed) > len(compressor.lnames) // 2, "vbmf compressed too few layers of a trained-like model"


def test_readme_resnet18_schedule():
    """The original README's ResNet-18 schedule, unchanged apart from the import path."""
    model = make_trained_like(resnet18())
    device = "cpu"
    model_stats = FlopCo(model,
                         img_size=(1, 3, 128, 128),
                         device=device)
    model_compr_kwargs = {
        'layer3.1.conv2': {'decomposition': 'tucker2',
                           'rank_selection': 'manual',
                           'manual_rank': [(32, 32), (16, 16)],
                           'curr_compr_iter': 0
                           },
        'layer2.1.conv2': {'decomposition': 'tucker2',
                           'rank_selection': 'vbmf',
                           'vbmf_weakenen_factor': 0.9,
                           'curr_compr_iter': 0
                           },
        'layer1.1.conv2': {'decomposition': 'cp4',
                           'rank_selection': 'param_reduction',
                           'param_reduction_rate': 4,
                           'curr_compr_iter': 0
                           },
    }
    original_kwargs = copy.deepcopy(model_compr_kwargs)
    compressor = Compressor(copy.deepcopy(model),
                            model_stats,
                            ft_every=3,
                            nglobal_compress_iters=2,
                            model_compr_kwargs=model_compr_kwargs,
                            )
    while not compressor.done:
        compressor.compression_step()
    standardize_model(compressor.compressed_model)

    assert model_compr_kwargs == original_kwargs
    assert compressor.niters == 2
    assert compressor.ranks["layer3.1.conv2"] == (16, 16)
    cp4_stages = [r for r in compressor.history if r.name == "layer1.1.conv2"]
    # rate 4 of 64*64*3*3 weights at 134 weights per CP rank: 36864 / 4 / 134 -> 68, then 68*134 / 4 / 134 -> 17
    # (rank_multiple auto leaves param_reduction's ranks as the rate gives them)
    assert [r.ranks for r in cp4_stages] == [(68,), (17,)]
    assert all(r.applied for r in compressor.history)
    assert list(compressor.compressed_model.get_submodule("layer3.1.conv2")[1].weight.shape) == [16, 16, 3, 3]
    x = torch.randn(1, 3, 128, 128)
    assert compressor.compressed_model(x).shape == (1, 1000)
    assert compressor.model_compr_kwargs["layer3.1.conv2"]["curr_compr_iter"] == 2


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(48, 64, 1, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 40))


SMALL_CONFIG = {
    "2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[16, 12], [8, 8]]},
    "4": {"decomposition": "svd", "rank_selection": "param_reduction", "param_reduction_rate": 2},
    "7": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [12, 6]},
}


def test_input_model_and_config_are_left_alone(registry):
    model = small_cnn()
    before = copy.deepcopy(model)
    config = copy.deepcopy(SMALL_CONFIG)
    for _ in range(2):  # the same dict serves twice: the original mutated it and failed the second time
        compressor = Compressor(model, model_compr_kwargs=config, nglobal_compress_iters=2, ft_every=2,
                                example_input=torch.randn(1, 3, 8, 8), registry=registry)
        while not compressor.done:
            compressor.compression_step()
        assert config == SMALL_CONFIG
    assert_same_state(model, before)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]


def test_inplace_compresses_the_given_model(registry):
    model = small_cnn()
    compressor = Compressor(model, model_compr_kwargs=SMALL_CONFIG, inplace=True, ft_every=3, registry=registry)
    compressor.compression_step()
    assert compressor.compressed_model is model and isinstance(model[2], FactorizedLayer)


def _old_weight_norm(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated hook-based weight_norm, still in use
        nn.utils.weight_norm(model[2])  # its weight is a tensor computed from weight_g and weight_v


def _prune(model):
    prune.l1_unstructured(model[2], "weight", 0.5)  # its weight is weight_orig * weight_mask until a forward pass


def _lock(model):
    model.lock = threading.Lock()


@pytest.mark.parametrize(("attach", "why"), [
    (_old_weight_norm, "'2.weight' is a tensor computed from other tensors (not a leaf), which torch cannot "
                       "deep-copy; '2' (Linear): it has weight_norm (a pre-hook recomputes its weight from weight_g "
                       "and weight_v); call torch.nn.utils.remove_weight_norm on it first"),
    # the message named weight_norm and remove_weight_norm for a pruned layer too
    (_prune, "'2.weight' is a tensor computed from other tensors (not a leaf), which torch cannot deep-copy; '2' "
             "(Linear): it is pruned (torch.nn.utils.prune recomputes its weight from weight_orig and weight_mask "
             "before each call); call torch.nn.utils.prune.remove on it first"),
    (_lock, "copy.deepcopy raised TypeError: cannot pickle '_thread.lock' object"),
])
def test_a_model_that_cannot_be_copied_is_one_error_saying_what_to_do(registry, attach, why):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    attach(model)
    schedule = {"0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}}
    with pytest.raises(ConfigError) as info:
        Compressor(model, model_compr_kwargs=schedule, registry=registry, progress=False)
    message = str(info.value)
    assert message.startswith("Sequential cannot be deep-copied (Compressor copies the model unless inplace=True)")
    assert why in message and message.endswith("or pass inplace=True to compress the model itself")
    compressor = Compressor(model, model_compr_kwargs=schedule, inplace=True, registry=registry, progress=False)
    assert compressor.compression_step()[0].applied


def test_optimizing_or_loading_into_a_model_that_cannot_be_copied_is_one_error(registry, tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    compressor = Compressor(model, model_compr_kwargs={"0": {"decomposition": "svd", "rank_selection": "manual",
                                                             "manual_rank": [4]}}, registry=registry, progress=False)
    compressor.compression_step()
    save_compressed(compressor, tmp_path / "out")
    _lock(model)
    with pytest.raises(ConfigError, match=r"^Sequential cannot be deep-copied \(optimize_for_inference copies the "
                                          r"model unless inplace=True\): .*or pass inplace=True"):
        optimize_for_inference(model, progress=False)
    with pytest.raises(ConfigError, match=r"^Sequential cannot be deep-copied \(load_compressed copies the fresh "
                                          r"model it is given\)"):
        load_compressed(model, tmp_path / "out", registry)


def test_steps_cycle_and_compress_each_layer_nglobal_times(registry):
    compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, ft_every=2, nglobal_compress_iters=2,
                            example_input=torch.randn(1, 3, 8, 8), registry=registry)
    assert compressor.niters == 3 and compressor.ft_every == 2
    steps = []
    while not compressor.done:
        steps.append([r.name for r in compressor.compression_step()])
    assert steps == [["2", "4"], ["7", "2"], ["4", "7"]]
    assert compressor.ranks == {"2": (8, 8), "4": compressor.history[-2].ranks, "7": (6,)}
    with pytest.raises(MuscoError, match="done"):
        compressor.compression_step()


def test_a_generated_schedule_is_generated_once(registry, caplog):
    """The Compressor generated it twice (the layers, then the reasons), logging each left-out layer twice."""
    with caplog.at_level("INFO", logger="musco_core.config"):
        compressor = Compressor(small_cnn(), config_type="vbmf", example_input=torch.randn(1, 3, 8, 8),
                                registry=registry, progress=False)
    left_out = [record.getMessage() for record in caplog.records if "left uncompressed" in record.getMessage()]
    assert len(left_out) == len(set(left_out)) == 1 and compressor.lnames == ["0", "2", "4"]  # the output layer


def test_zero_ft_every_and_nglobal_compress_iters_mean_what_they_meant_in_the_original(registry):
    """The original took them (any false value) for its defaults: every layer in one step, each compressed once;
    they were refused ('expected a positive int, got 0')."""
    def steps(**arguments):
        compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, registry=registry, progress=False,
                                **arguments)
        return compressor.initial_schedule.settings, compressor.state.steps

    assert steps(ft_every=0) == steps(ft_every=None) and steps(ft_every=0)[0].ft_every == 3
    assert steps(nglobal_compress_iters=0) == steps() and steps(nglobal_compress_iters=0)[0].nglobal_compress_iters == 1
    assert steps(ft_every=0, nglobal_compress_iters=0) == steps(ft_every=None, nglobal_compress_iters=1)


@pytest.mark.parametrize(("argument", "expected"), [
    ({"nglobal_compress_iters": -1}, "Compressor(nglobal_compress_iters=...): expected a positive int, got -1; pass "
                                     "1, None or 0 to compress each layer once"),
    ({"nglobal_compress_iters": False}, "Compressor(nglobal_compress_iters=...): expected a positive int, got False; "
                                        "pass 1, None or 0 to compress each layer once"),
    ({"all_algo_kwargs": []}, "Compressor(all_algo_kwargs=...): expected a mapping of decomposition names, got []"),
    ({"all_algo_kwargs": {"svd": {"bogus": 1}}},
     "Compressor(all_algo_kwargs=...): $[\"svd\"]: unknown keys ['bogus']; it takes no settings"),
    ({"all_algo_kwargs": {"cp3": {"n_iter_max": 5000, "init": "random"}}},
     "Compressor(all_algo_kwargs=...): $[\"cp3\"]: unknown keys ['init']; expected ['n_iter_max', 'tol']"),
    ({"ft_every": False}, "Compressor(ft_every=...): expected a positive int, got False; pass None or 0 to compress "
                          "every layer in one step"),
])
def test_a_bad_keyword_argument_is_one_error_naming_it(registry, argument, expected):
    """False or [] are not the default (None, or the original's 0): each is refused, named by the argument the user
    wrote, with what to pass for the default, and an unknown algo_kwargs key with the keys accepted."""
    with pytest.raises(ConfigError) as info:
        Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, registry=registry, **argument)
    assert str(info.value) == expected


@pytest.mark.parametrize(("arguments", "named"), [
    ({"ft_every": True}, ["ft_every"]),
    ({"seed": False}, ["seed"]),
    ({"ft_every": 1.0, "nglobal_compress_iters": False}, ["ft_every", "nglobal_compress_iters"]),
    ({"all_algo_kwargs": {}}, ["all_algo_kwargs"]),
    ({"config_type": "vbmf"}, ["config_type"]),
    ({"ft_every": None, "config_type": "param_reduction"}, ["ft_every", "config_type"]),
])
def test_run_arguments_beside_a_full_schedule_are_refused_naming_each(registry, arguments, named):
    """A full schedule's settings and layers apply, so an argument the run would ignore is refused: True is no
    ft_every=1 and False no seed=0, and a config_type would not fill in its layers. The defaults, given explicitly,
    are accepted."""
    schedule = {"version": 1, "layers": SMALL_CONFIG}
    with pytest.raises(ConfigError) as info:
        Compressor(small_cnn(), model_compr_kwargs=schedule, registry=registry, **arguments)
    lines = str(info.value).splitlines()
    assert [line.split("=")[0] for line in lines] == [f"Compressor({name}" for name in named]
    assert all("model_compr_kwargs is a full schedule" in line for line in lines)
    Compressor(small_cnn(), model_compr_kwargs=schedule, registry=registry, ft_every=1, seed=0, progress=False)


def test_config_type_fills_in_the_layers_an_original_dict_leaves_out(registry):
    """As in the original, the dict updates the layers generated for config_type: a layer it names takes its
    settings (None leaves it out), the others keep the generated ones, and the generated layers left out keep their
    reasons unless the dict names them."""
    x = torch.randn(1, 3, 8, 8)
    compressor = Compressor(small_cnn(), None, {"7": SMALL_CONFIG["7"], "2": SMALL_CONFIG["2"]},
                            config_type="param_reduction", example_input=x, registry=registry, progress=False)
    assert compressor.lnames == ["0", "2", "4", "7"]
    assert [compressor.schedule.layers[name].rank_selection for name in compressor.lnames] == [
        "param_reduction", "manual", "param_reduction", "manual"]
    assert list(compressor.state.left_out) == []  # the output layer "7" is named, so compressed
    compressor = Compressor(small_cnn(), None, {"4": None, "2": SMALL_CONFIG["2"]}, config_type="param_reduction",
                            example_input=x, registry=registry, progress=False)
    assert compressor.lnames == ["0", "2"] and list(compressor.state.left_out) == ["7"]


def test_an_original_dict_is_compressed_in_model_order_a_full_schedule_in_its_own(registry):
    """The original compressed the layers in model order whatever order its dict listed them in (as the original
    README's example, deepest first); a versioned schedule keeps its own order."""
    reverse = dict(reversed(SMALL_CONFIG.items()))
    compressor = Compressor(small_cnn(), None, reverse, nglobal_compress_iters=2, registry=registry, progress=False)
    assert compressor.lnames == ["2", "4", "7"] and list(compressor.model_compr_kwargs) == ["2", "4", "7"]
    assert compressor.state.steps == (("2",), ("4",), ("7",), ("2",), ("4",), ("7",))
    compressor = Compressor(small_cnn(), None, {"version": 1, "layers": reverse}, registry=registry, progress=False)
    assert compressor.lnames == ["7", "4", "2"]


def test_an_original_dict_in_a_yaml_file_is_taken_as_the_constructor_takes_it(tmp_path, registry):
    # from_yaml kept the file's order (7, 4, 2) and refused ft_every= beside it, as for a versioned schedule
    path = tmp_path / "original.yaml"
    path.write_text(yaml.safe_dump(dict(reversed(SMALL_CONFIG.items())), sort_keys=False))
    compressor = Compressor.from_yaml(small_cnn(), path, ft_every=None, registry=registry, progress=False)
    assert compressor.lnames == ["2", "4", "7"] and compressor.state.steps == (("2", "4", "7"),)
    path.write_text(yaml.safe_dump({"7": {**SMALL_CONFIG["7"], "rank_selection": "nope"}}))
    bad = rf"^{re.escape(str(path))}: \$\.layers\[\"7\"\]\.rank_selection: expected one of"
    with pytest.raises(ConfigError, match=bad):
        Compressor.from_yaml(small_cnn(), path, registry=registry)


def test_ft_every_none_compresses_every_layer_in_one_step(registry):
    """The original's ft_every=None: all layers in one step (len(lnames))."""
    compressor = Compressor(small_cnn(), None, SMALL_CONFIG, ft_every=None, nglobal_compress_iters=2,
                            registry=registry, progress=False)
    assert compressor.ft_every == 3 and compressor.niters == 2
    assert compressor.state.steps == (("2", "4", "7"), ("2", "4", "7"))


def test_curr_compr_iter_counts_stages_also_those_that_kept_the_layer(registry):
    """As in the original, a stage that keeps a layer (vbmf at weakening 0 keeps the full rank, which would not be
    smaller) still advances curr_compr_iter: it is the stage index, e.g. into manual_rank."""
    compressor = Compressor(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
                            model_compr_kwargs={"0": {"decomposition": "svd", "rank_selection": "vbmf",
                                                      "vbmf_weakenen_factor": 0.0}},
                            nglobal_compress_iters=3, registry=registry, progress=False)
    while not compressor.done:
        compressor.compression_step()
    assert [(r.stage, r.applied) for r in compressor.history] == [(0, False), (1, False), (2, False)]
    assert compressor.model_compr_kwargs["0"]["curr_compr_iter"] == 3 and compressor.ranks["0"] is None


def test_default_config_compresses_nothing_instead_of_crashing(registry):
    """The original raised ZeroDivisionError for Compressor(model, stats)."""
    model = small_cnn()
    stats = FlopCo(model, img_size=(1, 3, 8, 8))
    compressor = Compressor(model, stats, registry=registry)
    assert compressor.done and compressor.niters == 0 and compressor.lnames == []


def test_stats_are_optional(registry):
    compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, ft_every=3, registry=registry)
    results = compressor.compression_step()
    assert all(r.applied and r.macs_before is None for r in results)


def test_float64_model_stays_float64(registry):
    model = small_cnn().double()
    compressor = Compressor(model, model_compr_kwargs=SMALL_CONFIG, ft_every=3, registry=registry)
    compressor.compression_step()
    assert {p.dtype for p in compressor.compressed_model.parameters()} == {torch.float64}


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_a_frozen_weight_or_bias_stays_frozen_at_every_stage(registry, frozen):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    getattr(model[0], frozen).requires_grad_(False)  # e.g. bias-only fine-tuning freezes the weight
    schedule = {"0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4, 2]}}
    compressor = Compressor(model, model_compr_kwargs=schedule, nglobal_compress_iters=2, progress=False,
                            registry=registry)
    for _ in range(2):
        compressor.compression_step()
        trained = {name: p.requires_grad for name, p in compressor.compressed_model[0].named_parameters()}
        assert trained == {"0.weight": frozen != "weight", "1.weight": frozen != "weight", "1.bias": frozen != "bias"}


def test_from_yaml(tmp_path, registry):
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "settings": {"ft_every": 3, "nglobal_compress_iters": 2},
                                    "layers": SMALL_CONFIG}))
    compressor = Compressor.from_yaml(small_cnn(), path, example_input=torch.randn(1, 3, 8, 8), registry=registry)
    assert compressor.niters == 2 and compressor.nglobal_compress_iters == 2
    while not compressor.done:
        compressor.compression_step()
    assert compressor.ranks["2"] == (8, 8)


class ExplodingSVD(SVD):
    """An svd that fails on 64-output layers, to break a step in its middle."""

    name = "exploding_svd"

    def decompose(self, source, ranks, params, seed=0):
        if source.spec.out_channels == 40:
            raise RuntimeError("injected failure")
        return super().decompose(source, ranks, params, seed)


class ExplodingPlugin:
    @hookimpl
    def musco_register_decompositions(self):
        return [ExplodingSVD]


def test_a_failing_step_leaves_the_model_as_it_was():
    registry = Registry.from_plugin_manager(make_plugin_manager(entry_points=False,
                                                                plugins=[("exploding", ExplodingPlugin())]))
    config = {**SMALL_CONFIG, "7": {"decomposition": "exploding_svd", "rank_selection": "manual",
                                    "manual_rank": [8]}}
    compressor = Compressor(small_cnn(), model_compr_kwargs=config, ft_every=3, registry=registry)
    before = copy.deepcopy(compressor.compressed_model)
    with pytest.raises(CompressionError, match="'7'.*injected failure"):
        compressor.compression_step()
    assert_same_state(compressor.compressed_model, before)
    assert not any(isinstance(m, FactorizedLayer) for m in compressor.compressed_model.modules())
    assert compressor.curr_iter == 0 and not compressor.history
    assert compressor.model_compr_kwargs["2"]["curr_compr_iter"] == 0


class SkippingScheduler(Scheduler):
    """Plans the first layer only: the others would never be compressed."""

    name = "skipping"

    def plan(self, layer_names, settings, params):
        return [[layer_names[0]]] * settings.nglobal_compress_iters


class RepeatingScheduler(Scheduler):
    """Plans every layer two more times than nglobal_compress_iters says."""

    name = "repeating"

    def plan(self, layer_names, settings, params):
        return [[name] for name in layer_names] * (settings.nglobal_compress_iters + 2)


class BadSchedulers:
    @hookimpl
    def musco_register_schedulers(self):
        return [SkippingScheduler, RepeatingScheduler]


@pytest.mark.parametrize(("scheduler", "expected"), [
    ("skipping", "scheduler 'skipping' of plugin 'bad_schedulers' planned layer '4' in 0 step(s); expected 2, one per "
                 "compression (nglobal_compress_iters: 2); 1 more layer(s) planned wrongly too"),
    ("repeating", "scheduler 'repeating' of plugin 'bad_schedulers' planned layer '2' in 4 step(s); expected 2, one "
                  "per compression (nglobal_compress_iters: 2); 2 more layer(s) planned wrongly too"),
])
def test_a_plan_that_leaves_out_or_repeats_a_layer_is_refused(scheduler, expected):
    """Every scheduled layer is compressed exactly nglobal_compress_iters times, whatever the scheduler plugin plans:
    a run that ends done with a layer never compressed, or compressed more often than asked, is a wrong model."""
    registry = Registry.from_plugin_manager(make_plugin_manager(entry_points=False,
                                                                plugins=[("bad_schedulers", BadSchedulers())]))
    model = small_cnn()
    before = copy.deepcopy(model)
    with pytest.raises(CompressionError) as info:
        Compressor(model, model_compr_kwargs={"version": 1, "settings": {"scheduler": scheduler,
                                                                          "nglobal_compress_iters": 2},
                                              "layers": SMALL_CONFIG}, registry=registry, inplace=True)
    assert str(info.value) == expected
    assert_same_state(model, before)


def test_a_layer_shared_by_two_names_stays_shared(registry):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Shared()
    config = {"a": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [8]}}
    compressor = Compressor(model, model_compr_kwargs=config, registry=registry)
    compressor.compression_step()
    compressed = compressor.compressed_model
    assert isinstance(compressed.a, FactorizedLayer) and compressed.b is compressed.a


def test_standardize_model_leaves_plain_torch_modules_that_save_load_and_trace(registry):
    x = torch.randn(2, 3, 8, 8)
    compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, ft_every=3, registry=registry)
    compressor.compression_step()
    model = compressor.compressed_model.eval()
    keys_before = list(model.state_dict())
    expected = model(x)
    plain = standardize_model(model)
    assert plain is model
    assert list(plain.state_dict()) == keys_before
    assert "2.0.weight" in keys_before and not any("-" in key for key in keys_before)
    for module in plain.modules():
        assert type(module).__module__.startswith("torch.nn.modules"), type(module)
        assert not hasattr(module, "spec") and not hasattr(module, "decomposition")
    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    buffer.seek(0)
    reloaded = copy.deepcopy(plain)
    for p in reloaded.parameters():
        p.data.zero_()
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(reloaded(x), expected)
    traced = torch.jit.trace(plain, x)
    torch.testing.assert_close(traced(x), expected)
    exported = torch.export.export(plain, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


def test_flopco_statistics_exclude_a_layer_its_example_never_reached(registry):
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.unused = nn.Conv2d(3, 8, 3), nn.Linear(8, 8)

        def forward(self, x):
            return self.conv(x)

    model = WithUnused()
    stats = ModelStats.from_flopco(FlopCo(model, img_size=(1, 3, 8, 8)))
    assert "never reaches it" in stats.excluded["unused"] and set(stats.layers) == {"conv"}
    with pytest.raises(ConfigError, match="never reaches it"):
        Compressor(model, FlopCo(model, img_size=(1, 3, 8, 8)), registry=registry,
                   model_compr_kwargs={"unused": {"decomposition": "svd", "rank_selection": "manual",
                                                  "manual_rank": [2]}})


def test_a_wrapped_model_is_stepped_inside_and_a_model_lacking_a_layer_is_one_error(registry):
    compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, ft_every=1, registry=registry,
                            example_input=torch.randn(1, 3, 8, 8), progress=False)
    compressor.compression_step()
    wrapped = compressor.compressed_model = nn.DataParallel(compressor.compressed_model)  # on CPU: calls the module
    compressor.compression_step()
    assert compressor.compressed_model is wrapped and isinstance(wrapped.module[4], FactorizedLayer)
    compressor.compressed_model = nn.Sequential(*list(wrapped.module.children())[:7])  # the head dropped
    before = compressor.state
    with pytest.raises(ConfigError, match=r"^the model \(Sequential\) has no layer '7', which this step compresses"):
        compressor.compression_step()
    assert compressor.state is before
    assert compressor.report().params_after == n_params(compressor.compressed_model)  # reported as it is


def test_a_new_run_on_a_compressed_model_counts_its_earlier_factors_as_they_are(registry, tmp_path):
    # the layers factorized by an earlier run were counted at the MACs of the dense layers they replaced: the
    # report said 991,744 -> 965,888 MACs for a model that runs 291,328 -> 265,472
    x = torch.randn(1, 3, 8, 8)
    first = Compressor(small_cnn(), model_compr_kwargs={"2": SMALL_CONFIG["2"]}, example_input=x, registry=registry,
                       progress=False)
    first.compression_step()
    save_compressed(first, tmp_path / "out")
    loaded = load_compressed(small_cnn(), tmp_path / "out", registry)
    second = Compressor(loaded, model_compr_kwargs={"4": SMALL_CONFIG["4"]}, example_input=x, registry=registry,
                        progress=False)
    wrapped = second.compressed_model = nn.DataParallel(second.compressed_model)  # the report reads the module inside
    row = second.compression_step()[0]
    earlier = first.report().layers[0].macs_after
    stem = 64 * 32 * 27
    assert (second.report().macs_before, second.report().macs_after) == (
        stem + earlier + row.macs_before + 40 * 64, stem + earlier + row.macs_after + 40 * 64)
    assert second.report().params_before == n_params(loaded) and second.report().params_after == n_params(wrapped)


class TiedHead(nn.Module):
    """A language model's output layer sharing the embedding's matrix."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 100, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens):
        return self.head(self.embedding(tokens))


@pytest.mark.parametrize("storage", [False, True], ids=["parameter", "storage"])
def test_a_forced_layer_with_tied_weights_says_the_model_grew(registry, storage):
    # its row said 1,600 -> 464 weights and nothing more, while the model grew from 1,600 to 2,064 parameters;
    # tied by storage (another Parameter), the note said it gained -1,136 and the totals 3,200 -> 2,064
    model = TiedHead()
    if storage:
        model.head.weight = nn.Parameter(model.embedding.weight.detach())
    compressor = Compressor(model, model_compr_kwargs={"head": {"decomposition": "svd", "rank_selection": "manual",
                                                                "manual_rank": [4], "force": True}},
                            example_input=torch.randint(0, 100, (2, 5)), registry=registry, progress=False)
    (row,) = compressor.compression_step()
    assert (row.applied, row.params_before, row.params_after) == (True, 1600, 4 * (16 + 100))
    assert n_params(compressor.compressed_model) == 1600 + 464  # the embedding, and the factors
    assert row.note == "forced although its weights are tied to embedding.weight, which stay: the model gained 464 " \
                       "parameters"
    assert "parameters: 1,600 -> 2,064 (1.29x larger)" in compressor.report().to_table()  # not "0.78x smaller"


class SharedStorage(nn.Module):
    """Two Linear layers whose weights are distinct Parameters over one tensor's memory (tied in training)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        weight = torch.randn(32, 32)
        self.a.weight, self.b.weight = nn.Parameter(weight), nn.Parameter(weight)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("inplace", [False, True])
def test_parameters_over_one_storage_are_tied_weights(registry, inplace):
    # not the same Parameter object, so 'a' was factorized (and the copy untied them): b's training no longer
    # moved a's weights, silently
    model = SharedStorage()
    schedule = {name: {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]} for name in "ac"}
    compressor = Compressor(model, model_compr_kwargs=schedule, ft_every=2, registry=registry, progress=False,
                            inplace=inplace)
    copied = compressor.compressed_model
    assert copied.a.weight.untyped_storage().data_ptr() == copied.b.weight.untyped_storage().data_ptr()
    row = compressor.compression_step()[0]
    assert row.ranks is None and row.note.startswith("kept as is: its weights are tied to b.weight")
    assert not inplace or copied is model


def test_a_copy_clones_a_shared_storage_once(monkeypatch):
    """Four Parameters over one tensor's memory: its storage was cloned once per Parameter and all but one thrown
    away (4 copies of the memory made for 1 kept)."""
    model = nn.Module()
    weight = torch.randn(8, 8)
    for index in range(4):
        setattr(model, f"w{index}", nn.Parameter(weight))
    clones, clone = [], torch.UntypedStorage.clone
    monkeypatch.setattr(torch.UntypedStorage, "clone", lambda self, *args, **kwargs: clones.append(1) or clone(
        self, *args, **kwargs))
    copied = deep_copy(model, "a test", "")
    assert len(clones) == 1
    assert len({p.untyped_storage().data_ptr() for p in copied.parameters()} - {weight.data_ptr()}) == 1


def test_views_of_disjoint_parts_of_one_tensor_are_not_tied():
    halves = torch.randn(64, 32)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model[0].weight, model[1].weight = nn.Parameter(halves[:32]), nn.Parameter(halves[32:])
    assert tied_parameters(model, ["0", "1"]) == {}
    model[1].weight = nn.Parameter(halves[16:48])  # overlaps the first
    assert tied_parameters(model, ["0", "1"]) == {"0": ["1.weight"], "1": ["0.weight"]}


def test_the_report_counts_parameters_over_one_memory_once(registry):
    """Two Linear weights over one tensor (distinct Parameters) were counted twice: 12,288 -> 8,704 reported for a
    model of 8,192 -> 4,608."""
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    model[1].weight = nn.Parameter(model[0].weight.detach())
    compressor = Compressor(model, model_compr_kwargs={"2": {"decomposition": "svd", "rank_selection": "manual",
                                                             "manual_rank": [4]}}, registry=registry, progress=False)
    compressor.compression_step()
    report = compressor.report()
    assert (report.params_before, report.params_after) == (2 * 64 * 64, 64 * 64 + 4 * 128)


def test_distinct_numel_counts_overlapping_views_once():
    weight = torch.randn(10, 8)
    assert distinct_numel([weight, weight, weight.t()]) == 80
    assert distinct_numel([weight[:5], weight[3:]]) == 80 and distinct_numel([weight[:5], weight[6:]]) == 72
    assert distinct_numel([weight[:, ::2], weight[:2]]) == 48  # a strided view with gaps


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_a_model_given_wrapped_is_compressed_as_the_module_inside_with_its_layer_names(registry, wrap):
    model = small_cnn()
    compressor = Compressor(wrap(model), model_compr_kwargs=SMALL_CONFIG, ft_every=3, registry=registry,
                            example_input=torch.randn(1, 3, 8, 8), progress=False)
    compressor.compression_step()
    assert type(compressor.compressed_model) is nn.Sequential and set(compressor.ranks) == set(SMALL_CONFIG)
    assert not any(isinstance(module, FactorizedLayer) for module in model.modules())  # a copy was compressed


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_statistics_of_a_wrapped_model_name_the_layers_inside(registry, wrap):
    """Read with the wrapper's prefix ('_orig_mod.0'), they were refused by a Compressor on the same wrapped model
    ('model_stats do not describe the model'), which compresses the module inside."""
    model, x = wrap(small_cnn()), torch.randn(1, 3, 8, 8)
    stats = ModelStats.from_model(model, registry, x)
    assert set(stats.layers) == set(ModelStats.from_model(small_cnn(), registry, x).layers)
    compressor = Compressor(model, stats, config_type="param_reduction", registry=registry, example_input=x,
                            progress=False)
    assert compressor.lnames and set(compressor.lnames) <= set(stats.layers)


def test_new_conv_factors_keep_the_channels_last_format_of_the_weights_they_replace(registry):
    compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, ft_every=3, nglobal_compress_iters=2,
                            registry=registry, progress=False)
    compressor.compression_step()
    compressor.compressed_model.to(memory_format=torch.channels_last)
    compressor.compression_step()
    core = compressor.compressed_model[2][1].weight  # 3x3: channels_last tells from contiguous
    assert core.is_contiguous(memory_format=torch.channels_last) and not core.is_contiguous()


def test_a_step_under_inference_mode_builds_parameters_fine_tuning_can_train(registry):
    compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, ft_every=3, registry=registry,
                            progress=False)
    with torch.inference_mode():
        compressor.compression_step()
    assert not any(p.is_inference() for p in compressor.compressed_model.parameters())
    compressor.compressed_model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert compressor.compressed_model[2][1].weight.grad is not None


def test_a_step_inside_the_callers_autocast_computes_as_outside_it(registry):
    """A step called from a mixed-precision loop: its calibration passes, factors and reported errors are those
    of the step outside autocast (not bfloat16 ones), and a full-rank tucker2 still reproduces its layer."""
    torch.manual_seed(0)
    model = small_cnn().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    schedule = {"version": 1, "settings": {"rank_multiple": 1, "ft_every": 3}, "layers": {
        "0": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [8]},
        "2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[48, 32]], "force": True},
        "7": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [12]}}}

    def step(autocast: bool):
        compressor = Compressor(model, model_compr_kwargs=schedule, example_input=data[0], calibration_data=data,
                                registry=registry, progress=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return compressor.compression_step(), compressor.compressed_model

    (plain, expected), (mixed, got) = step(False), step(True)
    assert [r.relative_error for r in mixed] == [r.relative_error for r in plain]
    assert all(torch.equal(value, got.state_dict()[key]) for key, value in expected.state_dict().items())
    assert mixed[1].relative_error < 1e-5
    x = torch.randn(2, 32, 8, 8)
    assert torch.allclose(got[2](x), model[2](x), atol=1e-5)


def test_a_factor_narrowed_by_hand_is_refused_at_the_next_step_not_costed_from_its_layouts(registry):
    compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, ft_every=3, nglobal_compress_iters=2,
                            registry=registry, progress=False)
    compressor.compression_step()
    layer = compressor.compressed_model[2]  # tucker2 at (16, 12): 32 -> 12 (1x1), 12 -> 16 (3x3), 16 -> 48 (1x1)
    layer[0], layer[1] = nn.Conv2d(32, 10, 1, bias=False), nn.Conv2d(10, 16, 3, padding=1, bias=False)
    before = copy.deepcopy(compressor.compressed_model)
    with pytest.raises(CompressionError, match=r"layer '2': its factor 0 \(Conv2d\) holds weight of shape \(10, 32, "
                                               r"1, 1\) where its layout gives weight of shape \(12, 32, 1, 1\)"):
        compressor.compression_step()
    assert_same_state(compressor.compressed_model, before)


def test_a_step_after_standardize_model_says_so(registry):
    compressor = Compressor(small_cnn(), model_compr_kwargs=SMALL_CONFIG, ft_every=3, nglobal_compress_iters=2,
                            registry=registry, progress=False)
    compressor.compression_step()
    standardize_model(compressor.compressed_model)
    with pytest.raises(CompressionError, match=r"no adapter handles Sequential; .*: was standardize_model called "
                                               r"already\? Call it after the last step only"):
        compressor.compression_step()


@pytest.mark.parametrize("training", [False, True])
def test_standardize_model_keeps_the_mode_of_a_factorized_root(registry, training):
    compressor = Compressor(nn.Sequential(nn.Linear(32, 32)), model_compr_kwargs={"0": SMALL_CONFIG["7"]},
                            registry=registry, progress=False)
    compressor.compression_step()
    plain = standardize_model(compressor.compressed_model[0].train(training))
    assert type(plain) is nn.Sequential and [m.training for m in plain.modules()] == [training] * 3
