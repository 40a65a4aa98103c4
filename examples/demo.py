"""Demo: train a small CNN on scikit-learn's handwritten digits, compress it in stages with fine-tuning in
between (the MUSCO loop), and print what compression did: per-layer ranks and counts, accuracy before and
after, parameter and MAC ratios, and measured CPU latency of the compressed model as ``standardize_model`` leaves
it and as ``optimize_for_inference`` makes it. Runs in about a minute on 2 cores."""
from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (set before torch loads OpenMP): on cores shared with other
# processes, spinning threads made 2-thread runs 5x slower (ResNet-50, batch 1: 1277 ms against 240 ms).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from sklearn.datasets import load_digits
from torch import nn

from musco_core import Compressor, ModelStats, default_registry, optimize_for_inference, standardize_model
from musco_core.timing import time_modules

SEED = 0
HERE = Path(__file__).parent


def load_data():
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    split = int(0.8 * len(labels))
    return (images[order[:split]], labels[order[:split]]), (images[order[split:]], labels[order[split:]])


class Net(nn.Module):
    """A small VGG-style CNN for 8x8 digits; ``features.N`` and ``classifier.N`` name its layers."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 32), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      *block(64, 128), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def train(model, data, epochs, lr=2e-3):
    images, labels = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model, data):
    images, labels = data
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def main():
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    train_data, test_data = load_data()
    model = Net()
    started = time.perf_counter()
    train(model, train_data, epochs=30)
    print(f"trained a {sum(p.numel() for p in model.parameters()):,}-parameter CNN on digits "
          f"in {time.perf_counter() - started:.1f} s: test accuracy {accuracy(model, test_data):.4f}")

    example = train_data[0][:1]
    compressor = Compressor.from_yaml(model, HERE / "demo_schedule.yaml", example_input=example)
    print(f"\nschedule {HERE / 'demo_schedule.yaml'}: {compressor.niters} steps of {compressor.ft_every} layers, "
          f"each layer compressed {compressor.nglobal_compress_iters} times, 2 fine-tuning epochs between steps\n")
    header = (f"{'step':>4} {'layer':<13} {'decomposition':<13} {'ranks':<10} {'weights':>17} {'MACs':>21} "
              f"{'rel.err':>8}")
    print(header)
    print("-" * len(header))
    step = 0
    while not compressor.done:
        step += 1
        for r in compressor.compression_step():
            ranks = ",".join(map(str, r.ranks)) if r.applied else "kept"
            error = f"{r.relative_error:.3f}" if r.relative_error is not None else "-"
            print(f"{step:>4} {r.name:<13} {r.decomposition:<13} {ranks:<10} "
                  f"{r.params_before:>8,}->{r.params_after:<8,} {r.macs_before:>10,}->{r.macs_after:<10,} {error:>8}")
        print(f"{'':>4} accuracy after step {step}: {accuracy(compressor.compressed_model, test_data):.4f}", end="")
        train(compressor.compressed_model, train_data, epochs=2, lr=3e-4)
        print(f", after fine-tuning: {accuracy(compressor.compressed_model, test_data):.4f}")

    compressed = standardize_model(copy.deepcopy(compressor.compressed_model)).eval()
    registry = default_registry()
    before = ModelStats.from_model(model, registry, example)
    after = ModelStats.from_model(compressed, registry, example)
    params_before, params_after = (sum(p.numel() for p in m.parameters()) for m in (model, compressed))
    print(f"\naccuracy      {accuracy(model, test_data):.4f} -> {accuracy(compressed, test_data):.4f}")
    print(f"parameters    {params_before:,} -> {params_after:,} ({params_before / params_after:.2f}x smaller)")
    print(f"MACs per image {before.total_macs:,} -> {after.total_macs:,} "
          f"({before.total_macs / after.total_macs:.2f}x fewer, convolutions and Linear layers)")
    print("\nlatency (median ms, the three timed in alternation, 2 threads); optimize_for_inference folds BatchNorm,\n"
          "merges factor chains that are not faster than their dense layer and picks the memory format, measured at\n"
          "the batch size shown:")
    if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE":
        print("  (idle OpenMP threads sleep, as suits shared cores: every operation then pays a thread wake-up, which\n"
              "  costs a model this small most; OMP_WAIT_POLICY=ACTIVE make demo shows it on cores of your own)")
    for batch in (1, 64):
        x = test_data[0][:batch]
        optimized = optimize_for_inference(compressor.compressed_model, x, progress=False)
        t0, t1, t2 = time_modules([model, compressed, optimized], x, min_rounds=30, min_seconds=1.0)
        print(f"  batch {batch:>2}: original {1e3 * t0:.3f}, standardize_model {1e3 * t1:.3f} ({t0 / t1:.2f}x), "
              f"optimize_for_inference {1e3 * t2:.3f} ({t0 / t2:.2f}x)")
    print(f"  accuracy of the optimized model: {accuracy(optimized, test_data):.4f}")


if __name__ == "__main__":
    main()
