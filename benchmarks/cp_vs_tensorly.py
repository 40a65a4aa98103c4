"""CP3 / CP4 decompositions of trained-like 256x256x3x3 and 512x512x3x3 kernels: musco-core's ALS against
tensorly's parafac (pytorch backend, SVD init), measured side by side in one run.

For each case musco-core runs with its defaults; tensorly then runs (up to --tensorly-seconds) while a callback
stops it as soon as its error reaches musco-core's. The ratio is tensorly's time to that error over ours; a
">" ratio means tensorly had not reached it when its time ran out.

    python benchmarks/cp_vs_tensorly.py [--threads 2] [--rate 4] [--tensorly-seconds 90]
"""
from __future__ import annotations

import argparse
import time
import warnings

import tensorly
import torch
from tensorly.decomposition import parafac
from torch import nn

from _setup import make_trained_like, setup
from musco_plugins.cp import CPParams
from musco_plugins.factorize import cp_als


def tensorly_time_to(tensor: torch.Tensor, rank: int, target: float, budget: float
                     ) -> tuple[float | None, float, float]:
    """(seconds until tensorly's error <= target or None, its best error, its total time)."""
    started, reached, best = time.perf_counter(), None, float("inf")

    def callback(_cp, error):
        nonlocal reached, best
        best = min(best, float(error))
        elapsed = time.perf_counter() - started
        if reached is None and error <= target:
            reached = elapsed
        return reached is not None or elapsed > budget  # True stops parafac

    with tensorly.backend_context("pytorch"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its SVD init clamps ranks above a mode's size, noisily
        parafac(tensor, rank, n_iter_max=100_000, init="svd", tol=0, return_errors=True, callback=callback)
    return reached, best, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=float, default=4.0, help="parameter reduction rate that sets the rank")
    parser.add_argument("--tensorly-seconds", type=float, default=90.0)
    args = parser.parse_args()
    print(setup(args.threads))
    defaults = CPParams()
    print(f"musco-core ALS: n_iter_max={defaults.n_iter_max}, tol={defaults.tol}; rank from rate {args.rate}\n")
    header = (f"{'kernel':<14}{'dec.':<6}{'rank':>6}{'ours s':>9}{'ours err':>10}{'tensorly s':>12}"
              f"{'tl err':>9}{'speed-up':>10}")
    print(header)
    print("-" * len(header))
    for channels in (256, 512):
        weight = make_trained_like(nn.Sequential(nn.Conv2d(channels, channels, 3)))[0].weight.detach()
        for name, tensor in (("cp3", weight.reshape(channels, channels, 9).contiguous()), ("cp4", weight)):
            per_rank = sum(tensor.shape)  # weights per CP rank: one column per mode
            rank = int(weight.numel() / per_rank / args.rate)
            started = time.perf_counter()
            _, ours = cp_als(tensor, rank, n_iter_max=defaults.n_iter_max, tol=defaults.tol)
            our_seconds = time.perf_counter() - started
            reached, best, total = tensorly_time_to(tensor, rank, ours, args.tensorly_seconds)
            speed = f"{reached / our_seconds:.1f}x" if reached else f">{total / our_seconds:.1f}x"
            shown = f"{reached:.1f}" if reached else f">{total:.1f}"
            print(f"{f'{channels}x{channels}x3x3':<14}{name:<6}{rank:>6}{our_seconds:>9.2f}{ours:>10.4f}"
                  f"{shown:>12}{best:>9.4f}{speed:>10}")


if __name__ == "__main__":
    main()
