"""One vbmf pass (tucker2 for k x k convs, svd for 1x1 convs and Linear, weakening 0.8) over a ResNet-50-shaped
model with trained-like weights at 224 x 224, timed end to end in fresh processes, with the import time shown
separately, and the FLOPs, parameter and output-error figures.

Each repeat runs in a new Python process, as a user's script would: importing torch, importing musco-core, then
(after building the benchmark's model, not counted) the Compressor's construction (plugin registry and statistics
pass) and the compression step.

    python benchmarks/vbmf_pass.py [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("import torch", "import musco_core", "Compressor(...): registry, statistics",
          "compression_step()")


def worker(threads: int) -> None:
    """One pass in this (fresh) process; prints its timings as one JSON line."""
    started = time.perf_counter()
    import torch
    after_torch = time.perf_counter()
    from musco_core import Compressor
    after_musco = time.perf_counter()
    from _setup import make_trained_like, resnet50, setup

    setup(threads)
    model = make_trained_like(resnet50()).eval()
    x = torch.randn(1, 3, 224, 224)
    model_ready = time.perf_counter()
    compressor = Compressor(model, config_type="vbmf", example_input=x, ft_every=1000, progress=False)
    constructed = time.perf_counter()
    results = compressor.compression_step()
    done = time.perf_counter()
    per_decomposition: dict[str, float] = {}
    for r in results:
        per_decomposition[r.decomposition] = per_decomposition.get(r.decomposition, 0.0) + r.seconds
    print(json.dumps({
        "import torch": after_torch - started, "import musco_core": after_musco - after_torch,
        "model set-up": model_ready - after_musco, "Compressor(...): registry, statistics": constructed - model_ready,
        "compression_step()": done - constructed, "per decomposition": per_decomposition,
        "applied": sum(r.applied for r in results), "layers": len(results),
        "torch._dynamo imported": "torch._dynamo" in sys.modules}))


def run_workers(threads: int, repeats: int) -> tuple[list[dict], list[float]]:
    runs, walls = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        output = subprocess.run([sys.executable, __file__, "--worker", "--threads", str(threads)], check=True,
                                capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        walls.append(time.perf_counter() - started)
        runs.append(json.loads(output.strip().splitlines()[-1]))
    return runs, walls


def quality(threads: int) -> None:
    """FLOPs, parameters and output error of the pass's result (in this process; counting FLOPs imports
    torch._dynamo, which the timed processes never do)."""
    import torch

    from _setup import make_trained_like, resnet50, setup
    from musco_core import Compressor, ModelStats, default_registry, standardize_model

    setup(threads)
    model = make_trained_like(resnet50()).eval()
    x = torch.randn(1, 3, 224, 224)
    compressor = Compressor(model, config_type="vbmf", example_input=x, ft_every=1000, progress=False)
    compressor.compression_step()
    compressed = standardize_model(compressor.compressed_model).eval()
    registry = default_registry()
    before, after = (ModelStats.from_model(m, registry, x, count_flops=True) for m in (model, compressed))
    with torch.no_grad():
        batch = torch.randn(8, 3, 224, 224)
        reference = model(batch)
        error = float((compressed(batch) - reference).norm() / reference.norm())
    params_before, params_after = (sum(p.numel() for p in m.parameters()) for m in (model, compressed))
    print(f"\nFLOPs (whole forward, FlopCounterMode): {before.total_flops / 1e9:.2f} G -> "
          f"{after.total_flops / 1e9:.2f} G ({before.total_flops / after.total_flops:.2f}x)")
    print(f"parameters: {params_before / 1e6:.2f} M -> {params_after / 1e6:.2f} M "
          f"({params_before / params_after:.2f}x)")
    print(f"relative output error on 8 random images: {error:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.threads)
        return
    runs, walls = run_workers(args.threads, args.repeats)
    print(f"{args.repeats} fresh processes, {args.threads} threads; layers compressed: {runs[0]['applied']} of "
          f"{runs[0]['layers']}; torch._dynamo imported: {any(r['torch._dynamo imported'] for r in runs)}\n")
    print(f"{'seconds':50}{'median':>8}{'min':>8}{'max':>8}")

    def line(label: str, values: list[float]) -> None:
        print(f"{label:50}{statistics.median(values):8.2f}{min(values):8.2f}{max(values):8.2f}")

    for stage in STAGES:
        line(stage, [r[stage] for r in runs])
    for name in sorted(runs[0]["per decomposition"]):
        line(f"  of which {name} layers", [r["per decomposition"][name] for r in runs])
    line("end to end after the imports", [r[STAGES[2]] + r[STAGES[3]] for r in runs])
    line("end to end with the imports", [sum(r[s] for s in STAGES) for r in runs])
    line("(benchmark's model set-up, not counted)", [r["model set-up"] for r in runs])
    line("(process wall time, interpreter start included)", walls)
    quality(args.threads)


if __name__ == "__main__":
    main()
