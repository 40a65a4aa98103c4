"""Nothing lost: resume after a kill, determinism, and odd models handled with a clear error or a logged skip."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from musco_core import CompressionError, Compressor, ConfigError, ModelStats

HERE = Path(__file__).parent


def test_resume_without_a_state_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a musco-core checkpoint folder.*nothing to resume"):
        Compressor.resume(nn.Linear(4, 4), tmp_path)


def small(layer):
    return nn.Sequential(layer)


@pytest.mark.parametrize("decomposition", ["svd", "tucker2", "cp3"])
def test_every_decomposition_is_bitwise_reproducible(registry, decomposition):
    torch.manual_seed(0)
    layer = nn.Linear(40, 30) if decomposition == "svd" else nn.Conv2d(16, 24, 3)
    rank = [8] if decomposition != "tucker2" else [[8, 6]]
    config = {"0": {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": rank}}
    weights = []
    for _ in range(2):
        compressor = Compressor(small(layer), model_compr_kwargs=config, seed=3, registry=registry)
        compressor.compression_step()
        weights.append(compressor.compressed_model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_clear_error_that_changes_nothing(registry, bad):
    layer = nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = bad
    config = {"0": {"decomposition": "tucker2", "rank_selection": "vbmf"}}
    compressor = Compressor(small(layer), model_compr_kwargs=config, registry=registry)
    with pytest.raises(CompressionError, match=r"layer '0'.*non-finite"):
        compressor.compression_step()
    assert type(compressor.compressed_model[0]) is nn.Conv2d


def test_a_layer_that_would_not_get_smaller_is_reported_at_its_dense_form(registry):
    # the report's row used to carry the refused ranks ([12], in JSON too) as if the layer had them
    compressor = Compressor(small(nn.Linear(16, 16)), model_compr_kwargs={
        "0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [12]}}, registry=registry)
    (result,) = compressor.compression_step()
    row = json.loads(compressor.report().to_json())["layers"][0]
    assert (row["applied"], row["ranks"], row["params_after"], row["relative_error"]) == (False, None, 256, None)
    assert result.ranks is None and compressor.ranks == {"0": None}
    assert "svd at ranks (12,) would not be smaller (384 vs 256 weights" in result.note


def test_zero_weights_are_kept_with_a_reason(registry):
    layer = nn.Linear(32, 32)
    nn.init.zeros_(layer.weight)
    compressor = Compressor(small(layer), model_compr_kwargs={
        "0": {"decomposition": "svd", "rank_selection": "vbmf"}}, registry=registry)
    (result,) = compressor.compression_step()
    assert not result.applied and "would not be smaller" in result.note


@pytest.mark.parametrize("layer,decomposition,rank", [
    (nn.Linear(1, 8), "svd", [1]),
    (nn.Conv2d(1, 1, 3), "tucker2", [[1, 1]]),
    (nn.Conv2d(1, 1, 3), "cp3", [1]),
])
def test_one_channel_layers_are_kept_with_a_reason(registry, layer, decomposition, rank):
    compressor = Compressor(small(layer), model_compr_kwargs={
        "0": {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": rank}}, registry=registry)
    (result,) = compressor.compression_step()
    assert not result.applied and result.note


@pytest.mark.parametrize("layer,decomposition,rank,limit", [
    (nn.Linear(64, 32), "svd", [40, 8], "rank at most [32]"),
    (nn.Conv2d(16, 24, 3), "tucker2", [[25, 8]], "r_out, r_in at most [24, 16]"),
    (nn.Conv2d(16, 24, 3, groups=4), "tucker2", [[6, 5]], "r_out, r_in at most [6, 4]"),
])
def test_manual_ranks_above_the_layer_are_a_config_error(registry, layer, decomposition, rank, limit):
    model = nn.Sequential(layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"0": {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": rank}}
    with pytest.raises(ConfigError, match=rf'\$\.layers\["0"\]: manual_rank\[\d\].*{re.escape(limit)}'):
        Compressor(model, model_compr_kwargs=config, nglobal_compress_iters=len(rank), registry=registry,
                   inplace=True)
    assert type(model[0]) is type(layer) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_module_no_adapter_knows_is_named_in_the_error(registry):
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ConvTranspose2d(4, 4, 3))
    config = {"1": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[2, 2]]}}
    with pytest.raises(ConfigError, match=r'\$\.layers\["1"\].*no adapter handles ConvTranspose2d'):
        Compressor(model, model_compr_kwargs=config, registry=registry)


def test_a_lazy_model_is_a_clear_error(registry):
    model = nn.Sequential(nn.LazyLinear(8))
    with pytest.raises(ConfigError, match="uninitialized .lazy. parameters; run one forward pass"):
        Compressor(model, model_compr_kwargs={"0": {"decomposition": "svd", "rank_selection": "vbmf"}},
                   registry=registry)


def _scripted(model, x):
    return torch.jit.script(model)


def _traced(model, x):
    return torch.jit.trace(model, x)


@pytest.mark.parametrize("compile_", [_scripted, _traced])
def test_a_torchscript_model_is_a_clear_error(registry, tmp_path, compile_):
    """Its layers are TorchScript modules, which no adapter reads: a run on it compressed nothing, silently."""
    x = torch.randn(2, 8)
    model = compile_(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), x)
    with pytest.raises(ConfigError, match=r"TorchScript .*compress the Python nn\.Module, then script or trace"):
        Compressor(model, config_type="param_reduction", registry=registry, example_input=x)
    with pytest.raises(ConfigError, match="TorchScript"):
        Compressor.resume(model, tmp_path, registry=registry, example_input=x)


@pytest.mark.parametrize("example", [False, True])
def test_an_exported_program_module_is_a_clear_error(registry, example):
    """torch.export's module() computes with its weights in ATen operators and has no layer to replace: a run on it
    compressed nothing without an example input, and failed with a raw NotImplementedError ('Calling eval() is not
    supported yet') with one."""
    x = torch.randn(2, 8)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    exported = torch.export.export(model, (x,)).module()
    with pytest.raises(ConfigError, match=r"graph of ATen operators .*compress the nn\.Module, then export"):
        Compressor(exported, config_type="param_reduction", registry=registry, example_input=x if example else None)


def test_torchscript_layers_inside_a_model_are_left_out_with_the_reason(registry):
    """Scripted or traced layers are no Conv2d an adapter reads: they were left out of statistics and generated
    schedules without a word."""
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())), nn.Conv2d(8, 8, 3),
                          torch.jit.trace(nn.Conv2d(8, 8, 1), torch.randn(1, 8, 4, 4)))
    stats = ModelStats.from_model(model, registry, x)
    assert list(stats.layers) == ["1"] and list(stats.excluded) == ["0.0", "2"]
    assert stats.excluded["2"].startswith("it is a TorchScript Conv2d (torch.jit.script or trace)")
    with pytest.raises(ConfigError, match=r'\$\.layers\["0\.0"\]: cannot be compressed: it is a TorchScript Conv2d'):
        Compressor(model, model_compr_kwargs={"0.0": {"decomposition": "tucker2", "rank_selection": "manual",
                                                      "manual_rank": [[8, 3]]}}, registry=registry)


def test_a_quantized_model_is_a_clear_error(registry):
    """quantize_dynamic's packed parameters are no plain tensors: the run failed with a raw AttributeError
    ('torch.dtype' object has no attribute 'detach') while fingerprinting the model."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated, still in use
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ConfigError, match=r"'3\._packed_params' \(LinearPackedParams\) holds quantized state.*"
                                          r"compress the float model, then quantize it"):
        Compressor(model, config_type="param_reduction", registry=registry, example_input=torch.randn(1, 3, 8, 8))


class ExtraState(nn.Linear):
    def get_extra_state(self):
        return {"scale": 1.0}

    def set_extra_state(self, state):
        pass


def test_extra_state_that_is_no_tensor_is_a_clear_error(registry):
    """A dict from get_extra_state: the run failed with a raw AttributeError ('dict' object has no attribute
    'detach') while fingerprinting the model."""
    model = nn.Sequential(ExtraState(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match=r"'0' \(ExtraState\) holds extra state: its state entry '0\._extra_state' "
                                          r"is a dict, not a plain tensor"):
        Compressor(model, model_compr_kwargs={"2": {"decomposition": "svd", "rank_selection": "manual",
                                                    "manual_rank": [4]}}, registry=registry)


@pytest.mark.parametrize("example", [False, True])
def test_a_model_on_the_meta_device_is_a_clear_error(registry, tmp_path, example):
    """Built under torch.device('meta'), its weights not loaded yet: they hold no values, and the run failed with a
    raw NotImplementedError ('Cannot copy out of meta tensor') from deep inside; resuming on one did the same."""
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).to("meta")
    x = torch.randn(2, 8, device="meta") if example else None
    with pytest.raises(ConfigError, match=r"Sequential has 4 parameter\(s\) or buffer\(s\) on the meta device "
                                          r"\('0\.weight', '0\.bias', '2\.weight', \.\.\.\).*load its weights"):
        Compressor(model, model_compr_kwargs={"0": {"decomposition": "svd", "rank_selection": "vbmf"}},
                   registry=registry, example_input=x)
    with pytest.raises(ConfigError, match="on the meta device"):
        Compressor.resume(model, tmp_path, registry=registry, example_input=x)
