"""Measured CPU inference latency of a ResNet-50-shaped model before and after compression, next to the FLOPs
reduction: the vbmf schedule (about 2.4x fewer FLOPs) and a Tucker2/SVD schedule at about 2x.

    python benchmarks/latency.py [--threads 2] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _setup import make_trained_like, resnet50, setup
from musco_core import Compressor, ModelStats, default_registry, standardize_model


@torch.no_grad()
def latency(model, x, repeats):
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(setup(args.threads))
    registry = default_registry()
    model = make_trained_like(resnet50()).eval()
    x1 = torch.randn(1, 3, 224, 224)
    schedules = {"vbmf 0.8": dict(config_type="vbmf"),
                 "param_reduction 2": dict(config_type="param_reduction")}
    before = ModelStats.from_model(model, registry, x1).total_flops
    print(f"\n{'schedule':<20}{'FLOPs x':>9}{'batch':>7}{'original ms':>13}{'compressed ms':>15}{'speed-up':>10}"
          f"{'speed-up / FLOPs x':>20}")
    for label, kwargs in schedules.items():
        compressor = Compressor(model, example_input=x1, ft_every=1000, registry=registry, progress=False, **kwargs)
        compressor.compression_step()
        compressed = standardize_model(compressor.compressed_model).eval()
        flops_x = before / ModelStats.from_model(compressed, registry, x1).total_flops
        for batch in (1, 32):
            x = torch.randn(batch, 3, 224, 224)
            repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
            t0, t1 = latency(model, x, repeats), latency(compressed, x, repeats)
            print(f"{label:<20}{flops_x:>9.2f}{batch:>7}{1000 * t0:>13.1f}{1000 * t1:>15.1f}{t0 / t1:>10.2f}"
                  f"{t0 / t1 / flops_x:>20.2f}")


if __name__ == "__main__":
    main()
