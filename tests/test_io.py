"""Saving, loading and exporting compressed models: identical outputs, no pickle, clear errors."""
from __future__ import annotations

import copy
import json
import os
import pickle
import stat
import types

import numpy as np
import pytest
import torch
import yaml

from models import make_trained_like, resnet18
from torch import nn
from torch.nn.utils import parametrizations, prune

from musco_core import (Compressor, ConfigError, FactorizedLayer, LayerAdapter, LayerSpec, MuscoError, Registry,
                        hookimpl, make_plugin_manager, standardize_model)
from musco_core.io import load_compressed, read_report, save_compressed

SCHEDULE = {
    "layer1.0.conv1": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[8, 8], [4, 4]]},
    "layer2.0.conv2": {"decomposition": "cp3", "rank_selection": "param_reduction", "param_reduction_rate": 3},
    "layer3.0.conv2": {"decomposition": "cp4", "rank_selection": "manual", "manual_rank": [12, 6]},
    "layer2.0.downsample.0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [8, 4]},
    "fc": {"decomposition": "svd", "rank_selection": "vbmf"},
}


def make_model():
    return make_trained_like(resnet18(num_classes=10, width=16), seed=3).eval()


@pytest.fixture(scope="module")
def compressed():
    compressor = Compressor(make_model(), model_compr_kwargs=SCHEDULE, ft_every=3, nglobal_compress_iters=2,
                            example_input=torch.randn(1, 3, 32, 32))
    while not compressor.done:
        compressor.compression_step()
    compressor.compressed_model.eval()
    return compressor


def test_save_then_load_gives_identical_outputs(tmp_path, compressed):
    save_compressed(compressed, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model.safetensors", "musco.yaml", "report.json",
                                                               ".musco-core"}
    fresh = make_trained_like(resnet18(num_classes=10, width=16), seed=99)
    before = copy.deepcopy(fresh.state_dict())
    loaded = load_compressed(fresh, tmp_path / "out").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), compressed.compressed_model(x))
    assert isinstance(loaded.get_submodule("layer1.0.conv1"), FactorizedLayer)
    assert all(torch.equal(before[k], fresh.state_dict()[k]) for k in before), "the fresh model was modified"
    standardize_model(loaded)
    assert torch.equal(loaded(x), compressed.compressed_model(x))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_the_weights_file_gets_the_mode_of_the_other_files(tmp_path, compressed, umask, mode):
    # safetensors wrote it 0600 whatever the umask: a folder shared with a group had a manifest others could read
    # and weights they could not
    old = os.umask(umask)
    try:
        save_compressed(compressed, tmp_path / "out")
        step = compressed.save_state(tmp_path / "ckpt")
    finally:
        os.umask(old)
    files = [tmp_path / "out" / name for name in ("model.safetensors", "musco.yaml", "report.json")]
    files += [step / name for name in ("model.safetensors", "state.yaml")]
    assert {file.name: stat.S_IMODE(file.stat().st_mode) for file in files} == dict.fromkeys(
        ["model.safetensors", "musco.yaml", "report.json", "state.yaml"], mode)


def test_manifest_records_ranks_versions_and_a_valid_schedule(tmp_path, compressed, registry):
    save_compressed(compressed, tmp_path)
    manifest = yaml.safe_load((tmp_path / "musco.yaml").read_text())
    assert manifest["musco_core_version"] == "0.1.0"
    assert manifest["layers"]["layer1.0.conv1"]["ranks"] == [4, 4]
    assert manifest["components"]["decomposition/cp4"]["distribution"] == "musco-core"
    from musco_core import validate_model_compr_kwargs
    schedule = validate_model_compr_kwargs(manifest["schedule"], registry=registry)
    assert schedule.layers["layer3.0.conv2"].rank_params.manual_rank == [(6,)]
    report = read_report(tmp_path)
    assert report == compressed.report()
    assert json.loads((tmp_path / "report.json").read_text())["totals"]["params_ratio"] > 1


def test_loading_into_a_different_architecture_is_a_clear_error(tmp_path, compressed):
    save_compressed(compressed, tmp_path)
    other = resnet18(num_classes=10, width=32)
    with pytest.raises(ConfigError, match=r"layer 'layer1.0.conv1'.*32->32"):
        load_compressed(other, tmp_path)


def test_loading_into_a_model_on_the_meta_device_is_a_clear_error(tmp_path, compressed):
    """Copying the weights into meta tensors does nothing: the model came back without them, silently, and
    failed only when called ('Tensor on device meta is not on the expected device cpu!')."""
    save_compressed(compressed, tmp_path)
    with torch.device("meta"):
        fresh = resnet18(num_classes=10, width=16)
    with pytest.raises(ConfigError, match=r"ResNet has \d+ parameter\(s\) or buffer\(s\) on the meta device "
                                          r"\('conv1\.weight', .*cannot copy the weights of .*to_empty"):
        load_compressed(fresh, tmp_path)


def test_a_weights_file_that_does_not_fit_is_a_clear_error(tmp_path, compressed):
    save_compressed(compressed, tmp_path)
    manifest = yaml.safe_load((tmp_path / "musco.yaml").read_text())
    manifest["layers"]["layer1.0.conv1"]["ranks"] = [5, 5]
    manifest["layers"]["layer1.0.conv1"]["factors"][0]["out_channels"] = 5
    manifest["layers"]["layer1.0.conv1"]["factors"][1]["in_channels"] = 5
    (tmp_path / "musco.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError, match="model.safetensors"):
        load_compressed(make_model(), tmp_path)


def test_a_damaged_manifest_names_the_file_and_field(tmp_path, compressed):
    save_compressed(compressed, tmp_path)
    manifest = yaml.safe_load((tmp_path / "musco.yaml").read_text())
    manifest["layers"]["fc"]["spec"]["groups"] = "one"
    (tmp_path / "musco.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError, match=r'musco.yaml: .*\$\.layers\["fc"\]\.spec\.groups'):
        load_compressed(make_model(), tmp_path)


def test_nothing_in_the_files_is_executed(tmp_path, compressed):
    save_compressed(compressed, tmp_path)
    marker = tmp_path / "pwned"
    text = (tmp_path / "musco.yaml").read_text()
    (tmp_path / "musco.yaml").write_text(
        text.replace("format: 1", f"format: !!python/object/apply:os.system ['touch {marker}']", 1))
    with pytest.raises(ConfigError):
        load_compressed(make_model(), tmp_path)

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "musco.yaml").write_text(text)
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ConfigError):
        load_compressed(make_model(), tmp_path)
    assert not marker.exists()


def test_saving_needs_factorized_layers(tmp_path, compressed):
    with pytest.raises(MuscoError, match="standardize_model"):
        save_compressed(standardize_model(copy.deepcopy(compressed.compressed_model)), tmp_path)


def build_small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


SMALL_SCHEDULE = {"2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[16, 8], [8, 8]]},
                  "6": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4, 2]}}


def small_stepped(registry, **kwargs) -> Compressor:
    """A compressor over :func:`build_small` after its first step: layer '2' tucker2 at (16, 8), '6' svd at (4,)."""
    compressor = Compressor(build_small(), model_compr_kwargs=SMALL_SCHEDULE, ft_every=2, registry=registry,
                            progress=False, example_input=torch.randn(1, 3, 8, 8), **kwargs)
    compressor.compression_step()
    return compressor


class Tagged(nn.Conv2d):
    def get_extra_state(self):
        return {"scale": 1.0}

    def set_extra_state(self, state):
        pass


def test_extra_state_that_is_no_tensor_saves_nothing(tmp_path, registry):
    """A dict from get_extra_state made save_compressed fail with a raw AttributeError ('dict' object has no
    attribute 'device') while writing; now it is refused, with the module, before anything is written."""
    model = small_stepped(registry).compressed_model
    model[0] = Tagged(3, 16, 3, padding=1)
    with pytest.raises(ConfigError, match=r"'0' \(Tagged\) holds extra state: its state entry '0\._extra_state' "
                                          r"is a dict, not a plain tensor"):
        save_compressed(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_compressor_whose_model_was_standardized_saves_nothing(tmp_path, registry):
    compressor = small_stepped(registry)
    standardize_model(compressor.compressed_model)  # as a README reader might, before saving
    with pytest.raises(ConfigError, match=r"no factorized layers to save \(was standardize_model called already\?\)"):
        save_compressed(compressor, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"was standardize_model called already\?"):
        compressor.save_state(tmp_path / "ckpt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


class InOutLinear(nn.Module):
    """A third-party linear layer that stores its weight ``(in, out)``, as Hugging Face's Conv1D does."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x):
        return x @ self.weight + self.bias


class InOutAdapter(LayerAdapter):
    """Builds the factors as InOutLinear modules too, each holding its weight transposed to its layout's."""

    name = "inout"
    module_types = (InOutLinear,)

    def read(self, module):
        return (LayerSpec(self.name, module.out_features, module.in_features, has_bias=True),
                module.weight.detach().T, module.bias.detach())

    def build(self, spec, factors, like):
        modules = []
        for factor in factors:
            module = InOutLinear(factor.layout.in_channels, factor.layout.out_channels).to(like)
            with torch.no_grad():
                module.weight.copy_(factor.weight.T)
                module.bias.copy_(factor.bias if factor.bias is not None else torch.zeros_like(module.bias))
            modules.append(module)
        return modules


def test_a_plugin_adapter_whose_modules_store_the_weight_transposed_loads_back(tmp_path):
    """save_compressed checks the factors against the modules the adapter builds, but load_compressed checked the
    file against the layouts' conv-layout shapes: a layer of such an adapter saved fine and then never loaded
    ('factor 0 declares a weight of shape (4, 16), model.safetensors holds (16, 4)'). Now both check the same."""
    @hookimpl
    def musco_register_layer_adapters():
        return [InOutAdapter]

    plugin = types.ModuleType("inout_plugin")
    plugin.musco_register_layer_adapters = musco_register_layer_adapters
    registry = Registry.from_plugin_manager(make_plugin_manager(entry_points=False, plugins=[("inout", plugin)]))

    def build():
        torch.manual_seed(0)
        return nn.Sequential(InOutLinear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    compressor = Compressor(build(), registry=registry, progress=False, example_input=torch.randn(2, 16),
                            model_compr_kwargs={"0": {"decomposition": "svd", "rank_selection": "manual",
                                                      "manual_rank": [4]}})
    compressor.compression_step()
    save_compressed(compressor, tmp_path / "out")
    loaded = load_compressed(build(), tmp_path / "out", registry=registry)
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), compressor.compressed_model(x))
    assert [type(factor) for factor in loaded[0]] == [InOutLinear, InOutLinear]


def test_loading_a_layer_whose_adapter_plugin_failed_to_load_names_the_plugin(tmp_path):
    """With the plugin of a file's layer adapter failed to load (an import error), load_compressed said only that
    the stock linear adapter cannot rebuild the model's InOutLinear, as if the model were at fault; the failure was
    in a log line. Now the error says the file's adapter is not installed and names the plugin that failed, and why."""
    def plugin(hook):
        module = types.ModuleType("inout_plugin")
        module.musco_register_layer_adapters = hookimpl(hook)
        return Registry.from_plugin_manager(make_plugin_manager(entry_points=False, plugins=[("inout", module)]))

    def broken():
        raise ImportError("No module named 'inout_kernels'")

    def build():
        torch.manual_seed(0)
        return nn.Sequential(InOutLinear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    compressor = Compressor(build(), registry=plugin(lambda: [InOutAdapter]), progress=False,
                            example_input=torch.randn(2, 16),
                            model_compr_kwargs={"0": {"decomposition": "svd", "rank_selection": "manual",
                                                      "manual_rank": [4]}})
    compressor.compression_step()
    save_compressed(compressor, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"layer '0': the file has a inout layer, and no layer adapter 'inout' is "
                                          r"installed; plugins that failed to load: 'inout' \(<registered in code>\): "
                                          r"ImportError: No module named 'inout_kernels'"):
        load_compressed(build(), tmp_path / "out", registry=plugin(broken))


def narrow(layer: FactorizedLayer) -> None:
    """Cuts the rank between the first two factors of a tucker2 layer from 8 to 6 by hand, leaving its layouts."""
    first, core = layer[0], layer[1]
    layer[0] = nn.Conv2d(first.in_channels, 6, 1, bias=False)
    layer[1] = nn.Conv2d(6, core.out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        layer[0].weight.copy_(first.weight[:6])
        layer[1].weight.copy_(core.weight[:, :6])


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda layer: prune.l1_unstructured(layer[1], "weight", 0.5), r"its factor 1 \(Conv2d\): it is pruned"),
    (lambda layer: parametrizations.weight_norm(layer[1]),
     r"its factor 1 \(ParametrizedConv2d\): its weight is parametrized"),
    (narrow, r"its factor 0 \(Conv2d\) holds weight of shape \(6, 16, 1, 1\) where its layout gives weight of shape "
             r"\(8, 16, 1, 1\)"),
], ids=["pruned", "weight_norm", "narrowed"])
def test_a_factor_changed_since_its_step_saves_nothing(tmp_path, registry, edit, reason):
    compressor = small_stepped(registry)
    edit(compressor.compressed_model[2])
    for save in (lambda: save_compressed(compressor, tmp_path / "out"),
                 lambda: save_compressed(compressor.compressed_model, tmp_path / "out"),
                 lambda: compressor.save_state(tmp_path / "ckpt")):
        with pytest.raises(ConfigError, match=f"would not load back:\nlayer '2': {reason}"):
            save()
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_a_wrapped_model_is_stepped_and_saved_as_the_module_inside(tmp_path, registry, wrap):
    x = torch.randn(1, 3, 8, 8)
    compressor = small_stepped(registry, nglobal_compress_iters=2)
    wrapped = compressor.compressed_model = wrap(compressor.compressed_model)  # for fine-tuning
    compressor.compression_step()
    inner = wrapped._orig_mod if isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) else wrapped.module
    assert compressor.compressed_model is wrapped and inner[2].ranks == (8, 8)
    save_compressed(compressor, tmp_path / "out")
    assert set(yaml.safe_load((tmp_path / "out" / "musco.yaml").read_text())["layers"]) == {"2", "6"}
    assert torch.equal(load_compressed(build_small(), tmp_path / "out").eval()(x), inner.eval()(x))
    assert torch.equal(load_compressed(wrap(build_small()), tmp_path / "out").eval()(x), inner(x))  # as saved
    compressor.save_state(tmp_path / "ckpt")
    for fresh in (build_small(), wrap(build_small())):
        resumed = Compressor.resume(fresh, tmp_path / "ckpt", registry=registry, example_input=x)
        assert resumed.ranks == compressor.ranks and torch.equal(resumed.compressed_model.eval()(x), inner(x))


def test_loading_into_a_model_with_another_head_names_the_tensors_and_shapes(tmp_path, registry):
    compressor = Compressor(build_small(), model_compr_kwargs={"2": SMALL_SCHEDULE["2"]}, registry=registry,
                            progress=False)
    compressor.compression_step()
    save_compressed(compressor, tmp_path)
    other = build_small()
    other[6] = nn.Linear(32, 12)
    with pytest.raises(ConfigError) as refused:
        load_compressed(other, tmp_path)
    assert str(refused.value) == (f"{tmp_path / 'model.safetensors'}: does not fit the Sequential given: 6.weight is "
                                  f"(10, 32) in the file, (12, 32) in the model; 6.bias is (10,) in the file, (12,) "
                                  f"in the model; load into the architecture the model was saved from")


def test_loaded_layers_are_frozen_and_laid_out_as_the_run_left_them(tmp_path, registry):
    """A frozen backbone stays frozen after save and load (as in the uninterrupted run), a frozen weight next to a
    trainable bias too, and conv factors of a channels_last model stay channels_last."""
    def frozen() -> nn.Module:
        model = build_small().to(memory_format=torch.channels_last)
        model[2].weight.requires_grad_(False)
        model[6].requires_grad_(False)
        return model

    compressor = Compressor(frozen(), model_compr_kwargs=SMALL_SCHEDULE, ft_every=2, registry=registry,
                            progress=False)
    compressor.compression_step()
    save_compressed(compressor, tmp_path)
    loaded = load_compressed(frozen(), tmp_path)

    def layout(model: nn.Module) -> dict[str, tuple[bool, bool]]:
        return {name: (p.requires_grad, p.is_contiguous()) for name, p in model.named_parameters()}

    assert layout(loaded) == layout(compressor.compressed_model)
    assert not layout(loaded)["2.1.weight"][0] and layout(loaded)["2.2.bias"][0] and not layout(loaded)["6.1.bias"][0]
    assert not layout(loaded)["2.1.weight"][1]  # the 3x3 core, channels_last


def test_standardized_model_exports_with_trace_export_and_onnx(compressed):
    import onnxruntime

    model = standardize_model(copy.deepcopy(compressed.compressed_model)).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    with pytest.warns(DeprecationWarning):
        traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), expected)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(onnx_out, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


# --- the advisory lock every writer takes -----------------------------------------------------------------------

def test_advisory_lock_is_exclusive_released_on_exit_and_waits_where_asked(tmp_path):
    from musco_core.schedule import advisory_lock

    path = tmp_path / "lock"
    path.touch()
    first, second = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)  # two open files: as two processes
    try:
        with advisory_lock(first) as held:
            with advisory_lock(second) as other:
                assert (held, other) == (True, False)
        with advisory_lock(second, wait=True) as other:
            assert other
    finally:
        os.close(first)
        os.close(second)


def _no_locks(*args):
    import errno
    raise OSError(errno.ENOLCK, "No locks available")


@pytest.mark.parametrize("writer", ["saving folder", "run output", "latency cache"])
def test_every_writer_runs_unguarded_where_the_file_system_has_no_locks(tmp_path, monkeypatch, writer):
    """NFS without a lock manager fails flock with ENOLCK. Saving an output set ran unguarded there, as documented,
    but `musco compress` failed with 'OSError: [Errno 37] No locks available' and the latency cache was never
    saved: three lock helpers, now one (schedule.advisory_lock)."""
    import fcntl

    from musco_core import io
    from musco_core.latency import LatencyCache

    monkeypatch.setattr(fcntl, "flock", _no_locks)
    if writer == "saving folder":
        with io.folder_lock(tmp_path) as alone:
            assert alone
    elif writer == "run output":
        with io.output_lock(tmp_path / "out"):
            assert (tmp_path / "out" / ".musco-lock").read_text() == str(os.getpid())
    else:
        cache = LatencyCache(tmp_path / "cache.json")
        cache.add("key", 0.5)
        cache.save()
        assert LatencyCache(tmp_path / "cache.json").entries == {"key": 0.5}
