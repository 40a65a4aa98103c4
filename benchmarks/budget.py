"""Whole-model budgets on a ResNet-50-shaped model with trained-like weights.

For each target the ``budget`` selector is run, and the achieved reduction is compared with the target. The
result is also set against uniform per-layer rates (``param_reduction`` on every layer, with the rate chosen by
bisection so that the whole model reaches the same reduction). The comparison uses the summed relative squared
weight error (what the budget minimizes) and the relative error of the model's output on random input. A third
run adds the sensitivity pass, with the relative output error on another random batch as its loss.

    python benchmarks/budget.py            # about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from _setup import make_trained_like, resnet50, setup

from musco_core import Compressor


def schedule(model: nn.Module, selection: str, **params) -> dict:
    return {name: {"decomposition": "svd" if module.kernel_size == (1, 1) else "tucker2", "rank_selection": selection,
                   **params}
            for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and name != "conv1"}


def compress(model, x, layers, **kwargs) -> tuple[Compressor, float]:
    started = time.perf_counter()
    compressor = Compressor(model, example_input=x, model_compr_kwargs=layers, ft_every=len(layers), progress=False,
                            **kwargs)
    while not compressor.done:
        compressor.compression_step()
    return compressor, time.perf_counter() - started


def figures(compressor: Compressor, model: nn.Module, x: torch.Tensor, metric: str) -> dict:
    report = compressor.report()
    with torch.no_grad():
        reference, output = model(x), compressor.compressed_model(x)
    return {"achieved": report.macs_ratio if metric == "flops" else report.params_ratio,
            "sq_error": sum(r.relative_error ** 2 for r in report.layers if r.applied),
            "output_error": float((output - reference).norm() / reference.norm())}


def uniform_rate_for(model, x, metric: str, target: float) -> tuple[Compressor, float]:
    """The param_reduction rate (same on every layer) whose whole-model reduction is closest above ``target``."""
    low, high = 1.01, 64.0
    best = None
    for _ in range(12):
        rate = (low * high) ** 0.5
        compressor, _ = compress(model, x, schedule(model, "param_reduction", param_reduction_rate=rate))
        report = compressor.report()
        achieved = report.macs_ratio if metric == "flops" else report.params_ratio
        if achieved >= target:
            best, high = (compressor, rate), rate
        else:
            low = rate
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="flops:2,flops:3,params:2,params:3")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(setup(args.threads))
    model = make_trained_like(resnet50()).eval()
    x = torch.randn(1, 3, 224, 224)
    batch = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(batch)

    def output_error(candidate: nn.Module) -> float:  # the sensitivity pass's loss, on other inputs than x
        with torch.no_grad():
            return float((candidate(batch) - reference).norm() / reference.norm())

    header = (f"{'metric':>7} {'target':>7} {'achieved':>9} {'seconds':>8} | {'uniform rate':>12} {'achieved':>9} | "
              f"{'sum rel.err^2 budget':>20} {'uniform':>8} | {'output rel.err budget':>21} {'uniform':>8} | "
              f"{'sensitivity: achieved':>9} {'output rel.err':>14} {'seconds':>8}")
    print(header)
    print("-" * len(header))
    for item in args.targets.split(","):
        metric, target = item.split(":")
        target = float(target)
        budget, seconds = compress(model, x, schedule(model, "budget"),
                                   all_algo_kwargs={"budget": {"reduction": target, "metric": metric}})
        ours = figures(budget, model, x, metric)
        aware, aware_seconds = compress(model, x, schedule(model, "budget"), evaluate=output_error,
                                        all_algo_kwargs={"budget": {"reduction": target, "metric": metric}})
        sensitive = figures(aware, model, x, metric)
        uniform, rate = uniform_rate_for(model, x, metric, ours["achieved"])
        theirs = figures(uniform, model, x, metric)
        print(f"{metric:>7} {target:>7.2f} {ours['achieved']:>9.3f} {seconds:>8.1f} | {rate:>12.3f} "
              f"{theirs['achieved']:>9.3f} | {ours['sq_error']:>20.3f} {theirs['sq_error']:>8.3f} | "
              f"{ours['output_error']:>21.3f} {theirs['output_error']:>8.3f} | {sensitive['achieved']:>9.3f} "
              f"{sensitive['output_error']:>14.3f} {aware_seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
