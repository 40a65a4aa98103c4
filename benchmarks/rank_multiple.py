"""Does rounding a rank up to a multiple of 8 make a factor chain faster on this machine?

Backends run channel and matrix dimensions in blocks (oneDNN on AVX-512 CPUs in blocks of 8 and 16 channels,
MKL's GEMM in vector widths, GPU tensor cores in multiples of 8), so a rank just below a multiple can cost as
much as the multiple or more. For each geometry of ResNet-50 (the svd chain of a 1x1 convolution, the Tucker-2
chain of a 3x3 one) and of MiniLM's Linear layers, at batch 1, this times every rank from 4 to 72 in blocks of
eight consecutive ranks (r = 8k+1 .. 8k+8, each block timed in alternation, medians), in the default memory
format and in channels_last, and compares each rank with the multiple of 8 it would be rounded up to.

    python benchmarks/rank_multiple.py [--threads 1] [--max-rank 72] [--multiple 8]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
from torch import nn

from _setup import setup
from musco_core.components import round_ranks
from musco_core.timing import time_modules_at


def svd_chain(c_in: int, c_out: int, rank: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, rank, 1, bias=False), nn.Conv2d(rank, c_out, 1))


def tucker2_chain(c_in: int, c_out: int, rank: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, rank, 1, bias=False), nn.Conv2d(rank, rank, 3, padding=1, bias=False),
                         nn.Conv2d(rank, c_out, 1))


def linear_chain(n_in: int, n_out: int, rank: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, rank, bias=False), nn.Linear(rank, n_out))


#: name, chain builder, in, out, input shape (batch 1), whether a memory format applies
GEOMETRIES = [
    ("1x1 256->64 @56", svd_chain, 256, 64, (1, 256, 56, 56)),
    ("1x1 64->256 @56", svd_chain, 64, 256, (1, 64, 56, 56)),
    ("1x1 512->128 @28", svd_chain, 512, 128, (1, 512, 28, 28)),
    ("1x1 1024->256 @14", svd_chain, 1024, 256, (1, 1024, 14, 14)),
    ("1x1 2048->512 @7", svd_chain, 2048, 512, (1, 2048, 7, 7)),
    ("3x3 64 @56", tucker2_chain, 64, 64, (1, 64, 56, 56)),
    ("3x3 128 @28", tucker2_chain, 128, 128, (1, 128, 28, 28)),
    ("3x3 256 @14", tucker2_chain, 256, 256, (1, 256, 14, 14)),
    ("3x3 512 @7", tucker2_chain, 512, 512, (1, 512, 7, 7)),
    ("linear 384->1536 x128", linear_chain, 384, 1536, (128, 384)),
    ("linear 1536->384 x128", linear_chain, 1536, 384, (128, 1536)),
]


def rank_times(build, c_in: int, c_out: int, shape, channels_last: bool, max_rank: int, multiple: int,
               threads: int) -> dict[int, float]:
    """Seconds per forward of the chain at every rank from 1 to ``max_rank``, timed in blocks of ``multiple``
    consecutive ranks ending at a multiple."""
    times: dict[int, float] = {}
    torch.manual_seed(0)
    for top in range(multiple, max_rank + 1, multiple):
        ranks = list(range(top - multiple + 1, top + 1))
        modules = [build(c_in, c_out, r).eval() for r in ranks]
        seconds = time_modules_at(modules, shape, channels_last=channels_last, threads=threads, min_rounds=9,
                                  min_seconds=0.3)
        times.update(zip(ranks, seconds))
    return times


def summarize(times: dict[int, float], multiple: int, ranks: range, growth: tuple[float, float]
              ) -> tuple[int, int, float, float]:
    """Over the ``ranks`` (not multiples) that rounding up grows by a fraction of the rank within ``growth`` (low
    exclusive, high inclusive): how many, how many got faster, the median and the worst time ratio."""
    ratios = []
    for r in ranks:
        (up,) = round_ranks((r,), multiple)
        if up != r and growth[0] < (up - r) / r <= growth[1]:
            ratios.append(times[up] / times[r])
    if not ratios:
        return 0, 0, float("nan"), float("nan")
    return len(ratios), sum(q < 1 for q in ratios), statistics.median(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-rank", type=int, default=72)
    parser.add_argument("--multiple", type=int, default=8)
    args = parser.parse_args()
    print(setup(args.threads), f"load {os.getloadavg()[0]:.1f}")
    m = args.multiple
    print(f"time(rank rounded up to a multiple of {m}) / time(rank); 'n faster': ranks the rounding made faster")
    print("| geometry | format | ranks 8-31, up <= 25%: n faster, median, worst | ranks >= 32: n faster, median, "
          "worst | all ranks >= 4, up > 25%: n faster, median, worst |")
    print("|---|---|---|---|---|")
    columns = [(range(8, 32), (0.0, 0.25)), (range(32, args.max_rank + 1), (0.0, 1.0)),
               (range(4, args.max_rank + 1), (0.25, float("inf")))]
    for name, build, c_in, c_out, shape in GEOMETRIES:
        formats = [False, True] if len(shape) == 4 else [False]
        for channels_last in formats:
            times = rank_times(build, c_in, c_out, shape, channels_last, args.max_rank, m, args.threads)
            cells = []
            for ranks, growth in columns:
                n, faster, med, worst = summarize(times, m, ranks, growth)
                cells.append(f"{faster}/{n}, {med:.2f}, {worst:.2f}")
            fmt = "channels_last" if channels_last else "default"
            print(f"| {name} | {fmt} | " + " | ".join(cells) + " |", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
