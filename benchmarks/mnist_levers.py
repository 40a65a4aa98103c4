"""Which levers bring the pretrained MNIST CNN at 10x fewer MACs within 0.5 points of its accuracy (issue 14)?

Each lever is a configuration of musco-core's own options, applied to the CNN of ``accuracy_mnist_cnn.py`` with
the whole-model ``budget`` at ``--target`` x fewer MACs and ``--ft-epochs`` epochs of fine-tuning in total:

* decomposition: ``tucker2`` (the generated schedule: tucker2 convs, svd fc1), ``whitened`` (fc1 by
  ``whitened_svd`` on calibration images, sequential calibration), ``mixed`` (every layer may also take
  ``whitened_svd``: the budget chooses);
* ``sensitivity``: the budget's sensitivity pass with the cross-entropy on a few training batches;
* ``stages``: the MUSCO multi-stage schedule (``nglobal_compress_iters``), fine-tuning split over the stages;
* fine-tuning: ``labels`` (cross-entropy, Adam), ``distill`` (``musco_core.finetune.distill``: relative MSE of
  the logits), ``kd`` (softened KL at ``T = 4``), ``kd+labels`` (softened KL plus cross-entropy on the labels);
* ``cosine``: the learning rate decays to 0 along a cosine over each fine-tuning;
* ``bn``: BatchNorm statistics re-estimated on the training images after each compression step.

Levers combine with ``+``: ``kd+cosine+bn``.

``--select`` chooses on a validation split: the CNN is trained on 3,500 of the 4,000 training images and every
lever is measured on the other 500 (never on the test images). Without it, the CNN of ``accuracy_mnist_cnn.py``
(all 4,000) is measured on the 1,000 test images, over ``--seeds`` fine-tuning seeds.

    python benchmarks/mnist_levers.py --select [--levers NAME ...]
    python benchmarks/mnist_levers.py --levers NAME ... --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from _setup import setup
from accuracy_mnist_cnn import BATCH, accuracy, epochs_of_batches, mnist, pretrained
from musco_core import Compressor
from musco_core.finetune import distill, reestimate_batchnorm

LAYERS = ("conv2", "conv3", "fc1")

#: The levers a configuration combines, joined by "+" (``baseline`` is none of them: tucker2 and svd, one stage,
#: Adam on the labels at a constant learning rate).
LEVERS = ("whitened", "mixed", "sensitivity", "stages2", "stages3", "distill", "kd", "labels", "cosine", "bn")
DEFAULT = ("baseline", "distill", "kd", "kd+labels", "cosine", "bn", "whitened", "mixed", "sensitivity", "stages2",
           "stages3")


def parse(configuration: str) -> tuple[str, bool, int, str, bool, bool]:
    """(decomposition, sensitivity, stages, fine-tuning, cosine, bn) of a configuration such as ``kd+cosine``."""
    levers = set() if configuration == "baseline" else set(configuration.split("+"))
    if levers - set(LEVERS):
        raise SystemExit(f"unknown lever(s) {sorted(levers - set(LEVERS))} in {configuration!r}; known: {LEVERS}")
    kind = "whitened" if "whitened" in levers else "mixed" if "mixed" in levers else "tucker2"
    stages = 3 if "stages3" in levers else 2 if "stages2" in levers else 1
    how = ("kd+labels" if {"kd", "labels"} <= levers else "kd" if "kd" in levers else
           "distill" if "distill" in levers else "labels")
    return kind, "sensitivity" in levers, stages, how, "cosine" in levers, "bn" in levers


def schedule(kind: str) -> dict:
    conv = {"tucker2": "tucker2", "whitened": "tucker2", "mixed": ["tucker2", "whitened_svd"]}[kind]
    fc = {"tucker2": "svd", "whitened": "whitened_svd", "mixed": ["svd", "whitened_svd"]}[kind]
    return {name: {"decomposition": fc if name.startswith("fc") else conv, "rank_selection": "budget"}
            for name in LAYERS}


def finetune(teacher, student, x, y, steps, lr, how, cosine, seed):
    """``steps`` steps on shuffled training batches (the same order for every lever given the seed): Adam on the
    labels' cross-entropy, or ``musco_core.finetune.distill`` from ``teacher``."""
    batches = list(epochs_of_batches(x, y, math.ceil(steps * BATCH / len(x)), seed))[:steps]
    if how != "labels":
        labelled = how == "kd+labels"
        distill(teacher, student, batches if labelled else [inputs for inputs, _ in batches], steps, lr,
                temperature=4.0 if how.startswith("kd") else None, label_weight=1.0 if labelled else None,
                lr_schedule="cosine" if cosine else "constant", seed=seed, progress=False)
        return
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) if cosine else (lambda s: 1.0))
    student.train()
    for inputs, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(student(inputs), labels).backward()
        optimizer.step()
        scheduler.step()
    student.eval()


def run(model, lever, x, y, x_eval, y_eval, target, ft_epochs, lr, seed):
    kind, sensitivity, stages, how, cosine, bn = parse(lever)
    calibration = list(x[:1024].split(BATCH))
    few = [(x[i:i + 256], y[i:i + 256]) for i in range(0, 1024, 256)]

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return sum(float(nn.functional.cross_entropy(m(a), b)) for a, b in few) / len(few)

    compressor = Compressor(model, None, schedule(kind), ft_every=len(LAYERS),
                            nglobal_compress_iters=stages, example_input=x[:1], seed=seed, progress=False,
                            all_algo_kwargs={"budget": {"reduction": target, "metric": "flops"}},
                            calibration_data=calibration if kind != "tucker2" else None,
                            evaluate=evaluate if sensitivity else None)
    total = ft_epochs * math.ceil(len(x) / BATCH)
    per_stage = [total // stages + (i >= stages - total % stages) for i in range(stages)]
    after = []
    for steps in per_stage:
        compressor.compression_step()
        student = compressor.compressed_model
        if bn:
            reestimate_batchnorm(student, list(x.split(500)), progress=False)
        after.append(accuracy(student, x_eval, y_eval))
        finetune(model, student, x, y, steps, lr, how, cosine, seed)
    report = compressor.report()
    ranks = "; ".join(f"{r.name}: {r.decomposition} {'x'.join(map(str, r.ranks))}"
                      for r in compressor.history[-len(LAYERS):])
    return report.macs_ratio, ranks, after, accuracy(compressor.compressed_model, x_eval, y_eval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--select", action="store_true", help="train on 3,500 images, measure on the other 500")
    parser.add_argument("--levers", nargs="+", default=list(DEFAULT),
                        help=f"configurations: baseline, or levers joined by '+' from {', '.join(LEVERS)}")
    parser.add_argument("--target", type=float, default=10.0)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    print(setup(args.threads))
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = mnist(0)
    if args.select:
        x_train, y_train, x_test, y_test = x_train[:3500], y_train[:3500], x_train[3500:], y_train[3500:]
    model = pretrained(x_train, y_train, 8, 0)
    base = accuracy(model, x_test, y_test)
    where = "validation" if args.select else "test"
    print(f"uncompressed: {base:.2%} on {len(x_test)} {where} images ({time.perf_counter() - started:.0f} s)")
    print("| lever | MACs reduction | ranks | acc. after compression | after fine-tuning (per seed) | mean | "
          "vs uncompressed |\n|---|---:|---|---:|---|---:|---:|")
    for lever in args.levers:
        results = [run(model, lever, x_train, y_train, x_test, y_test, args.target, args.ft_epochs, args.ft_lr,
                       seed) for seed in args.seeds]
        macs, ranks, after, _ = results[0]
        finals = [r[3] for r in results]
        mean = statistics.mean(finals)
        print(f"| {lever} | {macs:.2f} | {ranks} | {' / '.join(f'{a:.2%}' for a in after)} | "
              f"{', '.join(f'{a:.2%}' for a in finals)} | {mean:.2%} | {100 * (mean - base):+.2f} |"
              f" ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
