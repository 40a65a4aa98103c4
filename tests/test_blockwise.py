"""Blockwise compression (sequential onloading): a model on the meta device, its weights read block by block from a
safetensors checkpoint, gives the output set a one-step in-memory run with sequential calibration gives."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from musco_core import CompressionError, Compressor, ConfigError, FactorizedLayer, blockwise, compress_blockwise
from musco_core.blockwise import TensorEntry, resolve_blocks, unique_entries, write_safetensors
from musco_core.calibration import forward_order
from musco_core.io import load_compressed, read_manifest, read_report

VOCAB = 60
BLOCKS = r"re:transformer\.h\.\d+"


def gpt2_config(**overrides) -> GPT2Config:
    settings = {"vocab_size": VOCAB, "n_positions": 32, "n_embd": 32, "n_layer": 3, "n_head": 4, "bos_token_id": 0,
                "eos_token_id": 0, "use_cache": False, **overrides}
    return GPT2Config(**settings)


def gpt2(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(**overrides)).eval()


def meta_gpt2(**overrides) -> GPT2LMHeadModel:
    """The architecture on the meta device, but for the buffers a checkpoint does not hold, which must be real:
    transformers 4's GPT-2 keeps its causal mask in such buffers (``attn.bias``, ``attn.masked_bias``)."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(gpt2_config(**overrides))
    unsaved = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    if unsaved:
        with torch.random.fork_rng():
            real = dict(GPT2LMHeadModel(gpt2_config(**overrides)).named_buffers())
        for name in unsaved:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = real[name]
    return model


def token_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, VOCAB, (2, 12), generator=generator),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(n)]
    batches[1]["attention_mask"][0, 8:] = 0  # a padded sequence: the mask differs between batches
    return batches


def conv1d_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]


def schedule(names: list[str], calibration: str = "sequential", **layer) -> dict:
    layer = layer or {"decomposition": "whitened_svd", "rank_selection": "vbmf"}
    # ranks as vbmf chose them (no rounding up to hardware multiples): every layer of the tiny model then shrinks
    return {"version": 1, "settings": {"ft_every": len(names), "calibration": calibration, "rank_multiple": 1},
            "layers": {name: dict(layer) for name in names}}


def in_memory(model: nn.Module, plan: dict, data) -> Compressor:
    compressor = Compressor(model, model_compr_kwargs=plan, calibration_data=data, progress=False)
    compressor.compression_step()
    assert compressor.done
    return compressor


def assert_same_weights(expected: nn.Module, actual: nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        scale = float(want[key].float().norm()) or 1.0
        assert float((want[key].float() - got[key].float()).norm()) <= 1e-5 * scale, key


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "gpt2.safetensors"
    save_model(gpt2(), str(path))
    return path


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_blockwise_gpt2_equals_the_in_memory_sequential_run(tmp_path, checkpoint, offload):
    model, data = gpt2(), token_batches()
    plan = schedule(conv1d_layers(model))
    expected = in_memory(model, plan, data)
    meta = meta_gpt2()
    report = compress_blockwise(meta, plan, BLOCKS, tmp_path / "out", checkpoint=checkpoint, calibration_data=data,
                                offload=offload, work_dir=tmp_path, progress=False)
    assert [(r.name, r.ranks, r.applied) for r in report.layers] == \
        [(r.name, r.ranks, r.applied) for r in expected.history]
    assert all(r.applied for r in report.layers) and len({r.ranks for r in report.layers}) > 1  # vbmf chose them
    assert (report.params_before, report.params_after) == (expected.report().params_before,
                                                           expected.report().params_after)
    records = read_manifest(tmp_path / "out")
    assert {name: record.ranks for name, record in records.items()} == {
        name: module.ranks for name, module in expected.compressed_model.named_modules()
        if isinstance(module, FactorizedLayer)}
    assert read_report(tmp_path / "out").params_after == report.params_after
    loaded = load_compressed(gpt2(), tmp_path / "out")
    assert_same_weights(expected.compressed_model, loaded)
    assert all(p.is_meta for p in meta.parameters())  # the architecture is left as it was given
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.safetensors", "out"]  # shards and activations gone


def test_blockwise_with_a_calibration_mask_equals_the_in_memory_run(tmp_path, checkpoint):
    """The padding of the calibration batches is left out as in memory: the blocks' carried hidden states do not
    hold the mask, so each batch's is kept from its capture."""
    model, data = gpt2(), token_batches()
    data[2]["attention_mask"][1, 5:] = 0
    plan = schedule(conv1d_layers(model))
    plan["settings"]["calibration_mask"] = {"key": "attention_mask", "layers": ["transformer.h"]}
    expected = in_memory(model, plan, data)
    compress_blockwise(meta_gpt2(), plan, BLOCKS, tmp_path / "out", checkpoint=checkpoint, calibration_data=data,
                       offload="disk", work_dir=tmp_path, progress=False)
    assert_same_weights(expected.compressed_model, load_compressed(gpt2(), tmp_path / "out"))
    unmasked = in_memory(model, schedule(conv1d_layers(model)), data).compressed_model.state_dict()
    key = "transformer.h.0.attn.c_attn.0.weight"
    assert unmasked[key].shape != expected.compressed_model.state_dict()[key].shape or not torch.allclose(
        unmasked[key], expected.compressed_model.state_dict()[key], atol=1e-4)  # the mask changed the fit


def test_sequential_calibration_carries_two_streams_across_blocks(tmp_path, checkpoint):
    """Sequential and independent calibration differ after the first compressed layer, and each matches its
    in-memory counterpart: the blocks after the first are fitted on the compressed blocks' outputs."""
    model, data = gpt2(), token_batches()
    names = conv1d_layers(model)
    fitted = {}
    for mode in ("sequential", "independent"):
        plan = schedule(names, mode, decomposition="whitened_svd", rank_selection="manual", manual_rank=[6])
        compress_blockwise(meta_gpt2(), plan, BLOCKS, tmp_path / mode, checkpoint=checkpoint, calibration_data=data,
                           progress=False)
        fitted[mode] = load_compressed(gpt2(), tmp_path / mode)
        assert_same_weights(in_memory(model, plan, data).compressed_model, fitted[mode])
    first = "transformer.h.0.attn.c_attn"
    last = "transformer.h.2.mlp.c_proj"
    same = fitted["sequential"].get_submodule(first)[1].weight, fitted["independent"].get_submodule(first)[1].weight
    torch.testing.assert_close(*same)
    assert not torch.allclose(fitted["sequential"].get_submodule(last)[1].weight,
                              fitted["independent"].get_submodule(last)[1].weight)


def test_a_folder_of_safetensors_shards_and_a_subset_of_layers(tmp_path):
    model, data = gpt2(), token_batches(2)
    state = {key: value.contiguous() for key, value in model.state_dict().items() if key != "lm_head.weight"}
    keys = sorted(state)
    (tmp_path / "ckpt").mkdir()
    save_file({key: state[key] for key in keys[::2]}, str(tmp_path / "ckpt" / "part-1.safetensors"))
    save_file({key: state[key] for key in keys[1::2]}, str(tmp_path / "ckpt" / "part-2.safetensors"))
    plan = schedule([name for name in conv1d_layers(model) if name.endswith("mlp.c_fc")])
    compress_blockwise(meta_gpt2(), plan, BLOCKS, tmp_path / "out", checkpoint=tmp_path / "ckpt",
                       calibration_data=data, progress=False)
    assert set(read_manifest(tmp_path / "out")) == set(plan["layers"])
    assert_same_weights(in_memory(model, plan, data).compressed_model, load_compressed(gpt2(), tmp_path / "out"))


class Stage(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class Net(nn.Module):
    """Stages between a stem and a head, defined in another order than the stages run."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 5)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stage_a = Stage(16)
        self.stage_b = Stage(16)
        self.stage_c = nn.Sequential(Stage(16), nn.ReLU())

    def forward(self, x):
        x = self.stage_c(self.stage_b(self.stage_a(torch.relu(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


def test_a_user_named_partition_of_a_convolutional_network(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    generator = torch.Generator().manual_seed(2)
    data = [torch.randn(2, 3, 8, 8, generator=generator) for _ in range(3)]
    names = ["stage_a.conv1", "stage_a.conv2", "stage_b.conv1", "stage_c.0.conv1", "stage_c.0.conv2"]
    plan = schedule(names, decomposition="whitened_svd", rank_selection="manual", manual_rank=[6])
    plan["layers"]["stage_b.conv2"] = {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}
    plan["settings"]["ft_every"] = len(plan["layers"])
    expected = in_memory(model, plan, data)
    compress_blockwise(model, plan, ["stage_a", "stage_b", "stage_c"], tmp_path / "out", calibration_data=data,
                       progress=False)  # every weight real: no checkpoint needed
    loaded = load_compressed(Net(), tmp_path / "out")
    assert_same_weights(expected.compressed_model, loaded)
    assert set(read_manifest(tmp_path / "out")) == set(plan["layers"])
    assert not any(isinstance(m, FactorizedLayer) for m in model.modules())


def test_blockwise_compression_inside_the_callers_autocast_computes_as_outside_it(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    generator = torch.Generator().manual_seed(2)
    data = [torch.randn(2, 3, 8, 8, generator=generator) for _ in range(3)]
    plan = schedule(["stage_a.conv1", "stage_b.conv1"], decomposition="whitened_svd", rank_selection="manual",
                    manual_rank=[6])
    expected = in_memory(model, plan, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compress_blockwise(model, plan, ["stage_a", "stage_b", "stage_c"], tmp_path / "out", calibration_data=data,
                           progress=False)
    assert_same_weights(expected.compressed_model, load_compressed(Net(), tmp_path / "out"))


def test_blocks_are_named_exactly_or_by_patterns_in_the_models_order():
    model = meta_gpt2()
    assert resolve_blocks(model, ["transformer.h.2", r"re:transformer\.h\.[01]"]) == \
        ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    with pytest.raises(ConfigError, match=r"pattern 're:decoder\\\\.\\\\d\+' matches no module of GPT2LMHeadModel"):
        resolve_blocks(model, r"re:decoder\.\d+")
    with pytest.raises(ConfigError, match="'transformer.h.9' is not a module"):
        resolve_blocks(model, ["transformer.h.9"])
    with pytest.raises(ConfigError, match="'transformer.h.0.attn' is inside block 'transformer.h.0'"):
        resolve_blocks(model, ["transformer.h.0", "transformer.h.0.attn"])


@pytest.mark.parametrize(("change", "message"), [
    ({"blocks": ["transformer.h.0", "transformer.h.1"]},
     r'\$.layers\["transformer.h.2.attn.c_attn"\]: not inside any block'),
    ({"plan": {"version": 1, "settings": {"nglobal_compress_iters": 2}, "layers": {
        "transformer.h.0.mlp.c_fc": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [8, 4]}}}},
     r"nglobal_compress_iters: blockwise compression compresses each layer once, got 2"),
    ({"plan": {"version": 1, "settings": {"algo_kwargs": {"budget": {"reduction": 2.0, "metric": "params"}}},
               "layers": {"transformer.h.0.mlp.c_fc": {"decomposition": "svd", "rank_selection": "budget"}}}},
     r"rank selector 'budget' allocates ranks over the whole model"),
    ({"offload": "gpu"}, r"offload: expected one of cpu, disk, got 'gpu'"),
    ({"config": {"use_cache": True}}, r"block 'transformer.h.0' is called with positional arguments\[0\] "
                                      r"\(a DynamicCache\).*use_cache=False"),
])
def test_what_blockwise_compression_refuses(tmp_path, checkpoint, change, message):
    plan = change.get("plan") or schedule(["transformer.h.0.attn.c_attn", "transformer.h.2.attn.c_attn"])
    with pytest.raises(ConfigError, match=message):
        compress_blockwise(meta_gpt2(**change.get("config", {})), plan, change.get("blocks", BLOCKS),
                           tmp_path / "out", checkpoint=checkpoint, calibration_data=token_batches(),
                           offload=change.get("offload", "cpu"), progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("on_meta", [False, True])
def test_a_model_whose_forward_changes_its_weights_is_refused_as_in_memory(tmp_path, on_meta):
    """RWKV (config.rescale_every > 0, eval mode) divides some weights in place on its first forward and halves its
    hidden state between the blocks it rescaled: blockwise compression refused it only as 'blocks.1' did not get
    the hidden state 'blocks.0' returned', as if the partition were wrong. Now the first pass says what the
    in-memory run says (stats.parameters_kept), with the fix."""
    from transformers import RwkvConfig, RwkvModel
    config = RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                        intermediate_size=64, context_length=16, rescale_every=1)
    torch.manual_seed(0)
    model, path = RwkvModel(config).eval(), tmp_path / "rwkv.safetensors"
    save_model(model, str(path))
    if on_meta:
        with torch.device("meta"):
            model = RwkvModel(config).eval()
    plan = schedule(["blocks.0.attention.key", "blocks.1.feed_forward.key"])
    with pytest.raises(ConfigError, match=r"^RwkvModel changed its parameters blocks\.0\.attention\.output\.weight, "
                                          r".* in place when musco-core ran it on calibration batch 0: .*for RWKV, "
                                          r"set config.rescale_every = 0"):
        compress_blockwise(model, plan, r"re:blocks\.\d+", tmp_path / "out", checkpoint=path if on_meta else None,
                           calibration_data=[{"input_ids": torch.randint(0, VOCAB, (2, 8))}], progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("decomposition, rank_selection, rank", [("svd", "manual", {"manual_rank": [2]}),
                                                                  ("whitened_svd", "param_reduction", {})])
def test_empty_calibration_data_is_one_clear_error(tmp_path, decomposition, rank_selection, rank):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    plan = schedule(["0"], decomposition=decomposition, rank_selection=rank_selection, **rank)
    with pytest.raises(ConfigError, match="^calibration data is empty: no batch to "):
        compress_blockwise(model, plan, ["0", "2"], tmp_path / "out", calibration_data=[], progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_blocks_must_hold_their_own_weights(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    plan = schedule(["0"], decomposition="svd", rank_selection="manual", manual_rank=[2])
    with pytest.raises(ConfigError, match="'0.weight' is the same tensor as '2.weight', outside its block"):
        compress_blockwise(model, plan, ["0", "2"], tmp_path / "out", progress=False)


def test_a_forced_layer_tied_inside_its_block_counts_the_weight_that_stays(tmp_path):
    # the report counted the shared weight as gone with the forced layer: 8384 -> 5312 parameters, the saved model
    # holds 9408 (the factors are added, the weight stays with the other layer)
    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), nn.ReLU(),
                            nn.Linear(64, 64))
        net[0][2].weight = net[0][0].weight
        return net

    plan = schedule(["0.0"], decomposition="svd", rank_selection="manual", manual_rank=[8])
    plan["layers"]["0.0"]["force"] = True
    report = compress_blockwise(model(), plan, ["0"], tmp_path / "out", calibration_data=[torch.randn(4, 64)],
                                progress=False)
    loaded = load_compressed(model(), tmp_path / "out")
    assert isinstance(loaded[0][0], FactorizedLayer)
    assert (report.params_before, report.params_after) == (8384, sum(p.numel() for p in loaded.parameters()))
    assert report.params_after == 9408
    # the in-memory run's note (the blockwise row had none): 9408 - 8384 = 1024
    (row,) = [row for row in report.layers if row.name == "0.0"]
    assert row.note == "forced although its weights are tied to 0.2.weight, which stay: the model gained 1,024 " \
                       "parameters"


@pytest.mark.parametrize("work_dir, problem", [("missing", "does not exist"), ("file", "is not a folder")])
def test_a_work_dir_that_is_no_folder_is_one_clear_error(tmp_path, work_dir, problem):
    (tmp_path / "file").write_text("mine")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    plan = schedule(["0"], decomposition="svd", rank_selection="manual", manual_rank=[2])
    with pytest.raises(ConfigError, match=f"^work_dir {tmp_path / work_dir}: {problem}; expected the folder"):
        compress_blockwise(model, plan, ["0", "2"], tmp_path / "out", work_dir=tmp_path / work_dir, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_refused_output_folder_gets_nothing_written(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    plan = schedule(["0"], decomposition="svd", rank_selection="manual", manual_rank=[2])
    with pytest.raises(ConfigError, match="out: is not empty and was not written by musco-core"):
        compress_blockwise(model, plan, ["0", "2"], tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_a_second_run_into_the_output_of_another_is_refused_unless_overwrite(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    compress_blockwise(model, schedule(["0"], decomposition="svd", rank_selection="manual", manual_rank=[2]),
                       ["0", "2"], tmp_path / "out", progress=False)
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    other = schedule(["0"], decomposition="svd", rank_selection="manual", manual_rank=[3])
    with pytest.raises(ConfigError, match="out: holds the output of another musco-core run"):
        compress_blockwise(model, other, ["0", "2"], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    compress_blockwise(model, other, ["0", "2"], tmp_path / "out", progress=False, overwrite=True)
    loaded = load_compressed(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), tmp_path / "out")
    assert loaded[0].ranks == (3,)


def test_a_failure_writes_nothing_and_leaves_no_work_files(tmp_path, checkpoint, monkeypatch):
    import musco_core.blockwise

    real = musco_core.blockwise.compress_layer

    def failing(module, name, *args, **kwargs):
        if name == "transformer.h.1.mlp.c_fc":
            raise RuntimeError("out of memory")
        return real(module, name, *args, **kwargs)

    monkeypatch.setattr(musco_core.blockwise, "compress_layer", failing)
    with pytest.raises(CompressionError, match="layer 'transformer.h.1.mlp.c_fc': RuntimeError: out of memory; "
                                               "nothing was written"):
        compress_blockwise(meta_gpt2(), schedule(conv1d_layers(gpt2())), BLOCKS, tmp_path / "out",
                           checkpoint=checkpoint, calibration_data=token_batches(), progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".musco-core", ".musco-lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.safetensors", "out"]


def test_a_checkpoint_that_does_not_fit_the_architecture_is_one_error_before_anything_runs(tmp_path):
    """Missing and mis-shaped tensors were found only when their block came (hours in, for a large model), and
    tensors the model has no place for were ignored: a checkpoint of four blocks gave a three-block model, silently."""
    state = {key: value.contiguous() for key, value in gpt2(n_layer=4).state_dict().items()
             if key not in ("lm_head.weight", "transformer.h.2.mlp.c_fc.weight")}
    state["transformer.h.1.mlp.c_proj.bias"] = torch.zeros(5)
    save_file(state, str(tmp_path / "other.safetensors"))
    before = (tmp_path / "other.safetensors").read_bytes()
    with pytest.raises(ConfigError) as error:
        compress_blockwise(meta_gpt2(), schedule(conv1d_layers(gpt2())), BLOCKS, tmp_path / "out",
                           checkpoint=tmp_path / "other.safetensors", calibration_data=token_batches(), progress=False)
    lines = str(error.value).splitlines()
    assert lines[0] == (f"checkpoint {tmp_path / 'other.safetensors'}: 'transformer.h.1.mlp.c_proj.bias' has shape "
                        f"(5,), the model's (32,)")
    assert lines[1].startswith(f"checkpoint {tmp_path / 'other.safetensors'}: no tensor "
                               f"'transformer.h.2.mlp.c_fc.weight'")
    assert lines[2].startswith(f"checkpoint {tmp_path / 'other.safetensors'}: 12 tensor(s) that GPT2LMHeadModel has "
                               f"no parameter or buffer for: 'transformer.h.3.attn.c_attn.bias', ")
    assert len(lines) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]
    assert (tmp_path / "other.safetensors").read_bytes() == before


def test_a_tied_tensor_with_two_values_in_the_checkpoint_is_one_error(tmp_path):
    """GPT-2's head is its embedding: a checkpoint holding both names with different values had one read silently
    (which one, by the order names were listed); both with one value, or one name alone, load."""
    state = {key: value.contiguous() for key, value in gpt2().state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1
    save_file(state, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match=r"two.safetensors: 'transformer.wte.weight' and 'lm_head.weight' are one "
                                          r"tensor in the model, different values in the checkpoint"):
        compress_blockwise(meta_gpt2(), schedule(conv1d_layers(gpt2())), BLOCKS, tmp_path / "out",
                           checkpoint=tmp_path / "two.safetensors", calibration_data=token_batches(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.safetensors"]
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, str(tmp_path / "same.safetensors"))
    compress_blockwise(meta_gpt2(), schedule(conv1d_layers(gpt2())[:1]), BLOCKS, tmp_path / "out",
                       checkpoint=tmp_path / "same.safetensors", calibration_data=token_batches(), progress=False)

def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path):
    """A Hugging Face sharded checkpoint: the index, or its folder, reads the shards it names (and no stray file
    beside them); a path to the index was 'cannot read: header too large'."""
    import json

    model, data = gpt2(), token_batches(2)
    state = {key: value.contiguous() for key, value in model.state_dict().items() if key != "lm_head.weight"}
    keys = sorted(state)
    shards = {key: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, key in enumerate(keys)}
    (tmp_path / "ckpt").mkdir()
    for name in set(shards.values()):
        save_file({key: state[key] for key in keys if shards[key] == name}, str(tmp_path / "ckpt" / name))
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "ckpt" / "consolidated.safetensors"))
    plan = schedule([name for name in conv1d_layers(model) if name.endswith("mlp.c_fc")])
    expected = in_memory(model, plan, data).compressed_model
    for i, source in enumerate([tmp_path / "ckpt" / "model.safetensors.index.json", tmp_path / "ckpt"]):
        compress_blockwise(meta_gpt2(), plan, BLOCKS, tmp_path / f"out{i}", checkpoint=source, calibration_data=data,
                           progress=False)
        assert_same_weights(expected, load_compressed(gpt2(), tmp_path / f"out{i}"))
    shards.pop(keys[0])
    shards["transformer.h.9.ln_1.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(ConfigError, match=r"model.safetensors.index.json: \$.weight_map\['transformer.h.9.ln_1.weight'"
                                          r"\]: model-00001-of-00002.safetensors holds no such tensor"):
        compress_blockwise(meta_gpt2(), plan, BLOCKS, tmp_path / "out9", checkpoint=tmp_path / "ckpt",
                           calibration_data=data, progress=False)


def test_a_pickled_checkpoint_is_refused_unread(tmp_path):
    torch.save(gpt2().state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin: cannot read it as safetensors: .*never unpickles"):
        compress_blockwise(meta_gpt2(), schedule(conv1d_layers(gpt2())), BLOCKS, tmp_path / "out",
                           checkpoint=tmp_path / "pytorch_model.bin", calibration_data=token_batches(), progress=False)


def test_the_streaming_writer_writes_what_safetensors_reads(tmp_path):
    generator = torch.Generator().manual_seed(3)
    source = {"a": torch.randn(3, 4, generator=generator, dtype=torch.float64),
              "b": torch.randn(5, generator=generator).to(torch.bfloat16), "c": torch.tensor([True, False, True]),
              "d": torch.arange(6, dtype=torch.int32).reshape(2, 3), "e": torch.tensor(2.5),
              # every dtype safetensors stores (a float8 scale was "safetensors cannot store dtype", after the run)
              "f": torch.randn(4, generator=generator).to(torch.float8_e4m3fn),
              "g": torch.randn(4, generator=generator).to(torch.float8_e5m2),
              "h": torch.randn(2, generator=generator, dtype=torch.complex64),
              "i": torch.arange(3).to(torch.uint16), "j": torch.arange(3).to(torch.uint32)}
    save_file(source, str(tmp_path / "source.safetensors"))
    entries = [TensorEntry("x." + key, value.dtype, tuple(value.shape), tmp_path / "source.safetensors", key)
               for key, value in source.items()]
    entries.append(TensorEntry("weight", torch.float32, (2, 2), torch.eye(2, dtype=torch.float64)))  # cast on write
    write_safetensors(tmp_path / "out.safetensors", entries, {"note": "yes"})
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        assert handle.metadata() == {"note": "yes"}
        for key, value in source.items():
            read = handle.get_tensor("x." + key)
            assert read.dtype == value.dtype and torch.equal(read.reshape(-1).view(torch.uint8),
                                                      value.reshape(-1).view(torch.uint8)), key
        assert torch.equal(handle.get_tensor("weight"), torch.eye(2))


def test_tied_tensors_are_written_once_under_the_name_safetensors_keeps():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    kept, aliases = unique_entries(model.state_dict(keep_vars=True))
    assert set(kept) == {"0.weight"} and aliases == {"1.weight": "0.weight"}


class KeywordStack(nn.Module):
    """Blocks called with keywords only (the hidden state as ``hidden_states``) and an extra argument, defined in
    reverse of the order they run when ``reverse`` is set."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(12, 24)
            self.down = nn.Linear(24, 12)

        def forward(self, hidden_states, scale):
            return (hidden_states + scale * self.down(torch.relu(self.up(hidden_states))), "ignored")

    def __init__(self, reverse: bool = False):
        super().__init__()
        self.embed = nn.Linear(6, 12)
        names = ["second", "first"] if reverse else ["first", "second"]
        for name in names:
            self.add_module(name, self.Block())

    def forward(self, x, scale):
        hidden = self.embed(x)
        for name in ("first", "second"):
            hidden = getattr(self, name)(hidden_states=hidden, scale=scale)[0]
        return hidden


def keyword_data():
    generator = torch.Generator().manual_seed(4)
    return [(torch.randn(8, 6, generator=generator), torch.tensor(0.5 + i)) for i in range(3)]


def test_blocks_called_with_keywords_replay_their_arguments(tmp_path):
    torch.manual_seed(0)
    model = KeywordStack().eval()
    plan = schedule(["first.up", "first.down", "second.up", "second.down"], decomposition="whitened_svd",
                    rank_selection="manual", manual_rank=[5])
    expected = in_memory(model, plan, keyword_data())
    compress_blockwise(model, plan, ["first", "second"], tmp_path / "out", calibration_data=keyword_data(),
                       progress=False)
    assert_same_weights(expected.compressed_model, load_compressed(KeywordStack(), tmp_path / "out"))


def test_blocks_must_run_in_the_order_the_model_defines_them(tmp_path):
    plan = schedule(["first.up"], decomposition="whitened_svd", rank_selection="manual", manual_rank=[5])
    with pytest.raises(ConfigError, match="blocks: 'first' ran before 'second'"):
        compress_blockwise(KeywordStack(reverse=True), plan, ["first", "second"], tmp_path / "out",
                           calibration_data=keyword_data(), progress=False)


class Wired(nn.Module):
    """Three blocks taking ``(hidden, scale)``, which ``wiring`` has the forward call otherwise than blockwise
    compression replays them."""

    ORDERS = {"out_of_order": (0, 2, 1), "twice": (0, 1, 1, 2), "skipped": (0, 1)}

    def __init__(self, wiring: str):
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.h = nn.ModuleList(KeywordStack.Block() for _ in range(3))
        self.wiring = wiring

    def forward(self, x, scale):
        hidden = self.embed(x)
        for i in self.ORDERS.get(self.wiring, (0, 1, 2)):
            out = self.h[i](hidden, 2 * scale if self.wiring == "other_arguments" and i == 2 else scale)[0]
            hidden = hidden + out if self.wiring == "residual_outside" and i == 1 else out
        return hidden


@pytest.mark.parametrize("wiring, message", [
    ("out_of_order", r"'h.2' ran before 'h.1'"),
    ("twice", r"'h.1' ran twice"),
    ("skipped", r"'h.2' never ran"),
    ("residual_outside", r"'h.2' did not get the hidden state 'h.1' returned"),
    ("other_arguments", r"'h.2' is called with other positional arguments\[0\] than 'h.0'"),
])
def test_blocks_called_otherwise_than_they_are_replayed_are_refused_before_anything_is_compressed(
        tmp_path, wiring, message):
    """Each block would be calibrated on inputs it never gets (the first block's arguments, the previous block's
    output): checked on the first batch, in a pass through every block."""
    torch.manual_seed(0)
    model = Wired(wiring).eval()
    plan = schedule([f"h.{i}.up" for i in range(3)], decomposition="whitened_svd", rank_selection="manual",
                    manual_rank=[5])
    with pytest.raises(ConfigError, match=f"^blocks: {message} on calibration batch 0; blockwise compression needs"):
        compress_blockwise(model, plan, r"re:h\.\d", tmp_path / "out", calibration_data=keyword_data(),
                           progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert not any(isinstance(m, FactorizedLayer) for m in model.modules())


def test_work_folders_of_killed_runs_are_removed_and_nothing_else(tmp_path, caplog):
    """A killed run leaves its work folder (shards, activations: up to the compressed model's size); the next run
    with the same work folder parent removes those of dead processes on this host, only what a run writes there."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)

    def work_folder(name: str, pid: int | None, host: str = socket.gethostname(), extra: str | None = None):
        folder = tmp_path / f".musco-blockwise-{name}"
        (folder / "activations-1").mkdir(parents=True)
        (folder / "activations-1" / "0.bin").write_bytes(b"\0" * 64)
        (folder / "block-00000.safetensors").write_bytes(b"\0" * 64)
        if pid is not None:
            (folder / ".musco-core").write_text(f"created_by: musco-core\nkind: blockwise-work\nrun_id: x\npid: {pid}\n"
                                                f"host: {host}\n")
        if extra:
            (folder / extra).write_text("mine")
        return folder

    stale = work_folder("stale", dead_pid)
    with_mine = work_folder("mine", dead_pid, extra="notes.txt")
    live = work_folder("live", os.getpid())
    elsewhere = work_folder("elsewhere", dead_pid, host="another-host")
    unmarked = work_folder("unmarked", None)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    plan = schedule(["0"], decomposition="svd", rank_selection="manual", manual_rank=[2])
    with caplog.at_level("INFO", logger="musco_core.blockwise"):
        compress_blockwise(model, plan, ["0", "2"], tmp_path / "out", work_dir=tmp_path, progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in with_mine.iterdir()) == [".musco-core", "notes.txt"]
    assert all((folder / "activations-1" / "0.bin").exists() and (folder / "block-00000.safetensors").exists()
               for folder in (live, elsewhere, unmarked))
    assert f"{stale}: removed the work folder of a killed blockwise run (pid {dead_pid}): 2 file(s)" in caplog.text
    assert f"{with_mine}: work folder of a killed blockwise run (pid {dead_pid}): removed 2 file(s)" in caplog.text


class ReadsABlocksWeight(nn.Module):
    """Its head reads the first block's ``up.weight``, outside the block (and asks the second's ``up`` for an
    attribute neither it nor its replacement has, which changes nothing)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.h = nn.ModuleList(KeywordStack.Block() for _ in range(2))

    def forward(self, x, scale):
        hidden = self.embed(x)
        for block in self.h:
            hidden = block(hidden, scale)[0]
        assert not hasattr(self.h[1].up, "quantization_state")
        return hidden @ self.h[0].up.weight.T


@pytest.mark.parametrize("on_meta", [False, True])
def test_a_layer_the_model_reads_outside_its_block_is_kept_as_in_memory(tmp_path, on_meta):
    """The check of a block's replacements runs the block alone: it cannot see the head reading a weight of it, and
    the output set's model failed (no attribute 'weight'). The capture's first pass sees the read: the layer is kept
    with the reason, and the rest is fitted as in memory."""
    torch.manual_seed(0)
    model = ReadsABlocksWeight().eval()
    save_model(model, str(tmp_path / "model.safetensors"))
    plan = schedule([f"h.{i}.{layer}" for i in range(2) for layer in ("up", "down")], decomposition="whitened_svd",
                    rank_selection="manual", manual_rank=[5])
    expected = in_memory(model, plan, keyword_data())
    if on_meta:
        with torch.device("meta"):
            model = ReadsABlocksWeight()
    report = compress_blockwise(model, plan, r"re:h\.\d", tmp_path / "out", calibration_data=keyword_data(),
                                checkpoint=tmp_path / "model.safetensors" if on_meta else None, progress=False)
    assert [(r.name, r.applied) for r in report.layers] == [(r.name, r.applied) for r in expected.history]
    assert not report.layers[0].applied and "reads its 'weight' outside its block 'h.0'" in report.layers[0].note
    assert report.layers[2].applied
    loaded = load_compressed(ReadsABlocksWeight(), tmp_path / "out")
    assert_same_weights(expected.compressed_model, loaded)
    loaded(*keyword_data()[0])
    assert type(model.h[0].up) is nn.Linear  # the watch is gone


class Attention(nn.Module):
    """Query and key read the block's input; the output layer reads their product."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.out = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x):
        return x + self.out(torch.relu(self.query(x)) * self.key(x))


def test_blockwise_calibrates_the_layers_of_a_block_whose_inputs_do_not_depend_on_one_another_together(
        tmp_path, monkeypatch):
    # each data-aware layer had a pair of passes over the block's streams of its own, the key too
    torch.manual_seed(0)
    model = nn.Sequential(Attention(), Attention()).eval()
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 12, generator=generator) for _ in range(3)]
    names = [f"{block}.{layer}" for block in "01" for layer in ("query", "key", "out")]
    plan = schedule(names, decomposition="whitened_svd", rank_selection="manual", manual_rank=[4])
    calibrated = []
    collect = blockwise.collect_sequential_stats
    monkeypatch.setattr(blockwise, "collect_sequential_stats", lambda model, layers, *args, **kwargs: (
        calibrated.append(list(layers)) or collect(model, layers, *args, **kwargs)))

    def compressed(out: str) -> nn.Module:
        compress_blockwise(model, plan, ["0", "1"], tmp_path / out, calibration_data=data, progress=False)
        return load_compressed(nn.Sequential(Attention(), Attention()), tmp_path / out)

    together = compressed("together")
    assert calibrated == [["0.key"], ["0.out"], ["1.query", "1.key"], ["1.out"]]  # '0.query' first, alone
    assert_same_weights(in_memory(model, plan, data).compressed_model, together)
    monkeypatch.setattr(blockwise, "layer_dataflow", lambda model, names, data: (forward_order(model, names, data),
                                                                                 {}))
    alone, together = compressed("alone").state_dict(), together.state_dict()
    assert together.keys() == alone.keys() and all(torch.equal(together[key], alone[key]) for key in alone)
