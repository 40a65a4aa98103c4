"""Time of every bundled decomposition on every distinct layer shape of a ResNet-50 (trained-like weights):
svd and tucker2 with vbmf ranks, cp3 and cp4 with the ranks of parameter reduction rates 2 and 4.

    python benchmarks/layer_times.py [--threads 2] [--decompositions cp3,cp4] [--weights 512x512x3x3]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from _setup import make_trained_like, resnet50, setup
from musco_core import Compressor, default_registry

CASES = [("svd", "vbmf", {}), ("tucker2", "vbmf", {})] + [
    (cp, "param_reduction", {"param_reduction_rate": rate}) for rate in (4, 2) for cp in ("cp3", "cp4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decompositions", help="comma-separated decompositions to run (default: all)")
    parser.add_argument("--weights", help="comma-separated weight shapes to run, e.g. 512x512x3x3 (default: all)")
    args = parser.parse_args()
    only = set(args.decompositions.split(",")) if args.decompositions else None
    weights = set(args.weights.split(",")) if args.weights else None
    print(setup(args.threads))
    registry = default_registry()
    model = make_trained_like(resnet50())
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            shapes.setdefault((type(module).__name__, tuple(module.weight.shape), getattr(module, "stride", None)),
                              (name, module))
    header = (f"{'layer':<24}{'weight':<20}{'decomposition':<22}{'ranks':<12}{'seconds':>8}{'rel.err':>9}"
              f"{'weights':>9}")
    print(header + "\n" + "-" * len(header))
    worst = {}
    for (_, shape, _), (name, module) in shapes.items():
        if weights is not None and "x".join(map(str, shape)) not in weights:
            continue
        for decomposition, selection, extra in CASES:
            if only is not None and decomposition not in only:
                continue
            if registry.decompositions.get(decomposition).unsupported_reason(
                    registry.adapter_for(module).read(module)[0]):
                continue
            config = {"0": {"decomposition": decomposition, "rank_selection": selection, **extra, "force": True}}
            compressor = Compressor(nn.Sequential(module), model_compr_kwargs=config, registry=registry,
                                    progress=False)
            (r,) = compressor.compression_step()
            label = f"{decomposition}/{selection}" + (f" {extra['param_reduction_rate']}" if extra else "")
            worst[label] = max(worst.get(label, 0.0), r.seconds)
            print(f"{name:<24}{'x'.join(map(str, shape)):<20}{label:<22}{','.join(map(str, r.ranks)):<12}"
                  f"{r.seconds:>8.2f}{r.relative_error:>9.4f}{r.params_after / r.params_before:>9.2f}")
    print("\nslowest layer per decomposition (s): "
          + ", ".join(f"{label} {seconds:.1f}" for label, seconds in worst.items()))


if __name__ == "__main__":
    with torch.no_grad():
        main()
