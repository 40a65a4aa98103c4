"""Tests for musco_core.schedule: the YAML / original-dict schedule codec, its error messages and file I/O."""

import copy
import os
import re
import stat

import pytest
import yaml

from musco_core import ConfigError, LayerSchedule, ModelSchedule, RunSettings, dump_schedule, load_schedule
from musco_core.schedule import ScheduleCodec, read_yaml
from musco_plugins.cp import CPParams
from musco_plugins.rank_selectors import ManualParams, ParamReductionParams, VBMFParams


@pytest.fixture(scope="module")
def codec(registry):
    return ScheduleCodec(registry)


def _write(tmp_path, text, name="schedule.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _load_error(path, registry) -> str:
    with pytest.raises(ConfigError) as info:
        load_schedule(path, registry)
    return str(info.value)


# ---------------------------------------------------------------- round trip and accepted forms

FULL_DOCUMENT = {
    "version": 1,
    "settings": {"ft_every": 3, "nglobal_compress_iters": 2, "algo_kwargs": {"cp4": {"n_iter_max": 50}}},
    "layers": {
        "layer2.0.downsample.0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [32, 16]},
        "layer2.1.conv2": {"decomposition": "tucker2", "rank_selection": "vbmf", "vbmf_weakenen_factor": 0.9},
        "layer1.1.conv2": {"decomposition": "cp4", "rank_selection": "param_reduction",
                           "param_reduction_rate": 4},
        "fc": None,
    },
}


def test_structure_builds_the_expected_attrs_objects(codec):
    data = copy.deepcopy(FULL_DOCUMENT)
    schedule = codec.structure(data, "full.yaml")
    expected = ModelSchedule(
        RunSettings(ft_every=3, nglobal_compress_iters=2, algo_kwargs={"cp4": CPParams(n_iter_max=50)}),
        {
            "layer2.0.downsample.0": LayerSchedule("svd", "manual", ManualParams([(32,), (16,)])),
            "layer2.1.conv2": LayerSchedule("tucker2", "vbmf", VBMFParams(0.9)),
            "layer1.1.conv2": LayerSchedule("cp4", "param_reduction", ParamReductionParams(4.0)),
            "fc": None,
        },
    )
    assert schedule == expected
    assert list(schedule.layers) == list(FULL_DOCUMENT["layers"])  # file order is kept
    assert schedule.compressed_layers() == ["layer2.0.downsample.0", "layer2.1.conv2", "layer1.1.conv2"]
    assert data == FULL_DOCUMENT  # input untouched


def test_yaml_round_trip(tmp_path, codec, registry):
    schedule = codec.structure(copy.deepcopy(FULL_DOCUMENT), "full.yaml")
    path = tmp_path / "schedule.yaml"
    dump_schedule(schedule, path, registry)
    text = path.read_text(encoding="utf-8")
    assert re.search(r"(?m)^version: 1$", text), text

    loaded = load_schedule(path, registry)
    assert loaded == schedule
    assert loaded.version == 1
    assert loaded.settings.ft_every == 3 and loaded.settings.nglobal_compress_iters == 2
    assert loaded.settings.algo_kwargs["cp4"].n_iter_max == 50
    assert loaded.layers["fc"] is None
    assert loaded.layers["layer2.0.downsample.0"].rank_params.manual_rank == [(32,), (16,)]
    assert loaded.layers["layer2.1.conv2"].rank_params.vbmf_weakenen_factor == 0.9
    assert loaded.layers["layer1.1.conv2"].rank_params.param_reduction_rate == 4.0

    # The file is plain YAML that a safe loader reads back to the codec's plain form.
    assert yaml.safe_load(text) == codec.unstructure(schedule)
    # Dumping what was loaded gives the same text (stable output).
    again = tmp_path / "again.yaml"
    dump_schedule(loaded, again, registry)
    assert again.read_text(encoding="utf-8") == text


def test_dump_schedule_syncs_the_folder_after_the_rename(tmp_path, monkeypatch, registry):
    """The rename of the file into place survives a power loss only once its folder is synced (it was not)."""
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        ("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", "file")), replace(src, dst))[1])
    dump_schedule({"0": {"decomposition": "svd", "rank_selection": "vbmf"}}, tmp_path / "schedule.yaml", registry)
    assert events == [("fsync", "file"), ("replace", "file"), ("fsync", "folder")]


def test_dump_schedule_keeps_the_users_symlink_and_the_files_mode(tmp_path, registry):
    """configs/current.yaml a link to experiments/exp3.yaml, kept private (0600): the link was replaced by a new
    file (the link gone, exp3.yaml stale) of mode 0644; now the file the link points to is replaced, mode kept."""
    (tmp_path / "experiments").mkdir()
    (tmp_path / "configs").mkdir()
    target = tmp_path / "experiments" / "exp3.yaml"
    target.write_text("old\n")
    os.chmod(target, 0o600)
    link = tmp_path / "configs" / "current.yaml"
    link.symlink_to(os.path.join("..", "experiments", "exp3.yaml"))
    dump_schedule({"0": {"decomposition": "svd", "rank_selection": "vbmf"}}, link, registry)
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "experiments", "exp3.yaml")
    assert load_schedule(target, registry).layers["0"].decomposition == "svd"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "experiments").iterdir()) == ["exp3.yaml"]


def test_a_document_or_plain_dict_is_checked_then_written_as_its_schedule(tmp_path, codec, registry):
    # both used to fail with a raw AttributeError, though a plain dict is accepted wherever a schedule is
    path = tmp_path / "s.yaml"
    document = copy.deepcopy(FULL_DOCUMENT)
    dump_schedule(document, path, registry)
    assert load_schedule(path, registry) == codec.structure(FULL_DOCUMENT) and document == FULL_DOCUMENT
    plain = copy.deepcopy(FULL_DOCUMENT["layers"])
    dump_schedule(plain, path, registry)
    assert load_schedule(path, registry) == codec.structure(FULL_DOCUMENT["layers"])  # with the default settings
    path.write_text("kept")
    with pytest.raises(ConfigError, match=r'^schedule: \$\.layers\["fc"\]\.decomposition: expected one of .*got '
                                          r"'nope'"):
        dump_schedule({"fc": {"decomposition": "nope", "rank_selection": "vbmf"}}, path, registry)
    with pytest.raises(ConfigError, match=r"^schedule: \$: expected a mapping \(a schedule or a \{layer: settings\} "
                                          r"dict\), got list"):
        dump_schedule(["fc"], path, registry)
    assert path.read_text() == "kept"


def test_round_trip_keeps_stage_and_force(tmp_path, codec, registry):
    schedule = codec.structure({"version": 1, "layers": {
        "a": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[32, 32], [16, 16]],
              "curr_compr_iter": 1, "force": True}}}, "x")
    dump_schedule(schedule, tmp_path / "s.yaml", registry)
    loaded = load_schedule(tmp_path / "s.yaml", registry)
    assert loaded == schedule
    assert loaded.layers["a"].curr_compr_iter == 1 and loaded.layers["a"].force is True


def test_module_docstring_example_is_valid(tmp_path, registry):
    text = """\
version: 1
settings:
  ft_every: 3
  nglobal_compress_iters: 2
  algo_kwargs:
    cp4: {n_iter_max: 300}
layers:
  layer2.1.conv2: {decomposition: tucker2, rank_selection: vbmf, vbmf_weakenen_factor: 0.9}
  layer3.1.conv2: {decomposition: tucker2, rank_selection: manual, manual_rank: [[32, 32], [16, 16]]}
  fc: null
"""
    schedule = load_schedule(_write(tmp_path, text), registry)
    assert schedule.layers["layer3.1.conv2"].rank_params.manual_rank == [(32, 32), (16, 16)]
    assert schedule.layers["fc"] is None
    assert schedule.settings.algo_kwargs["cp4"] == CPParams(n_iter_max=300)


README_RESNET18 = {
    "layer3.1.conv2": {"decomposition": "tucker2", "rank_selection": "manual",
                       "manual_rank": [(32, 32), (16, 16)], "curr_compr_iter": 0},
    "layer2.1.conv2": {"decomposition": "tucker2", "rank_selection": "vbmf", "vbmf_weakenen_factor": 0.9,
                       "curr_compr_iter": 0},
    "layer1.1.conv2": {"decomposition": "cp4", "rank_selection": "param_reduction", "param_reduction_rate": 4,
                       "curr_compr_iter": 0},
}


def test_original_dict_form_is_accepted_and_not_mutated(codec):
    data = copy.deepcopy(README_RESNET18)
    before = copy.deepcopy(data)
    schedule = codec.structure(data, "model_compr_kwargs", settings={"ft_every": 2, "nglobal_compress_iters": 2})
    assert data == before
    assert schedule.layers == {
        "layer3.1.conv2": LayerSchedule("tucker2", "manual", ManualParams([(32, 32), (16, 16)])),
        "layer2.1.conv2": LayerSchedule("tucker2", "vbmf", VBMFParams(0.9)),
        "layer1.1.conv2": LayerSchedule("cp4", "param_reduction", ParamReductionParams(4.0)),
    }
    assert schedule.settings.ft_every == 2 and schedule.settings.nglobal_compress_iters == 2
    assert schedule.version == 1


def test_original_dict_form_without_settings_uses_defaults(codec):
    schedule = codec.structure(copy.deepcopy(README_RESNET18))
    assert schedule.settings == RunSettings()


@pytest.mark.parametrize("entry, expected", [
    ({"decomposition": "svd", "rank_selection": "vbmf", "manual_rank": None, "param_reduction_rate": None,
      "vbmf_weakenen_factor": 0.8, "curr_compr_iter": 0},
     LayerSchedule("svd", "vbmf", VBMFParams(0.8))),
    ({"decomposition": "tucker2", "rank_selection": "param_reduction", "manual_rank": None,
      "param_reduction_rate": 3, "vbmf_weakenen_factor": None, "curr_compr_iter": 0},
     LayerSchedule("tucker2", "param_reduction", ParamReductionParams(3.0))),
    ({"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[16, 16]],
      "param_reduction_rate": None, "vbmf_weakenen_factor": None, "curr_compr_iter": 1},
     LayerSchedule("tucker2", "manual", ManualParams([(16, 16)]), curr_compr_iter=1)),
    # The selector's own key left as a null placeholder means "use the default".
    ({"decomposition": "svd", "rank_selection": "vbmf", "manual_rank": None, "param_reduction_rate": None,
      "vbmf_weakenen_factor": None, "curr_compr_iter": 0},
     LayerSchedule("svd", "vbmf", VBMFParams())),
], ids=["svd-vbmf", "tucker2-param_reduction", "tucker2-manual", "own-key-null"])
def test_original_template_form_with_null_placeholders(codec, entry, expected):
    data = {"layer": entry}
    before = copy.deepcopy(data)
    assert codec.structure(data).layers == {"layer": expected}
    assert data == before


def test_yaml_anchors_and_aliases_are_accepted(tmp_path, registry):
    text = ("version: 1\nlayers:\n  fc: &svd {decomposition: svd, rank_selection: vbmf}\n"
            "  layer4.0.downsample.0: *svd\n")
    schedule = load_schedule(_write(tmp_path, text), registry)
    assert schedule.layers["fc"] == schedule.layers["layer4.0.downsample.0"] == LayerSchedule(
        "svd", "vbmf", VBMFParams())


def test_yaml_merge_keys_are_accepted(tmp_path, registry):
    text = """\
version: 1
layers:
  fc: &base {decomposition: svd, rank_selection: vbmf, vbmf_weakenen_factor: 0.3}
  layer4.0.downsample.0:
    <<: *base
    vbmf_weakenen_factor: 0.5
"""
    schedule = load_schedule(_write(tmp_path, text), registry)
    assert schedule.layers["fc"] == LayerSchedule("svd", "vbmf", VBMFParams(0.3))
    assert schedule.layers["layer4.0.downsample.0"] == LayerSchedule("svd", "vbmf", VBMFParams(0.5))


# ---------------------------------------------------------------- rejections with path and expectation

def _doc(layer_name, **entry):
    return {"version": 1, "layers": {layer_name: entry}}


REJECTIONS = [
    # (id, document (dumped to YAML), JSON-path of the problem, text the message must contain)
    ("manual-rank-string",
     _doc("layer2.1.conv2", decomposition="tucker2", rank_selection="manual", manual_rank=[[32, 32], [16, "x"]]),
     '$.layers["layer2.1.conv2"].manual_rank[1]', "expected a positive int or a list of 1 to 8 positive ints"),
    ("manual-rank-zero",
     _doc("layer2.1.conv2", decomposition="tucker2", rank_selection="manual", manual_rank=[[32, 0]]),
     '$.layers["layer2.1.conv2"].manual_rank[0]',
     "expected a positive int or a list of 1 to 8 positive ints, got [32, 0]"),
    ("manual-rank-negative",
     _doc("fc", decomposition="svd", rank_selection="manual", manual_rank=[8, -3]),
     '$.layers["fc"].manual_rank[1]', "expected a positive int or a list of 1 to 8 positive ints, got -3"),
    ("manual-rank-growing",  # a later compression cannot grow a layer: stage 2 would be clamped to 8, not 16
     _doc("fc", decomposition="svd", rank_selection="manual", manual_rank=[[8], [16]]),
     '$.layers["fc"].manual_rank[1]', "[16] grows the layer: stage 1 left it at [8] (rank)"),
    ("manual-rank-tucker2-growing-one-rank",
     _doc("layer2.1.conv2", decomposition="tucker2", rank_selection="manual",
          manual_rank=[[32, 32], [16, 16], [8, 24]]),
     '$.layers["layer2.1.conv2"].manual_rank[2]', "[8, 24] grows the layer: stage 2 left it at [16, 16] (r_out, "
                                                  "r_in) and a later compression cannot grow a layer; expected each "
                                                  "rank of stage 3 at most the one of stage 2"),
    ("readme-typo-param_reduction",
     _doc("layer1.1.conv2", decomposition="cp4", rank_selection="param_reduction", param_reduction=4),
     '$.layers["layer1.1.conv2"]', "unknown keys ['param_reduction']"),
    ("unknown-decomposition",
     _doc("layer1.0.conv1", decomposition="tucker3", rank_selection="vbmf"),
     '$.layers["layer1.0.conv1"].decomposition', "expected one of cp3, cp4, svd, tucker2, whitened_svd, got 'tucker3'"),
    ("unknown-rank-selection",
     _doc("layer1.0.conv1", decomposition="tucker2", rank_selection="evbmf"),
     '$.layers["layer1.0.conv1"].rank_selection', "expected one of budget, manual, param_reduction, vbmf, got 'evbmf'"),
    ("cp3-vbmf",
     _doc("layer1.0.conv1", decomposition="cp3", rank_selection="vbmf"),
     '$.layers["layer1.0.conv1"]', "rank_selection 'vbmf' cannot be used with decomposition 'cp3'"),
    ("cp4-vbmf",
     _doc("layer1.0.conv1", decomposition="cp4", rank_selection="vbmf"),
     '$.layers["layer1.0.conv1"]', "rank_selection 'vbmf' cannot be used with decomposition 'cp4'"),
    ("weakening-above-1",
     _doc("fc", decomposition="svd", rank_selection="vbmf", vbmf_weakenen_factor=1.5),
     '$.layers["fc"].vbmf_weakenen_factor', "expected a number in [0, 1], got 1.5"),
    ("weakening-negative",
     _doc("fc", decomposition="svd", rank_selection="vbmf", vbmf_weakenen_factor=-0.1),
     '$.layers["fc"].vbmf_weakenen_factor', "expected a number in [0, 1], got -0.1"),
    ("rate-1",
     _doc("fc", decomposition="svd", rank_selection="param_reduction", param_reduction_rate=1),
     '$.layers["fc"].param_reduction_rate', "expected a number > 1"),
    ("rate-half",
     _doc("fc", decomposition="svd", rank_selection="param_reduction", param_reduction_rate=0.5),
     '$.layers["fc"].param_reduction_rate', "expected a number > 1"),
    ("rate-string",
     _doc("fc", decomposition="svd", rank_selection="param_reduction", param_reduction_rate="2"),
     '$.layers["fc"].param_reduction_rate', "expected a finite number, got '2'"),
    ("manual-rank-nine-ranks",
     _doc("fc", decomposition="svd", rank_selection="manual", manual_rank=[list(range(1, 10))]),
     '$.layers["fc"].manual_rank[0]', "expected a positive int or a list of 1 to 8 positive ints, got a list of 9: "),
    ("settings-list", {"version": 1, "settings": []},
     "$.settings", "expected a mapping, got list"),
    ("settings-false", {"version": 1, "settings": False},
     "$.settings", "expected a mapping, got bool"),
    ("settings-zero", {"version": 1, "settings": 0},
     "$.settings", "expected a mapping, got int"),
    ("algo-list", {"version": 1, "settings": {"algo_kwargs": []}},
     "$.settings.algo_kwargs", "expected a mapping of decomposition names, got []"),
    ("algo-false", {"version": 1, "settings": {"algo_kwargs": False}},
     "$.settings.algo_kwargs", "expected a mapping of decomposition names, got False"),
    ("calibration-unknown", {"version": 1, "settings": {"calibration": "parallel"}},
     "$.settings.calibration", "expected one of sequential, independent, got 'parallel'"),
    ("ft_every-bool", {"version": 1, "settings": {"ft_every": True}},
     "$.settings.ft_every", "expected a positive int, got True"),
    ("ft_every-string", {"version": 1, "settings": {"ft_every": "2"}},
     "$.settings.ft_every", "expected a positive int, got '2'"),
    ("ft_every-zero", {"version": 1, "settings": {"ft_every": 0}},
     "$.settings.ft_every", "expected a positive int, got 0"),
    ("nglobal-float", {"version": 1, "settings": {"nglobal_compress_iters": 1.5}},
     "$.settings.nglobal_compress_iters", "expected a positive int, got 1.5"),
    ("unknown-top-level-key", {"version": 1, "layer": {}},
     "$", "unknown keys ['layer']"),
    ("unknown-settings-key", {"version": 1, "settings": {"ft_evry": 2}},
     "$.settings", "unknown keys ['ft_evry']"),
    ("future-version", {"version": 99},
     "$.version", "upgrade musco-core"),
    ("version-string", {"version": "1"},
     "$.version", "expected a positive int, got '1'"),
    ("layers-list", {"version": 1, "layers": ["fc"]},
     "$.layers", "expected a mapping of layer names, got list"),
    ("layer-is-list", {"version": 1, "layers": {"fc": ["svd", "vbmf"]}},
     '$.layers["fc"]', "expected a mapping of layer settings or null"),
    ("yaml-list", ["fc", "conv1"],
     "$", "expected a mapping"),
    ("unknown-algo-decomposition", {"version": 1, "settings": {"algo_kwargs": {"cp5": {}}}},
     '$.settings.algo_kwargs["cp5"]',
     "unknown decomposition or whole-model rank selector 'cp5'; known: budget, cp3, cp4, svd, tucker2, whitened_svd"),
    ("unknown-algo-key", {"version": 1, "settings": {"algo_kwargs": {"cp4": {"bogus": 1}}}},
     '$.settings.algo_kwargs["cp4"]', "unknown keys ['bogus']"),
    ("algo-bad-value", {"version": 1, "settings": {"algo_kwargs": {"cp4": {"n_iter_max": 0}}}},
     '$.settings.algo_kwargs["cp4"].n_iter_max', "expected a positive int, got 0"),
    ("negative-stage",
     _doc("fc", decomposition="svd", rank_selection="vbmf", curr_compr_iter=-1),
     '$.layers["fc"].curr_compr_iter', "expected a non-negative int, got -1"),
    ("force-string",
     _doc("fc", decomposition="svd", rank_selection="vbmf", force="yes"),
     '$.layers["fc"].force', "expected true or false, got 'yes'"),
    ("unknown-scheduler", {"version": 1, "settings": {"scheduler": "greedy"}},
     "$.settings.scheduler", "unknown scheduler 'greedy'; known: musco"),
]


@pytest.mark.parametrize("document, where, expectation", [case[1:] for case in REJECTIONS],
                         ids=[case[0] for case in REJECTIONS])
def test_rejection_names_file_path_and_expectation(tmp_path, registry, document, where, expectation):
    path = _write(tmp_path, yaml.safe_dump(document, sort_keys=False), "bad-schedule.yaml")
    message = _load_error(path, registry)
    lines = message.splitlines()
    assert len(lines) == 1, message  # one problem, one line
    assert lines[0].startswith(f"{path}: {where}: "), message
    assert expectation in lines[0], message


def test_a_missing_or_null_section_is_the_default(tmp_path, registry):
    """Null stands for "not set" (as for a layer); a list, false or 0 where a mapping is due is refused above."""
    for text in ("version: 1\n", "version: 1\nsettings: null\nlayers: null\n",
                 "version: 1\nsettings: {algo_kwargs: null}\n"):
        assert load_schedule(_write(tmp_path, text), registry) == ModelSchedule()


def test_unknown_key_message_lists_the_valid_keys(tmp_path, registry):
    document = _doc("layer1.1.conv2", decomposition="cp4", rank_selection="param_reduction", param_reduction=4)
    message = _load_error(_write(tmp_path, yaml.safe_dump(document)), registry)
    assert "param_reduction_rate" in message


def test_original_dict_form_rejection_names_origin(codec):
    data = copy.deepcopy(README_RESNET18)
    data["layer1.1.conv2"] = {"decomposition": "cp4", "rank_selection": "param_reduction", "param_reduction": 4,
                              "curr_compr_iter": 0}
    before = copy.deepcopy(data)
    with pytest.raises(ConfigError) as info:
        codec.structure(data, "model_compr_kwargs")
    assert str(info.value).startswith(
        "model_compr_kwargs: $.layers[\"layer1.1.conv2\"]: unknown keys ['param_reduction']")
    assert data == before


@pytest.mark.parametrize("text, expectation", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("version: 1\nlayers:\n  fc: null\n  fc: {decomposition: svd, rank_selection: vbmf}\n", "duplicate key 'fc'"),
    ("version: 1\nlayers: {fc: [\n", "not valid YAML"),
    ("version: 1\n  layers: x\n bad indentation: [\n", "not valid YAML"),
], ids=["empty", "comment-only", "duplicate-layer", "unclosed-flow", "bad-indentation"])
def test_unreadable_yaml_is_a_config_error_naming_the_file(tmp_path, registry, text, expectation):
    path = _write(tmp_path, text, "broken.yaml")
    message = _load_error(path, registry)
    assert message.startswith(f"{path}: "), message
    assert expectation in message


def test_duplicate_key_message_points_at_the_line(tmp_path, registry):
    text = "version: 1\nlayers:\n  fc: null\n  conv1: null\n  fc: {decomposition: svd, rank_selection: vbmf}\n"
    message = _load_error(_write(tmp_path, text), registry)
    assert "duplicate key 'fc'" in message and "line 5" in message


def test_every_duplicate_key_is_reported_in_one_error(tmp_path, registry):
    # only the first was reported ('settings' at line 5), then the others one fix at a time
    text = ("version: 1\nsettings: {ft_every: 1}\nlayers:\n  fc: null\n  fc: {decomposition: svd, decomposition: cp3}\n"
            "settings: {ft_every: 2}\n")
    message = _load_error(_write(tmp_path, text), registry)
    assert message.endswith("3 duplicate keys: 'fc' at line 5, column 3; 'decomposition' at line 5, column 28; "
                            "'settings' at line 6, column 1"), message


def test_missing_file_is_a_config_error_naming_it(tmp_path, registry):
    path = tmp_path / "no-such-schedule.yaml"
    message = _load_error(path, registry)
    assert message.startswith(f"{path}: "), message
    assert "cannot read" in message


def test_directory_instead_of_file_is_a_config_error(tmp_path, registry):
    message = _load_error(tmp_path, registry)
    assert message.startswith(f"{tmp_path}: ")


def test_non_utf8_file_is_a_config_error_naming_it(tmp_path, registry):
    path = _write(tmp_path, b"version: 1\nlayers: {\xff\xfe: null}\n", "latin.yaml")
    message = _load_error(path, registry)
    assert message.startswith(f"{path}: ")


@pytest.mark.parametrize("text", [
    "? [a, b]\n: 1\n",
    "version: 1\nlayers:\n  ? {name: fc}\n  : null\n",
], ids=["top-level", "layer-name"])
def test_unhashable_yaml_key_is_a_config_error(tmp_path, registry, text):
    path = _write(tmp_path, text)
    message = _load_error(path, registry)
    assert message.startswith(f"{path}: ")


@pytest.mark.parametrize("value", [5, "fast", [1]], ids=["int", "str", "list"])
def test_non_mapping_algo_kwargs_entry_is_a_config_error(tmp_path, registry, value):
    path = _write(tmp_path, yaml.safe_dump({"version": 1, "settings": {"algo_kwargs": {"cp4": value}}}))
    message = _load_error(path, registry)
    assert message.startswith(f'{path}: $.settings.algo_kwargs["cp4"]: '), message


def test_non_string_layer_name_is_rejected(tmp_path, registry):
    path = _write(tmp_path, "version: 1\nlayers:\n  1: null\n")
    message = _load_error(path, registry)
    assert "expected a layer name (a string), got 1; quote it, '1'" in message  # YAML's 1: is an int key


def test_several_problems_are_reported_together(tmp_path, registry):
    text = """\
version: 1
settings:
  ft_every: 0
  seed: -1
  bogus: true
layers:
  layer1.0.conv1: {decomposition: tucker3, rank_selection: vbmf}
  layer2.1.conv2: {decomposition: tucker2, rank_selection: manual, manual_rank: [[32, 32], [16, x]]}
  fc: {decomposition: svd, rank_selection: vbmf, vbmf_weakenen_factor: 2}
  conv1: [tucker2]
"""
    path = _write(tmp_path, text)
    message = _load_error(path, registry)
    lines = message.splitlines()
    wheres = ["$.settings.ft_every", "$.settings.seed", "$.settings",
              '$.layers["layer1.0.conv1"].decomposition', '$.layers["layer2.1.conv2"].manual_rank[1]',
              '$.layers["fc"].vbmf_weakenen_factor', '$.layers["conv1"]']
    assert len(lines) == len(wheres), message
    assert all(line.startswith(f"{path}: ") for line in lines), message
    for where in wheres:
        assert any(line.startswith(f"{path}: {where}: ") for line in lines), (where, message)


def test_unknown_scheduler_is_reported_with_other_settings_problems(tmp_path, registry):
    path = _write(tmp_path, "version: 1\nsettings: {scheduler: greedy, ft_every: 0}\n")
    lines = _load_error(path, registry).splitlines()
    assert len(lines) == 2, lines
    assert any("$.settings.scheduler: unknown scheduler 'greedy'" in line for line in lines)
    assert any("$.settings.ft_every: expected a positive int, got 0" in line for line in lines)


# ---------------------------------------------------------------- safety

@pytest.mark.parametrize("template", [
    '!!python/object/apply:os.system ["echo hacked > {tmp}/pwned"]\n',
    'version: 1\nlayers:\n  fc: !!python/object/apply:os.system ["echo hacked > {tmp}/pwned"]\n',
    'version: 1\nlayers:\n  fc: !!python/object/new:subprocess.check_output [["touch", "{tmp}/pwned"]]\n',
], ids=["top-level", "nested", "object-new"])
def test_python_tags_are_rejected_without_running_anything(tmp_path, registry, template):
    path = _write(tmp_path, template.replace("{tmp}", str(tmp_path)), "evil.yaml")
    message = _load_error(path, registry)
    assert message.startswith(f"{path}: "), message
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ConfigError):
        read_yaml(path)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- atomic writes

def _small_schedule(codec):
    return codec.structure({"version": 1, "layers": {"fc": {"decomposition": "svd", "rank_selection": "vbmf"}}})


def test_dump_leaves_no_temporary_files(tmp_path, codec, registry):
    big = codec.structure(copy.deepcopy(FULL_DOCUMENT))
    small = _small_schedule(codec)
    path = tmp_path / "schedule.yaml"
    dump_schedule(big, path, registry)
    assert sorted(os.listdir(tmp_path)) == ["schedule.yaml"]
    dump_schedule(small, path, registry)
    assert sorted(os.listdir(tmp_path)) == ["schedule.yaml"]
    # The shorter schedule replaced the longer one completely: nothing of the old one is left at the end.
    text = path.read_text(encoding="utf-8")
    assert "layer2.1.conv2" not in text and "cp4" not in text
    assert load_schedule(path, registry) == small
    assert read_yaml(path) == codec.unstructure(small)


def test_dump_replaces_an_existing_longer_file(tmp_path, codec, registry):
    path = tmp_path / "schedule.yaml"
    path.write_text("# old content\n" + "x" * 100_000 + "\n", encoding="utf-8")
    small = _small_schedule(codec)
    dump_schedule(small, path, registry)
    text = path.read_text(encoding="utf-8")
    assert "old content" not in text and "xxxx" not in text
    assert load_schedule(path, registry) == small
    assert sorted(os.listdir(tmp_path)) == ["schedule.yaml"]


def test_failed_dump_keeps_the_old_file_and_no_temporary(tmp_path, codec, registry, monkeypatch):
    path = tmp_path / "schedule.yaml"
    dump_schedule(codec.structure(copy.deepcopy(FULL_DOCUMENT)), path, registry)
    old = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        dump_schedule(_small_schedule(codec), path, registry)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["schedule.yaml"]
