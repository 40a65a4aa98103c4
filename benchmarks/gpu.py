"""The latency comparison of ``latency.py``, and a timed compression pass, on a CUDA GPU.

A ResNet-50-shaped model with trained-like weights is compressed on the GPU by the ``budget`` selector (the
compression pass is timed), then the original and the compressed model (through ``standardize_model`` and
through ``optimize_for_inference``, each optimized at the measured batch size) are timed in alternation, with a
device synchronization after every forward pass, together with the control of ``latency.py`` (a dense
ResNet-50 thinned to about the same FLOPs, optimized too); a torch.compile row compares the compiled original
with the compiled optimized model. Then, per ``--latency-targets``, a latency budget planned for the deployed form
(``form: optimized``) at batch 1, judged by both models through ``optimize_for_inference``. Without CUDA it prints
why and exits with status 0.

    python benchmarks/gpu.py [--reductions 2,3] [--batches 1,32] [--dtype float32] [--no-compile]
                             [--latency-targets 1.8]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from _setup import flops, fresh_latency_cache, make_trained_like, resnet50, thinner_dense_control
from musco_core import Compressor, optimize_for_inference, standardize_model
from musco_core.timing import time_modules

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compress(model: nn.Module, x: torch.Tensor, budget: dict, device: torch.device) -> tuple[Compressor, float]:
    """The finished compressor of a ``budget`` run on the GPU, and the run's seconds."""
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    compressor = Compressor(model, example_input=x, config_type="budget", ft_every=1000, progress=False,
                            all_algo_kwargs={"budget": budget})
    while not compressor.done:
        compressor.compression_step()
    torch.cuda.synchronize(device)
    return compressor, time.perf_counter() - started


def latency_target(model: nn.Module, x: torch.Tensor, target: float, device: torch.device, repeats: int) -> None:
    """A latency budget planned for the deployed form, with a fresh timing cache: planned, measured by the run, and
    both models through ``optimize_for_inference`` timed in alternation."""
    with fresh_latency_cache():
        compressor, seconds = compress(model, x, {"reduction": target, "metric": "latency", "form": "optimized"},
                                       device)
    record = compressor.budgets[-1]
    original = optimize_for_inference(model, x, progress=False)
    compressed = optimize_for_inference(compressor.compressed_model.eval(), x, progress=False)
    t_original, t_compressed = time_modules([original, compressed], x, warmup=5, min_rounds=repeats,
                                            min_seconds=2.0, device=device)
    deployed = t_original / t_compressed
    print(f"\nlatency target {target}x (form: optimized), batch {x.shape[0]}: run {seconds:.1f} s, planned "
          f"{record.planned:.3f}x, measured by the run {record.measured:.3f}x; both through optimize_for_inference "
          f"{1e3 * t_original:.3f} ms -> {1e3 * t_compressed:.3f} ms, {deployed:.3f}x (within 5%: "
          f"{abs(deployed / target - 1) <= 0.05})" + (f"; note: {record.note}" if record.note else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", default="2,3")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype the models run in (compression always runs in float32)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--latency-targets", default="1.8",
                        help="latency budgets (form: optimized) to run at batch 1 after the FLOPs rows; '' for none")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}): nothing to "
              f"measure; run this on a machine with a GPU")
        return
    device = torch.device("cuda")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, {args.dtype}; TF32 for convolutions "
          f"{torch.backends.cudnn.allow_tf32}, for matmuls {torch.backends.cuda.matmul.allow_tf32}")
    model = make_trained_like(resnet50()).to(device).eval()
    x1 = torch.randn(1, 3, 224, 224, device=device)
    original_flops = flops(model, x1)
    dtype = DTYPES[args.dtype]
    header = (f"{'FLOPs x':>8} {'batch':>5}  {'model':<32}{'original ms':>12}{'compressed ms':>14}{'speed-up':>9}"
              f"{'/ FLOPs x':>10}")
    for reduction in map(float, args.reductions.split(",")):
        compressor, seconds = compress(model, x1, {"reduction": reduction, "metric": "flops"}, device)
        compressed = compressor.compressed_model.eval()
        flops_x = original_flops / flops(standardize_model(copy.deepcopy(compressed)), x1)
        control, width, control_x = thinner_dense_control(flops_x)
        control = control.to(device, dtype)
        print(f"\nbudget {reduction}x FLOPs: compression pass {seconds:.1f} s on the GPU, FLOPs reduced "
              f"{flops_x:.2f}x; control: a dense ResNet-50 of width {width}, {control_x:.2f}x fewer FLOPs\n"
              f"{header}\n{'-' * len(header)}")
        original = copy.deepcopy(model).to(dtype)
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            rounds = {"warmup": 5, "min_rounds": args.repeats, "min_seconds": 1.0, "device": device}
            standardized = standardize_model(copy.deepcopy(compressed)).to(dtype).eval()
            optimized = optimize_for_inference(copy.deepcopy(compressed).to(dtype), x, inplace=True, progress=False)
            control_optimized = optimize_for_inference(control, x, progress=False)
            times = time_modules([original, standardized, optimized, control_optimized], x, **rounds)
            rows = [("eager, standardize_model", flops_x, times[0], times[1]),
                    ("eager, optimize_for_inference", flops_x, times[0], times[2]),
                    (f"control: dense, width {width}", control_x, times[0], times[3])]
            if not args.no_compile:
                compiled = [torch.compile(original), torch.compile(optimized)]
                with torch.no_grad():
                    for module in compiled:
                        module(x)
                rows.append(("torch.compile", flops_x, *time_modules(compiled, x, **rounds)))
            for label, reduced, t_original, t_compressed in rows:
                speed_up = t_original / t_compressed
                print(f"{reduced:>8.2f} {batch:>5}  {label:<32}{1e3 * t_original:>12.3f}{1e3 * t_compressed:>14.3f}"
                      f"{speed_up:>9.2f}{speed_up / reduced:>10.2f}", flush=True)
    for target in filter(None, args.latency_targets.split(",")):
        latency_target(model, x1, float(target), device, args.repeats)


if __name__ == "__main__":
    main()
