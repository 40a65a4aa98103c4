"""Accuracy on a real pretrained CNN: EfficientNet-Lite0 (ImageNet) at 1.3x and 1.5x fewer MACs.

88% of Lite0's MACs are in its 32 dense 1x1 convolutions (expansions, projections and the head); the stem
(3 channels) and the depthwise convolutions are beyond svd and tucker2, and the classifier is the output layer. The 1x1
convolutions are compressed by ``svd`` and ``whitened_svd``, with a uniform rate (``param_reduction``, the rate
chosen so that the whole model reaches the target) and with the whole-model ``budget`` (``flops``, given the
calibration images so that it allocates by the layers' output errors on them, for ``svd`` too); the schedule
``generate_model_compr_kwargs(..., "vbmf")`` writes is run too (its reduction is whatever vbmf chooses).

Measure: top-1 agreement with the uncompressed model on held-out images, i.e. how often the compressed model's
most likely ImageNet class is the uncompressed model's. The images are real photographs that ship in wheels
(scikit-learn's and scikit-image's sample images, matplotlib's portrait): random crops (a quarter to all of the
area) and flips of them, resized to 224 x 224. Calibration (``whitened_svd``, the budget) uses crops of one set of photographs,
evaluation crops of the others. No fine-tuning.

    python benchmarks/accuracy_efficientnet.py [--threads 2] [--targets 1.3 1.5] [--eval-views 40]
                                               [--decompositions svd whitened_svd]
                                               [--selections uniform budget budget+sens vbmf groups]
                                               [--output-weighting PROJECTIONS]
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _setup import setup
from efficientnet_lite import normalize, pretrained
from musco_core import Compressor, ModelStats, default_registry, generate_model_compr_kwargs

SIZE = 224
#: Photographs by package and file; calibration and evaluation use different ones.
CALIBRATION_PHOTOS = [("skimage", "data/astronaut.png"), ("skimage", "data/coffee.png"),
                      ("skimage", "data/hubble_deep_field.jpg"), ("skimage", "data/ihc.png"),
                      ("skimage", "data/motorcycle_left.png"), ("skimage", "data/gravel.png"),
                      ("skimage", "data/camera.png"), ("skimage", "data/coins.png"),
                      ("sklearn", "datasets/images/china.jpg")]
EVALUATION_PHOTOS = [("skimage", "data/chelsea.png"), ("skimage", "data/rocket.jpg"),
                     ("skimage", "data/retina.jpg"), ("skimage", "data/grass.png"), ("skimage", "data/brick.png"),
                     ("skimage", "data/moon.png"), ("skimage", "data/page.png"),
                     ("sklearn", "datasets/images/flower.jpg"),
                     ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")]


def photo(package: str, relative: str) -> Image.Image:
    """A file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{package} is not installed: pip install -e '.[bench]'")
    return Image.open(Path(spec.origin).parent / relative).convert("RGB")


def views(image: Image.Image, n: int, rng: random.Random) -> list[torch.Tensor]:
    """``n`` random crops (a quarter to all of the area, aspect 3:4 to 4:3) and flips, as 224 x 224 tensors."""
    width, height = image.size
    out = []
    for _ in range(n):
        for _attempt in range(20):
            area = rng.uniform(0.25, 1.0) * width * height
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w <= width and h <= height:
                break
        else:
            w = h = min(width, height)
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        crop = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255)
    return out


def image_set(photos, per_photo: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return normalize(torch.stack([view for package, name in photos for view in views(photo(package, name),
                                                                                     per_photo, rng)]))


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


class Hellinger(torch.nn.Module):
    """The classifier's class probabilities as ``sqrt(softmax(logits))``: Gaussian projections of this output give
    the softmax's Fisher metric ``J^T (diag p - p p^T) J / 4`` of the logits, so ``output_weighting`` weighs each
    layer by how much it moves the predicted distribution rather than the raw logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=-1).sqrt()


def run(model, schedule, example, calibration, hellinger: bool = False, **kwargs) -> tuple[Compressor, float]:
    """Compresses ``model`` by ``schedule``; with ``hellinger``, under :class:`Hellinger` (the compressed model
    returned is then the classifier inside)."""
    started = time.perf_counter()
    data_aware = any(entry and (entry["decomposition"] == "whitened_svd" or entry.get("rank_selection") == "budget")
                     for entry in schedule.values())  # a budget allocates by the layers' output errors on it
    if hellinger:
        model, schedule = Hellinger(model), {f"model.{name}": entry for name, entry in schedule.items()}
    compressor = Compressor(model, example_input=example, model_compr_kwargs=schedule,
                            ft_every=sum(entry is not None for entry in schedule.values()), progress=False,
                            calibration_data=calibration if data_aware else None, **kwargs)
    while not compressor.done:
        compressor.compression_step()
    return compressor, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.3, 1.5], help="fewer MACs, whole model")
    parser.add_argument("--calib-views", type=int, default=16, help="crops per calibration photograph")
    parser.add_argument("--eval-views", type=int, default=40, help="crops per evaluation photograph")
    parser.add_argument("--decompositions", nargs="+", default=["svd", "whitened_svd"])
    parser.add_argument("--selections", nargs="+", default=["uniform", "budget", "vbmf"],
                        help="uniform rates, the whole-model budget, the budget with a sensitivity pass "
                             "(budget+sens: its loss is the mean squared difference of the logits from the "
                             "uncompressed model's on the first 32 calibration crops), the generated vbmf schedule, "
                             "groups (the uniform rate on the expansions alone, the projections alone, the head "
                             "alone, then on each 1x1 convolution alone: where the damage comes from)")
    parser.add_argument("--min-rank-fraction", type=float, default=None,
                        help="the budget's rank floor (default: the budget's own default)")
    parser.add_argument("--output-weighting", type=int, default=0, metavar="PROJECTIONS",
                        help="whitened_svd weighs each layer's fit by how much it moves the logits, estimated from "
                             "this many random projections per calibration batch (algo_kwargs.whitened_svd."
                             "output_weighting and output_projections; default 0: off)")
    parser.add_argument("--hellinger", action="store_true",
                        help="with --output-weighting: compress under sqrt(softmax(logits)), so the weighting is the "
                             "softmax's Fisher metric instead of a squared error on the logits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(setup(args.threads))
    model = pretrained()
    calibration_images = image_set(CALIBRATION_PHOTOS, args.calib_views, args.seed)
    held_out = image_set(EVALUATION_PHOTOS, args.eval_views, args.seed + 1)
    calibration = list(calibration_images.split(16))
    reference = top1(model, held_out)
    probe = calibration_images[:32]  # calibration crops, never the held-out ones
    with torch.no_grad():
        probe_logits = model.eval()(probe)

    def evaluate(candidate: torch.nn.Module) -> float:
        """The sensitivity pass's loss: how far the logits on calibration crops moved."""
        classifier = candidate.model if isinstance(candidate, Hellinger) else candidate
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(classifier.eval()(probe), probe_logits))
    print(f"images: {len(calibration_images)} calibration crops of {len(CALIBRATION_PHOTOS)} photographs, "
          f"{len(held_out)} held-out crops of {len(EVALUATION_PHOTOS)} others; the uncompressed model predicts "
          f"{len(set(reference.tolist()))} distinct classes on them")

    example = torch.zeros(1, 3, SIZE, SIZE)
    registry = default_registry()
    stats = ModelStats.from_model(model, registry, example)
    budget = generate_model_compr_kwargs(stats, "budget", registry=registry)
    names = [name for name, entry in budget.items() if entry is not None]
    total = stats.total_macs
    pointwise = sum(stats.layers[name].macs for name in names)
    print(f"{len(names)} layers compressible (1x1 convolutions) with {pointwise / total:.1%} of the "
          f"{total / 1e6:.0f} M MACs; left out: "
          f"{', '.join(n for n, e in budget.items() if e is None and stats.layers[n].spec.groups == 1)} "
          f"and the {sum(s.spec.groups > 1 for s in stats.layers.values())} depthwise convolutions\n")

    rows = ["| target | decomposition | ranks | MACs reduction | params reduction | top-1 agreement | classes predicted "
            "| time (s) |", "|---:|---|---|---:|---:|---:|---:|---:|"]

    def record(target: str, decomposition: str, selection: str, compressor: Compressor, seconds: float) -> None:
        report = compressor.report()
        compressed = compressor.compressed_model
        compressed = compressed.model if isinstance(compressed, Hellinger) else compressed
        predicted = top1(compressed, held_out)
        agreement = float((predicted == reference).float().mean())
        rows.append(f"| {target} | {decomposition} | {selection} | {report.macs_ratio:.3f} | "
                    f"{report.params_ratio:.3f} | {agreement:.1%} | {len(set(predicted.tolist()))} | {seconds:.0f} |")
        print(rows[-1], flush=True)

    budget_params = {} if args.min_rank_fraction is None else {"min_rank_fraction": args.min_rank_fraction}
    weighting = ({"whitened_svd": {"output_weighting": True, "output_projections": args.output_weighting}}
                 if args.output_weighting else {})
    for target in args.targets:
        rate = pointwise / (total / target - (total - pointwise))  # every scheduled layer's MACs shrink by it
        for decomposition in args.decompositions:
            label = decomposition + (" + output weighting" if weighting and decomposition == "whitened_svd" else "")
            label += " (Hellinger)" if weighting and args.hellinger else ""
            hellinger = {"hellinger": bool(weighting and args.hellinger)}

            def at_rate(members: list[str]) -> tuple[Compressor, float]:
                """``members`` compressed at the uniform rate, the other 1x1 convolutions left as they are."""
                schedule = {name: {"decomposition": decomposition, "rank_selection": "param_reduction",
                                   "param_reduction_rate": rate} if name in members else None for name in names}
                return run(model, schedule, example, calibration, all_algo_kwargs=weighting or None, **hellinger)

            if "uniform" in args.selections:
                record(f"{target}x", label, f"uniform (rate {rate:.3f})", *at_rate(names))
            if "groups" in args.selections:
                kinds = {"expansions": [name for name in names if name.endswith("_expand_conv")],
                         "projections": [name for name in names if name.endswith("_project_conv")],
                         "head": [name for name in names if name == "_conv_head"]}
                singles = [(name, [name]) for name in names if [name] not in kinds.values()]
                for group, members in [*kinds.items(), *singles]:
                    record(f"{target}x", label, f"{group} alone (rate {rate:.3f})", *at_rate(members))
            whole = {name: {"decomposition": decomposition, "rank_selection": "budget"} for name in names}
            settings = {"budget": {"reduction": target, "metric": "flops", **budget_params}, **weighting}
            if "budget" in args.selections:
                record(f"{target}x", label, "budget (calibration)",
                       *run(model, whole, example, calibration, all_algo_kwargs=settings, **hellinger))
            if "budget+sens" in args.selections:
                record(f"{target}x", label, "budget (calibration) + sensitivity pass",
                       *run(model, whole, example, calibration, all_algo_kwargs=settings, evaluate=evaluate,
                            **hellinger))
    if "vbmf" in args.selections:
        vbmf = generate_model_compr_kwargs(stats, "vbmf", registry=registry)
        for decomposition in args.decompositions:
            schedule = {name: entry and {**entry, "decomposition": decomposition} for name, entry in vbmf.items()}
            record("-", decomposition, "generated vbmf schedule", *run(model, schedule, example, calibration))
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
