"""Hugging Face transformers models: tiny randomly initialised BERT and GPT-2 built from configs (no download).

BERT's weight layers are ``nn.Linear`` (the ``linear`` adapter); GPT-2's are ``transformers.pytorch_utils.Conv1D``
(weight stored ``(in, out)``, the ``hf_conv1d`` adapter). A compressed model must keep its outputs' shape and
dtype, reproduce them at full rank, and survive ``standardize_model`` + ``save_pretrained`` + loading.
"""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from musco_core import Compressor, ConfigError, FactorizedLayer, run, standardize_model
from musco_core.calibration import forward_order
from musco_core.io import load_compressed, save_compressed

VOCAB = 50
#: transformers 5 maps ties by name, which a forced untie edits; transformers 4 ties by config.tie_word_embeddings
TIES_MAPPED = hasattr(PreTrainedModel, "get_expanded_tied_weights_keys")


def tiny_bert() -> BertModel:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config).eval()


def tiny_gpt2(head: bool = False) -> GPT2Model:
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    return (GPT2LMHeadModel if head else GPT2Model)(config).eval()


def tiny_falcon() -> nn.Module:
    from transformers import FalconConfig, FalconModel
    return FalconModel(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    bias=True)).eval()


def tokens(batch: int = 3, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """What a tokenizer returns for a padded batch: ids and an attention mask."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return {"input_ids": torch.randint(1, VOCAB, (batch, length), generator=generator), "attention_mask": mask}


def weight_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def schedule(names: list[str], **layer) -> dict[str, dict]:
    layer = layer or {"rank_selection": "param_reduction", "param_reduction_rate": 2}
    return {name: {"decomposition": "svd", **layer} for name in names}


def compress(model: nn.Module, names: list[str], **kwargs) -> Compressor:
    compressor = Compressor(model, ft_every=len(names), progress=False, **kwargs)
    while not compressor.done:
        compressor.compression_step()
    return compressor


def hidden(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).last_hidden_state


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_weight_layer_compresses_and_outputs_keep_shape_and_dtype(build, dtype):
    model = build().to(dtype)
    names = weight_layers(model)
    inputs = tokens()
    compressor = compress(model, names, model_compr_kwargs=schedule(names), example_input=inputs)
    compressed = compressor.compressed_model
    assert len(names) == (12 + 1 if build is tiny_bert else 8)  # 6 per BERT layer + pooler; 4 per GPT-2 block
    assert all(r.applied for r in compressor.history), [r.note for r in compressor.history]
    assert all(isinstance(compressed.get_submodule(n), FactorizedLayer) for n in names)
    assert all(p.dtype == dtype for p in compressed.parameters())
    before, after = hidden(model, inputs), hidden(compressed, inputs)
    assert after.shape == before.shape and after.dtype == dtype
    assert torch.isfinite(after).all()
    report = compressor.report()
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before  # the tokenizer-style dict example_input ran as model(**x)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_falcon], ids=["bert", "gpt2", "falcon"])
def test_full_rank_reproduces_the_outputs(build):
    model = build().to(torch.float64)
    names = weight_layers(model)
    full = {name: {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [min(weight.shape)],
                   "force": True}  # force: at full rank the factors have more weights than the layer
            for name in names for weight in [model.get_submodule(name).weight]}
    compressed = compress(model, names, model_compr_kwargs=full).compressed_model
    assert all(isinstance(compressed.get_submodule(n), FactorizedLayer) for n in names)
    inputs = tokens()
    torch.testing.assert_close(hidden(compressed, inputs), hidden(model, inputs), rtol=1e-9, atol=1e-9)


def test_falcon_linear_is_the_linear_adapters_and_round_trips(tmp_path):
    """FalconLinear defines its own forward, input @ weight.T (+ bias), which is Linear's: it was refused ('defines
    FalconLinear.forward, so it may compute something else'), so no Falcon layer compressed. The linear adapter
    lists it by name now."""
    model = tiny_falcon()
    names = weight_layers(model)
    assert len(names) == 8 and {type(model.get_submodule(n)).__name__ for n in names} == {"FalconLinear"}
    inputs = tokens()
    compressor = compress(model, names, model_compr_kwargs=schedule(names), example_input=inputs)
    assert all(r.applied for r in compressor.history), [r.note for r in compressor.history]
    save_compressed(compressor, tmp_path)
    loaded = load_compressed(tiny_falcon(), tmp_path)
    torch.testing.assert_close(hidden(loaded, inputs), hidden(compressor.compressed_model, inputs), rtol=0, atol=0)


def test_conv1d_adapter_reads_the_transposed_weight_and_builds_stock_linears(registry):
    layer = tiny_gpt2().h[0].attn.c_attn  # Conv1D(nf=96, nx=32): weight (32, 96)
    adapter = registry.adapter_for(layer)
    assert adapter.name == "hf_conv1d"
    spec, weight, bias = adapter.read(layer)
    assert (spec.out_channels, spec.in_channels, spec.has_bias) == (96, 32, True)
    torch.testing.assert_close(weight, layer.weight.T)
    torch.testing.assert_close(bias, layer.bias)
    x = torch.randn(4, 32)
    torch.testing.assert_close(x @ weight.T + bias, layer(x))  # the weight is read in nn.Linear's layout
    model = compress(tiny_gpt2(), ["h.0.attn.c_attn"], model_compr_kwargs=schedule(["h.0.attn.c_attn"]))
    factors = list(model.compressed_model.h[0].attn.c_attn)
    assert [type(f) for f in factors] == [nn.Linear, nn.Linear]
    assert (factors[0].in_features, factors[-1].out_features) == (32, 96)


def test_a_factorized_conv1d_layer_compresses_again():
    model = tiny_gpt2()
    name = "h.1.mlp.c_fc"
    twice = {name: {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [16, 8]}}
    compressor = compress(model, [name], model_compr_kwargs=twice, nglobal_compress_iters=2)
    assert [r.ranks for r in compressor.history] == [(16,), (8,)]
    assert compressor.compressed_model.get_submodule(name).spec.adapter == "hf_conv1d"


def test_registering_the_conv1d_adapter_does_not_import_transformers():
    code = ("import sys; from musco_core import default_registry; registry = default_registry(); "
            "assert 'hf_conv1d' in registry.adapters.names(); "
            "assert not any(m == 'transformers' or m.startswith('transformers.') for m in sys.modules), 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_save_pretrained_then_load_compressed_round_trip(tmp_path):
    model = tiny_bert()
    names = weight_layers(model)
    compressor = compress(model, names, model_compr_kwargs=schedule(names))
    save_compressed(compressor, tmp_path)  # musco.yaml (the factorized structure) before standardize_model
    plain = standardize_model(compressor.compressed_model)
    assert not any(isinstance(m, FactorizedLayer) for m in plain.modules())
    plain.save_pretrained(tmp_path)  # config.json + model.safetensors with the factor weights
    assert {"config.json", "model.safetensors", "musco.yaml"} <= {p.name for p in tmp_path.iterdir()}

    # from_pretrained would build the uncompressed architecture: build it from the saved config instead, then
    # rebuild the factorized layers and load the weights save_pretrained wrote.
    fresh = BertModel(BertConfig.from_pretrained(tmp_path))
    loaded = load_compressed(fresh, tmp_path)
    inputs = tokens()
    torch.testing.assert_close(hidden(loaded, inputs), hidden(plain, inputs), rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in plain.parameters())

    # and the loaded model saves again with save_pretrained, as a transformers model does
    standardize_model(loaded).save_pretrained(tmp_path / "again")
    again = load_compressed(BertModel(BertConfig.from_pretrained(tmp_path / "again")), tmp_path)
    torch.testing.assert_close(hidden(again, inputs), hidden(plain, inputs), rtol=0, atol=0)


@pytest.mark.skipif("save_original_format" not in inspect.signature(PreTrainedModel.save_pretrained).parameters,
                    reason="transformers 4 saves every model under the names of its modules")
@pytest.mark.parametrize("layers", [["encoder.layer.0.attention.q_proj"], ["encoder.layer.0.mlp.fc1"]],
                         ids=["renamed-layer-factorized", "other-layer-factorized"])
def test_save_pretrained_of_a_model_transformers_renames_says_how_to_save_it(tmp_path, layers):
    # transformers 5 saves Dinov2 (ViT, Beit, Segformer, ...) under its original checkpoint's keys
    # (attention.q_proj -> attention.attention.query): the documented flow failed with "model.safetensors holds
    # None" or a list of missing keys, and never said why
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, mlp_ratio=2)).eval()
    compressor = compress(model, layers, model_compr_kwargs=schedule(layers, rank_selection="manual",
                                                                       manual_rank=[8]))
    save_compressed(compressor, tmp_path)
    plain = standardize_model(compressor.compressed_model)
    plain.save_pretrained(tmp_path)
    fresh = Dinov2Model(Dinov2Config.from_pretrained(tmp_path))
    with pytest.raises(ConfigError, match=r"not written by musco-core.*save_original_format=False"):
        load_compressed(fresh, tmp_path)
    plain.save_pretrained(tmp_path, save_original_format=False)
    images = {"pixel_values": torch.randn(2, 3, 16, 16)}
    torch.testing.assert_close(hidden(load_compressed(fresh, tmp_path), images), hidden(plain, images), rtol=0, atol=0)


def test_a_layer_tied_to_the_embedding_is_kept_unless_forced(tmp_path):
    model = tiny_gpt2(head=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = weight_layers(model)
    compressor = compress(model, names, model_compr_kwargs=schedule(names))
    kept = {r.name: r for r in compressor.history if not r.applied}
    assert list(kept) == ["lm_head"]
    assert "tied to transformer.wte.weight" in kept["lm_head"].note
    tied = compressor.compressed_model
    assert tied.lm_head.weight is tied.transformer.wte.weight

    forced = compress(model, ["lm_head"], model_compr_kwargs=schedule(["lm_head"], rank_selection="manual",
                                                                       manual_rank=[8], force=True))
    if not TIES_MAPPED:  # the flag, which must stay True, would tie it again
        assert not forced.history[0].applied
        assert "config.tie_word_embeddings (transformers 4)" in forced.history[0].note
        assert forced.compressed_model.lm_head.weight is forced.compressed_model.transformer.wte.weight
        return
    assert forced.history[0].applied
    untied = forced.compressed_model  # the embedding stays: the model grew by the factors' weights
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in model.parameters()) + 8 * (32 + VOCAB)

    save_compressed(forced, tmp_path)
    standardize_model(untied).save_pretrained(tmp_path)
    loaded = load_compressed(GPT2LMHeadModel(GPT2Config.from_pretrained(tmp_path)), tmp_path).eval()
    inputs = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, untied.eval()(**inputs).logits, rtol=0, atol=0)
    prompt = inputs["input_ids"][1:, :4]
    greedy = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(loaded.generate(prompt, **greedy), untied.generate(prompt, **greedy))


@pytest.mark.skipif(not TIES_MAPPED, reason="transformers 4 keeps a layer it ties by config.tie_word_embeddings")
def test_a_forced_untie_keeps_tie_weights_from_hanging_the_embedding_on_the_factors(tmp_path):
    # left tied, tie_weights() (resize_token_embeddings runs it too) set lm_head.weight = wte.weight on the
    # factorized layer, and the saved set lost transformer.wte.weight
    model = tiny_gpt2(head=True)
    forced = compress(model, ["lm_head"], model_compr_kwargs=schedule(["lm_head"], rank_selection="manual",
                                                                       manual_rank=[8], force=True))
    untied = forced.compressed_model.eval()
    untied.tie_weights()
    assert [key for key in untied.state_dict() if key.startswith("lm_head")] == ["lm_head.0.weight", "lm_head.1.weight"]
    save_compressed(forced, tmp_path)
    loaded = load_compressed(GPT2LMHeadModel(model.config).eval(), tmp_path)  # built tied, as from the original
    loaded.tie_weights()
    assert [key for key in loaded.state_dict() if key.startswith("lm_head")] == ["lm_head.0.weight", "lm_head.1.weight"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tokens()).logits, untied(**tokens()).logits, rtol=0, atol=0)


@pytest.mark.skipif(not TIES_MAPPED, reason="transformers 4 keeps a layer it ties by config.tie_word_embeddings")
def test_resize_token_embeddings_cannot_resize_a_factorized_head_as_the_docs_say():
    """docs/transformers.md: transformers reads the head's weight after it replaced the input embeddings; when this
    fails, transformers resizes a factorized head (or fails first) and the docs must say so."""
    forced = compress(tiny_gpt2(head=True), ["lm_head"], model_compr_kwargs=schedule(
        ["lm_head"], rank_selection="manual", manual_rank=[8], force=True))
    model = forced.compressed_model
    with pytest.raises(AttributeError, match="'FactorizedLayer' object has no attribute 'weight'"):
        model.resize_token_embeddings(VOCAB + 16)
    assert (model.transformer.wte.num_embeddings, model.config.vocab_size) == (VOCAB + 16, VOCAB)


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).eval()


def tiny_bert_mlm():
    from transformers import BertForMaskedLM

    return BertForMaskedLM(tiny_bert().config).eval()


def tiny_bert2bert():
    """An encoder-decoder whose tied head lies in an inner transformers model (the decoder, a BertLMHeadModel)."""
    from transformers import EncoderDecoderConfig, EncoderDecoderModel

    decoder = BertConfig(**{**tiny_bert().config.to_dict(), "is_decoder": True, "add_cross_attention": True})
    config = EncoderDecoderConfig.from_encoder_decoder_configs(tiny_bert().config, decoder)
    config.decoder_start_token_id, config.pad_token_id = 2, 0
    return EncoderDecoderModel(config).eval()


@pytest.mark.parametrize("build, head", [(tiny_bart, "lm_head"), (tiny_bert_mlm, "cls.predictions.decoder"),
                                         (tiny_bert2bert, "decoder.cls.predictions.decoder")],
                         ids=["bart", "bert-mlm", "bert2bert"])
def test_a_forced_untie_keeps_the_models_other_ties_in_a_model_built_from_the_saved_config(tmp_path, build, head):
    # BART's encoder and decoder embeddings are model.shared under the same config.tie_word_embeddings as its head:
    # setting the flag to False built them apart from the saved config, and the weights, which hold that tensor
    # once, did not load (missing model.decoder.embed_tokens.weight). BERT's MLM decoder ties its bias too; the
    # expanded mapping that tie_weights(recompute_mapping=False) reads kept the head in an outer model's.
    from transformers import AutoConfig

    model = build()
    seq2seq = build is not tiny_bert_mlm
    inputs = {**tokens(), **({"decoder_input_ids": tokens(seed=2)["input_ids"][:, :5]} if seq2seq else {})}
    forced = compress(model, [head], model_compr_kwargs=schedule([head], rank_selection="manual", manual_rank=[8],
                                                                  force=True), example_input=inputs)
    if not TIES_MAPPED:  # the flag, which must stay True, would tie it again
        assert not forced.history[0].applied
        assert "config.tie_word_embeddings (transformers 4)" in forced.history[0].note
        return
    untied = forced.compressed_model.eval()
    untied.tie_weights(recompute_mapping=False)
    untied.tie_weights()
    assert not {f"{head}.weight", f"{head}.bias"} & set(untied.state_dict())  # nothing hung on the factors
    save_compressed(forced, tmp_path)
    standardize_model(untied).save_pretrained(tmp_path)
    loaded = load_compressed(type(model)(AutoConfig.from_pretrained(tmp_path)), tmp_path).eval()
    loaded.tie_weights()
    assert not {f"{head}.weight", f"{head}.bias"} & set(loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, untied(**inputs).logits, rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in untied.parameters())
    if build is tiny_bart:
        assert loaded.model.encoder.embed_tokens.weight is loaded.model.shared.weight


def tiny_t5(**config):
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, decoder_start_token_id=0, **config)).eval().double()


def t5_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tokens(), decoder_input_ids=tokens(seed=2)["input_ids"][:, :5]).logits


FULL_RANK_HEAD = schedule(["lm_head"], rank_selection="manual", manual_rank=[32], force=True)  # d_model 32


def test_forcing_t5s_tied_head_at_full_rank_keeps_its_logits():
    # T5 (transformers 4) scales its decoder's output by d_model ** -0.5 only while config.tie_word_embeddings is
    # True: the forced untie set it to False, and the logits came out sqrt(32) = 5.66 times too large
    model = tiny_t5()
    forced = compress(model, ["lm_head"], model_compr_kwargs=FULL_RANK_HEAD,
                      example_input={**tokens(), "decoder_input_ids": tokens(seed=2)["input_ids"][:, :5]})
    compressed, result = forced.compressed_model, forced.history[0]
    assert compressed.config.tie_word_embeddings
    if TIES_MAPPED:
        assert result.applied and isinstance(compressed.lm_head, FactorizedLayer)
    else:  # the flag, which must stay True, would tie it again
        assert not result.applied and "config.tie_word_embeddings (transformers 4)" in result.note
        assert compressed.lm_head.weight is compressed.shared.weight
    torch.testing.assert_close(t5_logits(compressed), t5_logits(model), rtol=1e-9, atol=1e-9)


def test_a_t5_head_factorized_elsewhere_loads_with_its_logits(tmp_path, caplog):
    # factorized where it was not tied (as under transformers 5), then loaded onto a T5 that ties it: under
    # transformers 4 loading set config.tie_word_embeddings to False, which scales the logits by sqrt(32)
    model = tiny_t5()
    untied = tiny_t5(tie_word_embeddings=False)
    untied.load_state_dict(model.state_dict())
    save_compressed(compress(untied, ["lm_head"], model_compr_kwargs=FULL_RANK_HEAD), tmp_path)
    loaded = load_compressed(tiny_t5(), tmp_path)
    assert isinstance(loaded.lm_head, FactorizedLayer) and loaded.config.tie_word_embeddings
    torch.testing.assert_close(t5_logits(loaded), t5_logits(model), rtol=1e-9, atol=1e-9)
    assert TIES_MAPPED or "would hang the embedding's matrix on it" in caplog.text


def test_whitened_svd_calibrates_on_tokenizer_style_batches():
    model = tiny_bert()
    names = weight_layers(model)[:6]  # the first encoder layer
    calibration = [tokens(4, 16, seed=s) for s in range(3)]  # a list of dicts: each batch runs as model(**batch)
    rate = {"rank_selection": "param_reduction", "param_reduction_rate": 2}
    whitened = compress(model, names, model_compr_kwargs={n: {"decomposition": "whitened_svd", **rate}
                                                          for n in names}, calibration_data=calibration)
    plain = compress(model, names, model_compr_kwargs=schedule(names))
    assert [r.ranks for r in whitened.history] == [r.ranks for r in plain.history]

    def error(compressed: nn.Module) -> float:
        return float(sum((hidden(compressed, b) - hidden(model, b)).norm() for b in calibration))

    # fitted to the layers' inputs, whitened SVD loses less of the model's output on those inputs
    assert error(whitened.compressed_model) < error(plain.compressed_model)


def tiny_rwkv(rescale_every: int) -> nn.Module:
    from transformers import RwkvConfig, RwkvModel
    torch.manual_seed(0)
    return RwkvModel(RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                intermediate_size=64, context_length=16, rescale_every=rescale_every)).eval()


@pytest.mark.parametrize("data", ["example_input", "calibration_data"])
def test_a_model_whose_forward_changes_its_weights_is_refused_and_the_fix_it_names_round_trips(tmp_path, data):
    # RWKV divides its attention.output and feed_forward.value weights in place on its first eval forward (a flag
    # not saved says so): musco-core's run on the example input or a calibration batch did that to the copy, the
    # divided weights were saved, and a fresh RWKV loading them divided them again (output 0.385 off, relative)
    inputs = {"input_ids": tokens()["input_ids"]}
    names = ["blocks.0.attention.key", "blocks.1.feed_forward.key"]
    decomposition = "svd" if data == "example_input" else "whitened_svd"
    layers = {n: {"decomposition": decomposition, "rank_selection": "manual", "manual_rank": [32]} for n in names}
    given = {data: inputs if data == "example_input" else [inputs]}
    with pytest.raises(ConfigError, match=r"changed its parameters blocks\.0\.attention\.output\.weight, "):
        compress(tiny_rwkv(1), names, model_compr_kwargs=layers, **given)
    compressor = compress(tiny_rwkv(0), names, model_compr_kwargs=layers, **given)  # the same model, no rescaling
    save_compressed(compressor, tmp_path)
    loaded = load_compressed(tiny_rwkv(0), tmp_path)
    torch.testing.assert_close(hidden(loaded, inputs), hidden(compressor.compressed_model, inputs), rtol=0, atol=0)
    torch.testing.assert_close(hidden(loaded, inputs), hidden(tiny_rwkv(0), inputs), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sentence-transformers

SENTENCES = ["the cat sits on the mat .", "a dog sits on the mat .", "low rank layers compress the network .",
             "the weather is nice today .", "a cat and a dog ."]


def tiny_sentence_transformer(folder):
    """A SentenceTransformer from a folder holding a tiny BERT and a word-piece vocabulary (as a hub model would
    be, nothing downloaded): sentence-transformers wraps it in its Transformer module with mean pooling."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    return SentenceTransformer(str(folder), device="cpu").eval()


def encoder_linears(encoder: nn.Module) -> list[str]:
    """The encoder's Linear layers; BERT's pooler is left out: mean pooling never uses it."""
    return [name for name in weight_layers(encoder) if not name.startswith("pooler")]


def embed(sentence_transformer) -> torch.Tensor:
    return sentence_transformer.encode(SENTENCES, convert_to_tensor=True)


def test_assigning_auto_model_does_not_replace_the_sentence_transformers_encoder(tmp_path):
    """The documented pitfall, checked on the installed sentence-transformers: from version 6 ``auto_model`` is a
    read-only view of ``model``; nn.Module registers the assigned model as a new submodule that forward never calls.
    Before, ``auto_model`` was the encoder itself."""
    st = tiny_sentence_transformer(tmp_path)
    names = encoder_linears(st[0].auto_model)
    compressed = compress(st[0].auto_model, names, model_compr_kwargs=schedule(names)).compressed_model
    before, n_params = embed(st), sum(p.numel() for p in st.parameters())
    st[0].auto_model = compressed
    if not isinstance(getattr(type(st[0]), "auto_model", None), property):  # before 6: auto_model is the encoder
        assert not torch.allclose(embed(st), before)
        assert sum(p.numel() for p in st.parameters()) < n_params
        return
    assert torch.equal(embed(st), before)  # silently ignored
    assert sum(p.numel() for p in st.parameters()) > n_params  # and the compressed copy rides along unused
    del st[0]._modules["auto_model"]
    st[0].model = compressed  # the attribute that forward uses
    assert not torch.allclose(embed(st), before)


@pytest.mark.parametrize("decomposition", ["svd", "whitened_svd"])
def test_a_sentence_transformer_compresses_in_place_and_round_trips(tmp_path, decomposition):
    st = tiny_sentence_transformer(tmp_path / "model")
    reference = embed(st)
    encoder = st[0].auto_model
    names = encoder_linears(encoder)
    calibration = [dict(st.tokenize(SENTENCES[i:i + 2])) for i in range(0, len(SENTENCES), 2)]
    compressor = compress(encoder, names, model_compr_kwargs=schedule(names, decomposition=decomposition,
                                                                      rank_selection="param_reduction",
                                                                      param_reduction_rate=2),
                          inplace=True, calibration_data=calibration if decomposition == "whitened_svd" else None)
    assert compressor.compressed_model is st[0].auto_model  # compressed where the sentence-transformer calls it
    assert all(isinstance(encoder.get_submodule(name), FactorizedLayer) for name in names)
    compressed = embed(st)
    assert compressed.shape == reference.shape and not torch.allclose(compressed, reference)
    with torch.no_grad():  # the embedding is the mean of the compressed encoder's token states
        batch = st.tokenize(SENTENCES)
        tokens_ = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens_.dtype)
        torch.testing.assert_close(compressed, (tokens_ * mask).sum(1) / mask.sum(1))

    save_compressed(st, tmp_path / "compressed")  # the whole SentenceTransformer: its layers' names start 0.
    from sentence_transformers import SentenceTransformer

    loaded = load_compressed(SentenceTransformer(str(tmp_path / "model"), device="cpu"), tmp_path / "compressed")
    assert torch.equal(embed(loaded.eval()), compressed)


def test_sequential_calibration_takes_query_key_and_value_together_as_one_at_a_time(monkeypatch):
    # every Linear had its own pair of passes: 2 blocks of 6 and the pooler, 13 pairs over all batches
    names = weight_layers(tiny_bert())
    calibrated = []
    collect = run.collect_sequential_stats
    monkeypatch.setattr(run, "collect_sequential_stats", lambda model, layers, *args, **kwargs: (
        calibrated.append(list(layers)) or collect(model, layers, *args, **kwargs)))

    def weights() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        compressor = compress(tiny_bert(), names, calibration_data=[tokens(seed=seed) for seed in range(3)],
                              model_compr_kwargs=schedule(names, decomposition="whitened_svd",
                                                          rank_selection="manual", manual_rank=[8]))
        return compressor.compressed_model.state_dict()

    together = weights()
    attention = [f"encoder.layer.1.attention.self.{name}" for name in ("query", "key", "value")]
    # block 0's query alone (nothing compressed yet), then its key and value; 3 runs after each; the pooler
    assert attention in calibrated and len(calibrated) == 1 + 3 + 4 + 1
    monkeypatch.setattr(run, "layer_dataflow", lambda model, names, data: (forward_order(model, names, data), {}))
    alone = weights()
    assert together.keys() == alone.keys() and all(torch.equal(together[key], alone[key]) for key in alone)
