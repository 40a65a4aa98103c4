"""Peak memory of blockwise (sequentially onloaded) compression against the all-at-once in-memory path.

A GPT-2-style model is built from a ``GPT2Config`` (no download; 28 blocks of width 1024 and GPT-2's vocabulary:
405M parameters, 1.62 GB in float32) and saved to safetensors. Every Conv1D layer of its blocks (112) is
compressed with ``whitened_svd`` at ``param_reduction_rate`` 2, calibrated sequentially on English text (the
standard library's docstrings, tokenized by hashing words into the vocabulary: GPT-2's tokenizer needs files that
are not here; the memory and the arithmetic do not depend on which token ids the text becomes).
Each path runs in a fresh subprocess and writes its output set; its peak resident memory (``VmHWM``, the
kernel's high-water mark of the process's RSS, which ``ru_maxrss`` also reports) is read after each phase:

* ``blockwise``: :func:`musco_core.compress_blockwise` on the architecture built on the ``meta`` device, reading
  the checkpoint block by block;
* ``in-memory``: the model built on ``meta`` and loaded with ``load_state_dict(assign=True)`` (no second copy),
  ``Compressor(..., inplace=True)`` (no deep copy) with the same schedule in one step, then ``save_compressed``.

Afterwards the two output sets are compared tensor by tensor (ranks and weights must agree).

    python benchmarks/blockwise_memory.py [--threads 1] [--layers 28] [--sequences 4] [--length 64]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from _setup import setup
from minilm_svd import split_text

VOCAB = 50257


def config(layers: int) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=1024, n_layer=layers, n_head=16, use_cache=False)


def peak_mib() -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def token_batches(sequences: int, length: int) -> list[dict[str, torch.Tensor]]:
    """``sequences`` batches of one sequence of ``length`` tokens: docstring words hashed into the vocabulary."""
    paragraphs, _ = split_text(sequences * length // 10 + 20, 1, 0)  # 10 words or more a paragraph
    words = " ".join(paragraphs).split()
    ids = torch.tensor([zlib.crc32(word.encode()) % VOCAB for word in words[:sequences * length]])
    if len(ids) < sequences * length:
        raise SystemExit("not enough docstring text")
    return [{"input_ids": row.unsqueeze(0)} for row in ids.reshape(sequences, length)]


def schedule(layers: int) -> dict:
    names = [f"transformer.h.{i}.{layer}" for i in range(layers)
             for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return {"version": 1, "settings": {"ft_every": len(names), "calibration": "sequential"},
            "layers": {name: {"decomposition": "whitened_svd", "rank_selection": "param_reduction",
                              "param_reduction_rate": 2} for name in names}}


def prepare(folder: Path, layers: int) -> Path:
    """The model's checkpoint (built once, in a subprocess of its own)."""
    checkpoint = folder / "gpt2-style.safetensors"
    if not checkpoint.exists():
        subprocess.run([sys.executable, __file__, "--save", str(checkpoint), "--layers", str(layers)], check=True)
    return checkpoint


def save_checkpoint(path: Path, layers: int) -> None:
    from safetensors.torch import save_model
    torch.manual_seed(0)
    save_model(GPT2LMHeadModel(config(layers)), str(path))


def run_path(path: str, checkpoint: Path, out: Path, args) -> dict:
    """One path in this process: its phases' peak memory (MiB) and wall time."""
    from musco_core import Compressor, compress_blockwise
    from musco_core.io import save_compressed

    data = token_batches(args.sequences, args.length)
    peaks = {"start": peak_mib()}
    started = time.perf_counter()
    with torch.device("meta"):
        model = GPT2LMHeadModel(config(args.layers)).eval()
    if path == "blockwise":
        compress_blockwise(model, schedule(args.layers), r"re:transformer\.h\.\d+", out, checkpoint=checkpoint,
                           calibration_data=data, progress=False)
        peaks["compressed and saved"] = peak_mib()
    else:
        from safetensors.torch import load_file
        state = load_file(str(checkpoint))
        with safe_open(str(checkpoint), "pt") as handle:  # the names save_model dropped for tied tensors
            state.update({dropped: state[kept] for dropped, kept in handle.metadata().items() if kept in state})
        model.load_state_dict(state, assign=True)
        model.tie_weights()
        del state
        peaks["loaded"] = peak_mib()
        compressor = Compressor(model, model_compr_kwargs=schedule(args.layers), calibration_data=data,
                                inplace=True, progress=False)
        compressor.compression_step()
        peaks["compressed"] = peak_mib()
        save_compressed(compressor, out)
        peaks["compressed and saved"] = peak_mib()
    return {"path": path, "peaks_mib": peaks, "seconds": time.perf_counter() - started,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compare(first: Path, second: Path) -> tuple[int, float]:
    """The number of tensors of two output sets and their largest relative difference, one tensor at a time."""
    worst = 0.0
    with safe_open(str(first / "model.safetensors"), "pt") as a, safe_open(str(second / "model.safetensors"),
                                                                            "pt") as b:
        if set(a.keys()) != set(b.keys()):
            raise SystemExit("the two output sets hold different tensors")
        for key in a.keys():
            x, y = a.get_tensor(key).double(), b.get_tensor(key).double()
            worst = max(worst, float((x - y).norm() / x.norm().clamp_min(1e-30)))
        return len(a.keys()), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=28, help="GPT-2 blocks of width 1024")
    parser.add_argument("--sequences", type=int, default=4, help="calibration batches of one sequence each")
    parser.add_argument("--length", type=int, default=64, help="tokens per calibration sequence")
    parser.add_argument("--dir", type=Path, help="where the checkpoint and the output sets go (kept if given)")
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["blockwise", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    machine = setup(args.threads)
    if args.save:
        save_checkpoint(args.save, args.layers)
        return
    if args.path:
        print(json.dumps(run_path(args.path, args.checkpoint, args.out, args)))
        return

    folder = args.dir or Path(tempfile.mkdtemp(prefix="blockwise-memory-", dir=Path(__file__).parent))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        checkpoint = prepare(folder, args.layers)
        size = os.path.getsize(checkpoint) / 2**20
        print(f"{machine}; model: {args.layers} GPT-2 blocks of width 1024, vocabulary {VOCAB}, "
              f"checkpoint {size:.0f} MiB; calibration: {args.sequences} x {args.length} tokens")
        results = {}
        for path in ("blockwise", "in-memory"):
            out = folder / path
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, __file__, "--path", path, "--checkpoint", str(checkpoint), "--out", str(out),
                       "--threads", str(args.threads), "--layers", str(args.layers),
                       "--sequences", str(args.sequences), "--length", str(args.length)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(results[path]))
        n_tensors, worst = compare(folder / "blockwise", folder / "in-memory")
        print(f"the output sets agree: {n_tensors} tensors, largest relative difference {worst:.2e}")
        compressed = os.path.getsize(folder / "blockwise" / "model.safetensors") / 2**20
        print("\n| path | peak RSS MiB | / checkpoint size | wall s |\n|---|---:|---:|---:|")
        for path, result in results.items():
            peak = result["peaks_mib"]["compressed and saved"]
            print(f"| {path} | {peak:.0f} | {peak / size:.2f} | {result['seconds']:.0f} |")
        print(f"\ncheckpoint {size:.0f} MiB, compressed output set {compressed:.0f} MiB")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
