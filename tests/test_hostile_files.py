"""Manifests, weights and reports are untrusted files: every damage is one ConfigError naming the file (and the
field), nothing is allocated before the declared shapes are checked against the weights file, and the fresh model
passed in is never changed."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from torch import nn

from musco_core import Compressor, ConfigError
from musco_core.io import load_compressed, read_report, save_compressed


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


SCHEDULE = {"2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[8, 8]]},
            "6": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    compressor = Compressor(model(), model_compr_kwargs=SCHEDULE, ft_every=2, progress=False)
    compressor.compression_step()
    return save_compressed(compressor, tmp_path_factory.mktemp("saved") / "out")


@pytest.fixture
def copy(saved, tmp_path):
    import shutil
    return shutil.copytree(saved, tmp_path / "out")


def edit_manifest(folder, edit):
    manifest = yaml.safe_load((folder / "musco.yaml").read_text())
    edit(manifest)
    (folder / "musco.yaml").write_text(yaml.safe_dump(manifest))


def layer(manifest, name="2"):
    return manifest["layers"][name]


CASES = {
    "negative out_channels": (lambda m: layer(m)["spec"].update(out_channels=-2),
                              r'\$\.layers\["2"\]: spec: expected positive out_channels'),
    "zero groups": (lambda m: layer(m)["spec"].update(groups=0), r"spec: expected positive .*groups"),
    "groups not dividing": (lambda m: layer(m)["spec"].update(groups=5), r"groups 5 does not divide"),
    "missing key": (lambda m: layer(m)["spec"].pop("in_channels"), r'\$\.layers\["2"\]\.spec\.in_channels'),
    "unknown key": (lambda m: layer(m).update(extra=1), r"unknown keys \['extra'\]"),
    "string channels": (lambda m: layer(m)["spec"].update(in_channels="16"), r"expected int, got '16'"),
    "bool channels": (lambda m: layer(m)["spec"].update(in_channels=True), r"expected int, got True"),
    "float channels": (lambda m: layer(m)["spec"].update(in_channels=16.0), r"expected int, got 16.0"),
    "padding mode": (lambda m: layer(m)["spec"].update(padding_mode="mirror"), r"padding_mode: expected one of"),
    "padding string": (lambda m: layer(m)["spec"].update(padding="full"), r"padding: expected 'same', 'valid'"),
    "negative padding": (lambda m: layer(m)["spec"].update(padding=[-1, 1]), r"padding: expected"),
    "stride arity": (lambda m: layer(m)["spec"].update(stride=[1]), r"kernel_size, stride and dilation of one"),
    "zero stride": (lambda m: layer(m)["spec"].update(stride=[0, 1]), r"positive kernel sizes, strides"),
    "4-d kernel": (lambda m: layer(m)["spec"].update(kernel_size=[3, 3, 3, 3], stride=[1] * 4, dilation=[1] * 4,
                                                    padding=[1] * 4), r"0 to 3 spatial axes"),
    "huge factor": (lambda m: layer(m)["factors"][1].update(out_channels=30000, in_channels=30000),
                    r"channels of consecutive factors do not connect"),
    "huge chain": (lambda m: (layer(m)["factors"][0].update(out_channels=30000),
                              layer(m)["factors"][1].update(in_channels=30000)), r"factor 0 declares a weight of "
                                                                                 r"shape \(30000, 8, 1, 1\)"),
    "unowned axis": (lambda m: layer(m)["factors"][1].update(axes=[0]), r"every spatial axis must be owned"),
    "doubly owned axis": (lambda m: layer(m)["factors"][0].update(axes=[0, 1]), r"every spatial axis must be owned"),
    "foreign axis": (lambda m: layer(m)["factors"][1].update(axes=[0, 5]), r"axes: \[0, 5\] are not axes"),
    "factor kernel": (lambda m: layer(m)["factors"][1].update(kernel_size=[5, 5]), r"does not fit the layer's"),
    "two biases": (lambda m: layer(m)["factors"][0].update(bias=True), r"exactly one factor carries the bias"),
    "no factors": (lambda m: layer(m).update(factors=[]), r"expected ranks and at least one factor"),
    "zero rank": (lambda m: layer(m).update(ranks=[0, 8]), r"ranks"),
    "layers a list": (lambda m: m.update(layers=[1, 2]), r"\$\.layers"),
    "unknown layer": (lambda m: m["layers"].update(nope=layer(m)), r"layer 'nope': no layer of that name"),
    "wrong adapter": (lambda m: layer(m, "6")["spec"].update(adapter="conv"), r"layer '6': "),
    "format": (lambda m: m.update(format=7), r"not a musco-core model manifest of format 1"),
    "not a mapping": (lambda m: m.clear(), r"not a musco-core model manifest"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_manifest_is_one_clear_error_and_the_model_is_untouched(copy, case):
    edit, message = CASES[case]
    edit_manifest(copy, edit)
    fresh = model()
    before = {key: value.clone() for key, value in fresh.state_dict().items()}
    with pytest.raises(ConfigError, match=message) as caught:
        load_compressed(fresh, copy)
    assert "musco.yaml" in str(caught.value) or "model.safetensors" in str(caught.value)
    assert all(torch.equal(before[key], value) for key, value in fresh.state_dict().items())
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model().modules()]


def test_a_manifest_that_is_not_yaml_or_not_text_is_one_clear_error(copy):
    (copy / "musco.yaml").write_bytes(b"\xff\xfe\x00 layers: [")
    with pytest.raises(ConfigError, match="musco.yaml: cannot read: not UTF-8"):
        load_compressed(model(), copy)
    (copy / "musco.yaml").write_text("format: 1\nlayers: {a: [1, 2}\n")
    with pytest.raises(ConfigError, match="musco.yaml: not valid YAML"):
        load_compressed(model(), copy)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:100], r"model.safetensors: cannot read"),
    (lambda data: b"", r"model.safetensors: cannot read"),
    (lambda data: b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}x", r"model.safetensors: cannot read"),
])
def test_a_damaged_weights_file_is_one_clear_error(copy, damage, message):
    weights = copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ConfigError, match=message):
        load_compressed(model(), copy)


def test_a_weights_file_whose_header_lies_about_a_shape_is_refused_before_loading(copy):
    """The manifest and the header agree on a huge factor, but the file cannot hold it: safetensors refuses."""
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["2.0.weight"]["shape"] = [30000, 30000, 1, 1]
    encoded = json.dumps(header).encode()
    weights.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + size:])
    with pytest.raises(ConfigError, match=r"model.safetensors: cannot read"):
        load_compressed(model(), copy)


def test_a_huge_declared_factor_allocates_nothing(saved, tmp_path):
    """The 30000 x 30000 factor of the issue, loaded under a 2 GB address-space limit: one clear error."""
    import shutil
    folder = shutil.copytree(saved, tmp_path / "out")
    edit_manifest(folder, CASES["huge chain"][0])
    script = textwrap.dedent(f"""
        import resource, sys
        import torch
        from torch import nn
        from musco_core import ConfigError
        from musco_core.io import load_compressed
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, hard))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=2),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        try:
            load_compressed(model, {str(folder)!r})
        except ConfigError as exc:
            print("refused:", exc)
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    refused, peak_kib = process.stdout.strip().splitlines()
    assert "factor 0 declares a weight of shape (30000, 8, 1, 1)" in refused
    assert int(peak_kib) < 1_000_000  # well under the 3.6 GB a 30000 x 30000 float32 factor would need


@pytest.mark.parametrize("content, message", [
    ("[" * 100_000, r"report.json: not a musco-core report"),
    ('{"format": 1, "layers": 5}', r"report.json: not a musco-core report"),
    ('{"format": 3}', r"report.json: not a musco-core report"),
    ("\ud800", r"report.json: "),
])
def test_a_damaged_report_is_one_clear_error(copy, content, message):
    (copy / "report.json").write_text(content, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(ConfigError, match=message):
        read_report(copy)


def test_a_fresh_model_with_a_hooked_layer_is_refused_with_the_reason(copy):
    fresh = model()
    fresh[2].register_forward_hook(lambda module, inputs, output: output * 2)
    with pytest.raises(ConfigError, match=r"layer '2': the file has a conv layer, the model's Conv2d cannot be "
                                          r"rebuilt: .*hook"):
        load_compressed(fresh, copy)


def test_a_step_error_names_the_layer_once():
    from musco_core import CompressionError

    bad = model()
    with torch.no_grad():
        bad[2].weight[0, 0, 0, 0] = float("nan")
    compressor = Compressor(bad, model_compr_kwargs=SCHEDULE, ft_every=2, progress=False)
    with pytest.raises(CompressionError) as caught:
        compressor.compression_step()
    assert str(caught.value).count("layer '2'") == 1, str(caught.value)
