"""Tests for musco_core.config (generate/validate_model_compr_kwargs) and the Compressor's schedule checks."""

import copy
import logging
from collections import OrderedDict

import pytest
import torch
from flopco import FlopCo
from torch import nn

from musco_core import (Compressor, ConfigError, LayerSchedule, ModelSchedule, ModelStats,
                        generate_model_compr_kwargs, validate_model_compr_kwargs)
from musco_core.config import CONFIG_TYPES
from musco_plugins.rank_selectors import ManualParams, VBMFParams

from models import resnet18, resnet50

IMG = (1, 3, 64, 64)

RESNET18_LAYERS = [
    "conv1",
    "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
    "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2",
    "layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv1", "layer3.1.conv2",
    "layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2",
    "fc",
]
POINTWISE = {"layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0", "fc"}
TEMPLATE_ENTRY = {"decomposition": None, "rank_selection": None, "manual_rank": None, "param_reduction_rate": None,
                  "vbmf_weakenen_factor": None, "curr_compr_iter": 0}
SELECTOR_KEY = {"vbmf": ("vbmf_weakenen_factor", 0.8), "param_reduction": ("param_reduction_rate", 2.0)}


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def r18_input():
    return torch.randn(*IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def r18_stats(r18, r18_input, registry):
    return ModelStats.from_model(r18, registry, r18_input)


@pytest.fixture(scope="module")
def r18_configs(r18_stats, registry):
    return {kind: generate_model_compr_kwargs(r18_stats, kind, registry=registry) for kind in CONFIG_TYPES}


@pytest.fixture(scope="module")
def small_r18():
    torch.manual_seed(0)
    return resnet18(num_classes=10, width=16).eval()


def _expected_entry(name, kind):
    if name == "fc":  # the classifier is the output layer
        return None
    key, value = SELECTOR_KEY[kind]
    return {"decomposition": "svd" if name in POINTWISE else "tucker2", "rank_selection": kind, key: value,
            "curr_compr_iter": 0}


def _state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


# ---------------------------------------------------------------- generate_model_compr_kwargs

def test_stats_cover_resnet18_layers_in_order(r18_stats):
    assert list(r18_stats.layers) == RESNET18_LAYERS


def test_none_config(r18_configs):
    config = r18_configs["none"]
    assert list(config) == RESNET18_LAYERS
    assert all(value is None for value in config.values())


def test_default_config_type_is_none(r18_stats, registry):
    assert generate_model_compr_kwargs(r18_stats, registry=registry) == dict.fromkeys(RESNET18_LAYERS)


def test_template_config(r18_configs):
    config = r18_configs["template"]
    assert list(config) == RESNET18_LAYERS
    for name, entry in config.items():
        assert entry == TEMPLATE_ENTRY, name


def test_template_entries_are_independent(r18_stats, registry):
    # The template is meant to be filled in by hand: filling one layer must not fill the others.
    config = generate_model_compr_kwargs(r18_stats, "template", registry=registry)
    config["layer1.0.conv2"]["decomposition"] = "tucker2"
    assert config["layer1.0.conv1"] == TEMPLATE_ENTRY and config["fc"] == TEMPLATE_ENTRY


@pytest.mark.parametrize("kind", ["vbmf", "param_reduction"])
def test_default_decompositions(r18_configs, kind):
    config = r18_configs[kind]
    assert list(config) == RESNET18_LAYERS
    for name in RESNET18_LAYERS:
        assert config[name] == _expected_entry(name, kind), name
    # Spot checks spelled out.
    key, value = SELECTOR_KEY[kind]
    assert config["layer1.0.conv2"] == {"decomposition": "tucker2", "rank_selection": kind, key: value,
                                        "curr_compr_iter": 0}
    assert config["layer2.0.downsample.0"]["decomposition"] == "svd"
    assert config["fc"] is None


@pytest.mark.parametrize("kind", ["vbmf", "param_reduction"])
def test_only_the_classifier_is_left_out_with_a_logged_reason(r18_stats, registry, caplog, kind):
    # the 7x7 stem (64 x 3) was left out too: tucker2's minimum rank 8 is above its 3 input channels, but its r_in
    # floor is 3, and at ranks (8, 3) it keeps 1,697 of its 9,408 weights
    caplog.set_level(logging.INFO, logger="musco_core.config")
    config = generate_model_compr_kwargs(r18_stats, kind, registry=registry)
    assert config["conv1"]["decomposition"] == "tucker2"
    messages = [r.getMessage() for r in caplog.records if r.name == "musco_core.config"]
    assert len(messages) == 1 and "'fc'" in messages[0] and "output layer" in messages[0], messages


def _grouped_model():
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1),
        dw=nn.Conv2d(16, 16, 3, padding=1, groups=16),
        pw=nn.Conv2d(16, 32, 1),
        conv=nn.Conv2d(32, 32, 3, padding=1),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        head=nn.Linear(32, 2),
    )).eval()


@pytest.mark.parametrize("kind", ["vbmf", "param_reduction"])
def test_grouped_and_tiny_layers_are_left_out(registry, caplog, kind):
    caplog.set_level(logging.INFO, logger="musco_core.config")
    model = _grouped_model()
    stats = ModelStats.from_model(model, registry, torch.randn(1, 3, 16, 16))
    config = generate_model_compr_kwargs(stats, kind, registry=registry)
    assert list(config) == ["stem", "dw", "pw", "conv", "head"]
    assert config["dw"] is None
    assert config["stem"]["decomposition"] == "tucker2"  # 3 input channels: r_in at most 3, (8, 3) shrink it
    assert config["head"] is None  # 2 outputs: nothing to gain
    assert config["pw"]["decomposition"] == "svd" and config["pw"]["rank_selection"] == kind
    assert config["conv"]["decomposition"] == "tucker2" and config["conv"]["rank_selection"] == kind
    messages = [r.getMessage() for r in caplog.records if r.name == "musco_core.config"]
    assert any("'dw'" in m and "group" in m for m in messages), messages
    # The generated config is usable as is.
    compressor = Compressor(model, model_stats=stats, model_compr_kwargs=config, registry=registry)
    assert compressor.lnames == ["stem", "pw", "conv"]


def test_grouped_conv_left_out_with_flopco_stats(registry):
    model = _grouped_model()
    flopco = FlopCo(model, img_size=(1, 3, 16, 16))
    config = generate_model_compr_kwargs(flopco, "vbmf", registry=registry)
    assert config["dw"] is None
    assert config["conv"] is not None


def test_flopco_gives_the_same_configs(r18, r18_configs, registry):
    flopco = FlopCo(r18, img_size=IMG)
    for kind in CONFIG_TYPES:
        assert generate_model_compr_kwargs(flopco, kind, registry=registry) == r18_configs[kind], kind


def test_resnet50_bottleneck_defaults(registry):
    # Without an example input the layers are read from the modules alone (no forward pass).
    stats = ModelStats.from_model(resnet50(num_classes=10), registry)
    config = generate_model_compr_kwargs(stats, "vbmf", registry=registry)
    assert config["conv1"]["decomposition"] == "tucker2"  # the 3-channel stem: r_in at most 3
    assert config["layer1.0.conv1"]["decomposition"] == "svd"      # 1x1 reduce
    assert config["layer1.0.conv2"]["decomposition"] == "tucker2"  # 3x3
    assert config["layer1.0.conv3"]["decomposition"] == "svd"      # 1x1 expand
    assert config["layer1.0.downsample.0"]["decomposition"] == "svd"
    assert config["fc"] is None  # the last layer, a Linear one: taken as the output layer without an example input
    assert len(config) == 54


def test_unknown_config_type(r18_stats, registry):
    with pytest.raises(ConfigError) as info:
        generate_model_compr_kwargs(r18_stats, "vbmff", registry=registry)
    message = str(info.value)
    assert "'vbmff'" in message
    for kind in CONFIG_TYPES:
        assert kind in message


# ---------------------------------------------------------------- generated configs are valid and usable

@pytest.mark.parametrize("kind", ["none", "vbmf", "param_reduction"])
def test_generated_config_validates_and_builds_a_compressor(r18, r18_stats, r18_configs, registry, kind):
    config = r18_configs[kind]
    before = copy.deepcopy(config)
    compressed = [name for name, entry in config.items() if entry is not None]

    schedule = validate_model_compr_kwargs(config, registry=registry)
    assert isinstance(schedule, ModelSchedule)
    assert schedule.compressed_layers() == compressed
    assert config == before

    compressor = Compressor(r18, model_stats=r18_stats, model_compr_kwargs=config, ft_every=3,
                            nglobal_compress_iters=2, registry=registry)
    assert compressor.lnames == compressed
    assert compressor.done == (not compressed)
    if compressed:
        assert compressor.niters > 0
        assert compressor.model_compr_kwargs == {name: None if entry is None else {**entry}
                                                 for name, entry in config.items()}
    assert config == before
    assert compressor.compressed_model is not r18


def test_compressor_generates_config_from_flopco(r18, registry):
    flopco = FlopCo(r18, img_size=IMG)
    compressor = Compressor(r18, model_stats=flopco, config_type="vbmf", registry=registry)
    assert compressor.lnames == [name for name in RESNET18_LAYERS if name != "fc"]


def test_param_reduction_run_shrinks_small_resnet18(small_r18, registry):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    stats = ModelStats.from_model(small_r18, registry, x)
    config = generate_model_compr_kwargs(stats, "param_reduction", registry=registry)
    original_state = _state(small_r18)
    # ranks exactly as the rate gives them (not rounded up to hardware multiples), so the rate is a bound
    document = {"version": 1, "settings": {"ft_every": 100, "rank_multiple": 1}, "layers": config}
    compressor = Compressor(small_r18, model_stats=stats, model_compr_kwargs=document, example_input=x,
                            registry=registry)
    while not compressor.done:
        compressor.compression_step()

    model = compressor.compressed_model
    n_before = sum(p.numel() for p in small_r18.parameters())
    n_after = sum(p.numel() for p in model.parameters())
    compressed = [name for name, entry in config.items() if entry is not None]
    assert compressed and all(compressor.ranks[name] is not None for name in compressed)
    assert n_after < n_before
    # Rate 2: every compressed layer keeps at most half of its weights.
    halved = sum(stats.layers[name].spec.n_weights for name in compressed) / 2
    assert n_after <= n_before - halved
    with torch.no_grad():
        assert model.eval()(x).shape == small_r18(x).shape == (2, 10)
    _assert_same_state(small_r18, original_state)  # the input model was deep-copied, not touched


# ---------------------------------------------------------------- validate_model_compr_kwargs

def test_validate_rejects_cp3_with_vbmf_without_mutating(registry):
    config = {"layer1.0.conv1": {"decomposition": "cp3", "rank_selection": "vbmf", "vbmf_weakenen_factor": 0.8,
                                 "curr_compr_iter": 0}, "fc": None}
    before = copy.deepcopy(config)
    with pytest.raises(ConfigError) as info:
        validate_model_compr_kwargs(config, registry=registry)
    message = str(info.value)
    assert message.startswith('model_compr_kwargs: $.layers["layer1.0.conv1"]: ')
    assert "'cp3'" in message and "'vbmf'" in message
    assert config == before


def test_validate_returns_schedule_without_mutating(registry):
    config = {"layer1.0.conv1": {"decomposition": "tucker2", "rank_selection": "manual",
                                 "manual_rank": [(32, 32), (16, 16)], "curr_compr_iter": 0},
              "fc": {"decomposition": "svd", "rank_selection": "vbmf", "vbmf_weakenen_factor": 0.5},
              "conv1": None}
    before = copy.deepcopy(config)
    schedule = validate_model_compr_kwargs(config, registry=registry)
    assert schedule.layers == {
        "layer1.0.conv1": LayerSchedule("tucker2", "manual", ManualParams([(32, 32), (16, 16)])),
        "fc": LayerSchedule("svd", "vbmf", VBMFParams(0.5)),
        "conv1": None,
    }
    assert config == before


def test_validate_uses_the_given_origin(registry):
    with pytest.raises(ConfigError, match=r'^my.yaml: \$\.layers\["fc"\]\.decomposition: '):
        validate_model_compr_kwargs({"fc": {"decomposition": "pca", "rank_selection": "vbmf"}}, registry=registry,
                                    origin="my.yaml")


# ---------------------------------------------------------------- Compressor checks against the model

MODEL_PROBLEMS = [
    ("missing-layer", {"layer9.conv": {"decomposition": "svd", "rank_selection": "vbmf"}}, 1,
     "layer9.conv", ["no layer of that name"]),
    ("svd-on-3x3", {"layer1.0.conv1": {"decomposition": "svd", "rank_selection": "vbmf"}}, 1,
     "layer1.0.conv1", ["svd", "3x3"]),
    ("tucker2-on-fc", {"fc": {"decomposition": "tucker2", "rank_selection": "param_reduction"}}, 1,
     "fc", ["tucker2", "Linear"]),
    ("cp4-on-1x1", {"layer2.0.downsample.0": {"decomposition": "cp4", "rank_selection": "param_reduction"}}, 1,
     "layer2.0.downsample.0", ["cp4"]),
    ("manual-rank-too-short",
     {"layer1.0.conv1": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[8, 8]]}}, 2,
     "layer1.0.conv1", ["manual_rank", "1 entries", "2 times"]),
    ("manual-rank-too-short-from-stage",
     {"layer1.0.conv1": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[8, 8], [4, 4]],
                         "curr_compr_iter": 1}}, 2,
     "layer1.0.conv1", ["manual_rank"]),
    ("not-a-weight-layer", {"layer1": {"decomposition": "svd", "rank_selection": "vbmf"}}, 1,
     "layer1", []),
]


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("config, nglobal, layer, fragments", [case[1:] for case in MODEL_PROBLEMS],
                         ids=[case[0] for case in MODEL_PROBLEMS])
def test_compressor_rejects_schedule_that_does_not_fit_the_model(small_r18, registry, config, nglobal, layer,
                                                                 fragments, inplace):
    before_state = _state(small_r18)
    before_config = copy.deepcopy(config)
    modules_before = [name for name, _ in small_r18.named_modules()]
    with pytest.raises(ConfigError) as info:
        Compressor(small_r18, model_compr_kwargs=config, nglobal_compress_iters=nglobal,
                   example_input=torch.randn(*IMG), inplace=inplace, registry=registry)
    message = str(info.value)
    assert message.startswith("model_compr_kwargs: $.layers"), message
    assert f'"{layer}"' in message or f".{layer}:" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert config == before_config
    assert [name for name, _ in small_r18.named_modules()] == modules_before
    _assert_same_state(small_r18, before_state)


def test_compressor_reports_every_misfit_layer(small_r18, registry):
    config = {"layer9.conv": {"decomposition": "svd", "rank_selection": "vbmf"},
              "layer1.0.conv1": {"decomposition": "svd", "rank_selection": "vbmf"},
              "layer1.0.conv2": {"decomposition": "tucker2", "rank_selection": "vbmf"},  # fine
              "fc": {"decomposition": "tucker2", "rank_selection": "vbmf"}}
    with pytest.raises(ConfigError) as info:
        Compressor(small_r18, model_compr_kwargs=config, registry=registry)
    lines = str(info.value).splitlines()
    assert len(lines) == 3, lines
    for name in ("layer9.conv", "layer1.0.conv1", "fc"):
        assert any(f'"{name}"' in line or f".{name}:" in line for line in lines), (name, lines)


def test_compressor_accepts_manual_rank_long_enough(small_r18, registry):
    config = {"layer1.0.conv1": {"decomposition": "tucker2", "rank_selection": "manual",
                                 "manual_rank": [[8, 8], [4, 4]]}}
    compressor = Compressor(small_r18, model_compr_kwargs=config, nglobal_compress_iters=2, registry=registry)
    assert compressor.lnames == ["layer1.0.conv1"]


@pytest.mark.parametrize("layer, entry", [
    ("layer1.0.conv1", {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [8, 4]}),
    ("fc", {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [[8, 8]]}),
], ids=["tucker2-single-ints", "svd-pairs"])
def test_compressor_rejects_manual_rank_of_the_wrong_arity(small_r18, registry, layer, entry):
    with pytest.raises(ConfigError) as info:
        Compressor(small_r18, model_compr_kwargs={layer: entry}, registry=registry)
    message = str(info.value)
    assert layer in message and "manual_rank" in message
