"""Measured CPU inference latency of a ResNet-50-shaped model before and after compression, next to the FLOPs
reduction: the vbmf schedule (about 2.4x fewer FLOPs), the same with ranks rounded to multiples of 32, and the
param_reduction schedule (about 1.9x). Original and compressed runs alternate, so drift hits both alike.

    python benchmarks/latency.py [--threads 2] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _setup import make_trained_like, resnet50, setup
from musco_core import Compressor, ModelStats, default_registry, generate_model_compr_kwargs, standardize_model


@torch.no_grad()
def latencies(models, x, repeats):
    """Median seconds per forward pass of each model, timed in alternation after a warm-up."""
    for model in models:
        for _ in range(2):
            model(x)
    times = [[] for _ in models]
    for _ in range(repeats):
        for model, samples in zip(models, times):
            started = time.perf_counter()
            model(x)
            samples.append(time.perf_counter() - started)
    return [statistics.median(samples) for samples in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(setup(args.threads))
    registry = default_registry()
    model = make_trained_like(resnet50()).eval()
    x1 = torch.randn(1, 3, 224, 224)
    stats = ModelStats.from_model(model, registry, x1)
    before = stats.total_flops
    vbmf = generate_model_compr_kwargs(stats, "vbmf", registry=registry)
    schedules = {"vbmf 0.8": {"version": 1, "settings": {"ft_every": 1000}, "layers": vbmf},
                 "vbmf 0.8, ranks x32": {"version": 1, "settings": {"ft_every": 1000, "rank_multiple": 32},
                                         "layers": vbmf},
                 "param_reduction 2": {"version": 1, "settings": {"ft_every": 1000},
                                       "layers": generate_model_compr_kwargs(stats, "param_reduction",
                                                                             registry=registry)}}
    print(f"\n{'schedule':<22}{'FLOPs x':>9}{'batch':>7}{'original ms':>13}{'compressed ms':>15}{'speed-up':>10}"
          f"{'speed-up / FLOPs x':>20}")
    for label, schedule in schedules.items():
        compressor = Compressor(model, model_compr_kwargs=schedule, example_input=x1, registry=registry,
                                progress=False)
        compressor.compression_step()
        compressed = standardize_model(compressor.compressed_model).eval()
        flops_x = before / ModelStats.from_model(compressed, registry, x1).total_flops
        for batch in (1, 32):
            x = torch.randn(batch, 3, 224, 224)
            repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
            t0, t1 = latencies([model, compressed], x, repeats)
            print(f"{label:<22}{flops_x:>9.2f}{batch:>7}{1000 * t0:>13.1f}{1000 * t1:>15.1f}{t0 / t1:>10.2f}"
                  f"{t0 / t1 / flops_x:>20.2f}")


if __name__ == "__main__":
    main()
