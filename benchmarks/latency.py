"""Measured CPU inference speed-up of a ResNet-50-shaped model compressed by the ``budget`` selector, divided by
its FLOPs reduction, for each way of running it. Every timing compares models in alternation in one process.

For each target FLOPs reduction the model is compressed once (tucker2 for k x k convolutions, svd for 1x1 ones
and the classifier, ranks allocated by ``budget``). Then, per thread count and batch size:

* eager: the original model as it is, and through ``optimize_for_inference``; the compressed model through
  ``standardize_model`` and through ``optimize_for_inference`` (both optimized at the measured batch size);
  and a control, a dense ResNet-50 with fewer channels in every layer and about the same FLOPs reduction
  (optimized too): what removing that many FLOPs buys here without factorizing anything;
* torch.compile (inductor): the original as it is against the optimized compressed model;
* ONNX Runtime: both exported with ``torch.onnx.export``, run with the same number of intra-op threads.

The FLOPs reduction is that of the whole forward pass (``torch.utils.flop_counter.FlopCounterMode``); ``load``
is the machine's 1-minute load average when the row was printed (other processes share the cores).

    python benchmarks/latency.py [--reductions 2,3] [--batches 1,32] [--threads 1,2] [--rank-multiples auto,1]
                                 [--backends eager,compile,onnxruntime] [--repeats 20] [--large-repeats 3]
                                 [--omp-wait-policy passive|active|default]

The whole default run takes about an hour on 2 shared cores; batch-32 rows use ``--large-repeats`` rounds. Idle
OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless ``--omp-wait-policy`` says otherwise (see
``choose_wait_policy``), and malloc keeps freed memory (see ``_setup.keep_freed_memory``) unless
``--system-malloc``: both settings apply to every model alike.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import logging
import os
import sys
import time
import warnings

from _omp import WAIT_POLICIES, choose_wait_policy  # noqa: E402 (torch-free: before torch loads OpenMP)

if __name__ == "__main__":
    choose_wait_policy(sys.argv)

import torch
from torch import nn

from _setup import flops, keep_freed_memory, make_trained_like, resnet50, setup, thinner_dense_control
from musco_core import (Compressor, FactorizedLayer, ModelStats, PointwiseConv2d, default_registry,
                        generate_model_compr_kwargs, optimize_for_inference, standardize_model)
from musco_core.timing import fixed_threads, time_alternated, time_modules

COLUMNS = (f"{'FLOPs x':>8} {'threads':>7} {'batch':>5}  {'backend':<34}{'original ms':>12}{'compressed ms':>14}"
           f"{'speed-up':>9}{'/ FLOPs x':>10}{'load':>6}")


def compress(model: nn.Module, x: torch.Tensor, reduction: float, rank_multiple: int | str = "auto") -> nn.Module:
    layers = generate_model_compr_kwargs(ModelStats.from_model(model, default_registry(), x), "budget")
    compressor = Compressor(model, example_input=x, progress=False, model_compr_kwargs={
        "version": 1, "layers": layers, "settings": {
            "ft_every": 1000, "rank_multiple": rank_multiple,
            "algo_kwargs": {"budget": {"reduction": reduction, "metric": "flops"}}}})
    while not compressor.done:
        compressor.compression_step()
    return compressor.compressed_model.eval()


def row(flops_x: float, threads: int, batch: int, backend: str, original: float, compressed: float) -> None:
    speed_up = original / compressed
    print(f"{flops_x:>8.2f} {threads:>7} {batch:>5}  {backend:<34}{1e3 * original:>12.1f}{1e3 * compressed:>14.1f}"
          f"{speed_up:>9.2f}{speed_up / flops_x:>10.2f}{os.getloadavg()[0]:>6.1f}", flush=True)


def rounds(batch: int, args) -> dict:
    """Timing effort: batch-32 passes take seconds on 2 cores, so they get few rounds."""
    if batch >= 8:
        return {"warmup": 1, "min_rounds": args.large_repeats, "max_rounds": args.large_repeats, "min_seconds": 0}
    return {"warmup": 2, "min_rounds": args.repeats, "max_rounds": 4 * args.repeats, "min_seconds": 2.0}


def eager_rows(original, compressed, control, x, flops_x, threads, args) -> nn.Module:
    started = time.perf_counter()
    optimized = optimize_for_inference(compressed, x, progress=False)
    seconds = time.perf_counter() - started
    original_optimized = optimize_for_inference(original, x, progress=False)
    standardized = standardize_model(copy.deepcopy(compressed)).eval()
    control_model, width, control_x = control
    control_optimized = optimize_for_inference(control_model, x, progress=False)
    t_original, t_original_optimized, t_standardized, t_optimized, t_control = time_modules(
        [original, original_optimized, standardized, optimized, control_optimized], x, **rounds(len(x), args))
    batch = len(x)
    row(flops_x, threads, batch, "eager, standardize_model", t_original, t_standardized)
    row(flops_x, threads, batch, f"eager, optimize_for_inference{layout(optimized)}", t_original, t_optimized)
    row(flops_x, threads, batch, f"eager, both optimized{layout(original_optimized)}", t_original_optimized,
        t_optimized)
    row(control_x, threads, batch, f"control: dense, width {width}{layout(control_optimized)}", t_original, t_control)
    factorized = sum(isinstance(m, FactorizedLayer) for m in compressed.modules())
    products = sum(isinstance(m, PointwiseConv2d) for m in optimized.modules())
    print(f"{'':>24}(optimize_for_inference: {seconds:.1f} s; of {factorized} factorized layers "
          f"{kept_as_chains(optimized)} run as chains, the others as one layer; {products} 1x1 convolutions "
          f"as matrix products)")
    return optimized


def layout(model: nn.Module) -> str:
    """' (CL)' for a model whose convolutions are channels_last."""
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    return " (CL)" if convs and convs[0].is_contiguous(memory_format=torch.channels_last) else ""


def kept_as_chains(optimized: nn.Module) -> int:
    """How many factorized layers still run as a chain of two or more factors."""
    return sum(type(m) is nn.Sequential and len(m) > 1 and all(isinstance(c, nn.Conv2d | nn.Linear) for c in m)
               for m in optimized.modules())


def compile_row(original, optimized, x, flops_x, threads, args) -> None:
    import torch._dynamo

    torch._dynamo.reset()  # inductor's CPU kernels take the thread count at compile time
    compiled = [torch.compile(original), torch.compile(optimized)]
    with torch.no_grad():
        for model in compiled:
            model(x)  # compiles
        t_original, t_optimized = time_modules(compiled, x, **rounds(len(x), args))
    row(flops_x, threads, len(x), "torch.compile", t_original, t_optimized)


def onnx_row(original, optimized, x, flops_x, threads, args) -> None:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = []
    for model in (original, optimized):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        sessions.append(onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                                     providers=["CPUExecutionProvider"]))
    feed = x.numpy()
    calls = [lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}) for s in sessions]
    t_original, t_optimized = time_alternated(calls, **rounds(len(x), args))
    row(flops_x, threads, len(x), "onnxruntime (both exported)", t_original, t_optimized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", default="2,3", help="target FLOPs reductions of the budget")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--backends", default="eager,compile,onnxruntime")
    parser.add_argument("--repeats", type=int, default=20, help="timing rounds at small batch sizes (at least)")
    parser.add_argument("--large-repeats", type=int, default=3, help="timing rounds at batch 8 and above")
    parser.add_argument("--rank-multiples", default="auto",
                        help="settings.rank_multiple of the compression, one model per value (e.g. auto,1)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is (by default freed memory is kept: see _setup.py)")
    parser.add_argument("--omp-wait-policy", choices=WAIT_POLICIES,
                        help="what idle OpenMP threads do (see choose_wait_policy); default: passive, unless "
                             "OMP_WAIT_POLICY is set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torch").setLevel(logging.ERROR)
    backends = set(args.backends.split(","))
    kept = not args.system_malloc and keep_freed_memory()
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)")
    print(f"{setup(1)}; OMP_WAIT_POLICY={policy}; malloc keeps freed memory: {kept}")
    model = make_trained_like(resnet50()).eval()
    x1 = torch.randn(1, 3, 224, 224)
    original_flops = flops(model, x1)
    print(COLUMNS + "\n" + "-" * len(COLUMNS))
    for reduction, multiple in itertools.product(map(float, args.reductions.split(",")),
                                                 args.rank_multiples.split(",")):
        compressed = compress(model, x1, reduction, multiple if multiple == "auto" else int(multiple))
        flops_x = original_flops / flops(standardize_model(copy.deepcopy(compressed)), x1)
        control = thinner_dense_control(flops_x)
        print(f"target {reduction}x FLOPs, rank_multiple {multiple}: {flops_x:.3f}x fewer FLOPs; control: a dense "
              f"ResNet-50 of width {control[1]} (64 in the original), {control[2]:.3f}x fewer FLOPs")
        for threads in map(int, args.threads.split(",")):
            for batch in map(int, args.batches.split(",")):
                x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
                with fixed_threads(threads):
                    optimized = eager_rows(model, compressed, control, x, flops_x, threads, args)
                    if "compile" in backends:
                        compile_row(model, optimized, x, flops_x, threads, args)
                    if "onnxruntime" in backends:
                        onnx_row(model, optimized, x, flops_x, threads, args)


if __name__ == "__main__":
    main()
