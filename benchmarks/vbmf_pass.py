"""One vbmf pass (tucker2 for k x k convs, svd for 1x1 convs and Linear, weakening 0.8) over a ResNet-50-shaped
model with trained-like weights at 224 x 224, timed, with the FLOPs, parameter and output-error figures.

    python benchmarks/vbmf_pass.py [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from _setup import make_trained_like, resnet50, setup
from musco_core import Compressor, ModelStats, default_registry, standardize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(setup(args.threads))
    registry = default_registry()
    model = make_trained_like(resnet50()).eval()
    x = torch.randn(1, 3, 224, 224)
    walls, per_decomposition = [], collections.defaultdict(list)
    for _ in range(args.repeats):
        compressor = Compressor(model, config_type="vbmf", example_input=x, ft_every=1000, registry=registry,
                                progress=False)
        started = time.perf_counter()
        results = compressor.compression_step()
        walls.append(time.perf_counter() - started)
        totals = collections.Counter()
        for r in results:
            totals[r.decomposition] += r.seconds
        for name, seconds in totals.items():
            per_decomposition[name].append(seconds)
    compressed = standardize_model(compressor.compressed_model).eval()
    before, after = (ModelStats.from_model(m, registry, x) for m in (model, compressed))
    with torch.no_grad():
        batch = torch.randn(8, 3, 224, 224)
        reference = model(batch)
        error = float((compressed(batch) - reference).norm() / reference.norm())
    applied = sum(r.applied for r in results)
    print(f"\nlayers compressed: {applied} of {len(results)}")
    print(f"{'':24}{'median':>10}{'min':>10}{'max':>10}")
    print(f"{'whole pass (s)':24}{statistics.median(walls):10.2f}{min(walls):10.2f}{max(walls):10.2f}")
    for name, seconds in sorted(per_decomposition.items()):
        print(f"{name + ' layers (s)':24}{statistics.median(seconds):10.2f}{min(seconds):10.2f}{max(seconds):10.2f}")
    print(f"\nFLOPs (whole forward, FlopCounterMode): {before.total_flops / 1e9:.2f} G -> "
          f"{after.total_flops / 1e9:.2f} G ({before.total_flops / after.total_flops:.2f}x)")
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M -> "
          f"{sum(p.numel() for p in compressed.parameters()) / 1e6:.2f} M "
          f"({sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in compressed.parameters()):.2f}x)")
    print(f"relative output error on 8 random images: {error:.3f}")


if __name__ == "__main__":
    main()
