"""Does multi-stage compression pay? One-shot compression + N fine-tuning epochs against the MUSCO schedule
(K stages, fine-tuning after each) + the same N epochs in total, at exactly the same final ranks, over several
seeds, on a small CNN trained on scikit-learn's digits (``--model digits``) or on the pretrained MNIST CNN of
``accuracy_mnist_cnn.py`` (``--model mnist``).

    python benchmarks/multistage_vs_oneshot.py [--seeds 10] [--epochs 12] [--stages 3] [--target 3.0] [--threads 1]
    python benchmarks/multistage_vs_oneshot.py --model mnist --finetune distill --epochs 2 --target 10 --seeds 5

Per seed: with ``digits``, train the CNN from scratch (with ``mnist``, every seed starts from the same pretrained
CNN, and the seed decides the batch order and dropout of the fine-tuning), then from that same trained model
  * one-shot: every compressible layer (tucker2 for a conv, svd for a Linear layer) at its final ranks at once,
    then ``--epochs`` epochs;
  * multi-stage: ``nglobal_compress_iters = --stages``; each stage compresses every layer again (manual ranks
    that fall geometrically from the layer's full size to the same final ranks), and the ``--epochs`` epochs'
    steps are split over the stages (a fine-tuning after each);
  * control (``--finetune labels`` only): the uncompressed model fine-tuned for the same ``--epochs`` epochs.
Fine-tuning is with the labels (``labels``: cross-entropy, Adam) or, without them, by distillation from the
uncompressed model (``distill``: ``musco_core.finetune.distill`` on the same training images in the same order).
The final ranks are chosen once, before any training: the same fraction of each layer's (r_out, r_in), the
largest fraction whose compressed model has at least ``--target`` x fewer MACs than the original, as counted by
``Compressor.report()`` on an example input. Both methods' fine-tuning sees the same batches in the same order.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import time

import torch
from scipy import stats as scipy_stats
from sklearn.datasets import load_digits
from torch import nn

from _setup import flops as count_flops
from musco_core import Compressor, standardize_model
from musco_core.finetune import distill

SPLIT_SEED = 0  # the train/test split is the same for every seed
BATCH = 64
METHODS = ("baseline", "control", "one-shot", "multi-stage")


@dataclasses.dataclass
class Outcome:
    """One method on one seed: test accuracy and loss at the end, test accuracy right after each compression
    step (before its fine-tuning), and the compressed model's size (MACs and parameters as ``report()`` counts
    them, FLOPs of the standardized model's forward pass)."""

    accuracy: float
    loss: float
    right_after: tuple[float, ...] = ()
    macs_ratio: float = 1.0
    params_ratio: float = 1.0
    flops: int | None = None


def load_data():
    """Digits as 1x8x8 images in [0, 1]: a fixed random 80/20 split (1437 train, 360 test images)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    split = int(0.8 * len(labels))
    return (images[order[:split]], labels[order[:split]]), (images[order[split:]], labels[order[split:]])


class Net(nn.Module):
    """Three 3x3 convs (32-64-64 channels) with BatchNorm, and a linear head; 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


@dataclasses.dataclass
class Task:
    """A model to compress and its data: ``compressible`` layers (tucker2 for a conv, svd for a Linear layer);
    ``trained(seed)`` gives the model every method of a seed starts from."""

    data: tuple
    compressible: tuple[str, ...]
    trained: object
    reference: nn.Module


def digits_task(args):
    """The CNN trained from scratch on digits for each seed; the 1-channel stem cannot shrink and the head is
    0.04% of the MACs, so only ``features.3`` and ``features.7`` are compressed."""
    data = load_data()

    def trained(seed):
        torch.manual_seed(seed)
        model = Net()
        train(model, data[0], epoch_batches(len(data[0][1]), args.train_epochs, torch.Generator().manual_seed(seed)),
              args.lr)
        return model

    torch.manual_seed(0)
    return Task(data, ("features.3", "features.7"), trained, Net())


def mnist_task(args):
    """The pretrained MNIST CNN of ``accuracy_mnist_cnn.py`` (the same for every seed); ``conv2``, ``conv3`` and
    ``fc1`` are compressed (the 1-channel ``conv1`` cannot shrink, ``fc2`` is the 10-way classifier)."""
    from accuracy_mnist_cnn import mnist, pretrained

    x_train, y_train, x_test, y_test = mnist(0)
    model = pretrained(x_train, y_train, args.train_epochs, 0)
    return Task(((x_train, y_train), (x_test, y_test)), ("conv2", "conv3", "fc1"), lambda seed: model, model)


def epoch_batches(n, epochs, generator):
    """The index batches of ``epochs`` shuffled epochs over ``n`` examples; ``generator`` decides the order."""
    return [batch for _ in range(epochs) for batch in torch.randperm(n, generator=generator).split(BATCH)]


def train(model, data, batches, lr):
    """Adam over ``batches`` (index tensors) with the cross-entropy on the labels."""
    images, labels = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    model.eval()


def finetune(how, teacher, student, data, batches, lr, seed):
    """``labels``: :func:`train`; ``distill``: distillation from ``teacher`` on the same images, no labels."""
    if how == "labels":
        train(student, data, batches, lr)
    else:
        distill(teacher, student, [data[0][batch] for batch in batches], len(batches), lr, seed=seed,
                progress=False)
        student.eval()


@torch.no_grad()
def evaluate(model, data):
    """(accuracy, mean cross-entropy) on ``data``."""
    images, labels = data
    model.eval()
    logits = model(images)
    return (logits.argmax(1) == labels).float().mean().item(), nn.functional.cross_entropy(logits, labels).item()


def manual_schedule(ranks_per_stage):
    """The original dict form with manual ranks per stage for each layer: tucker2 ``[[r_out, r_in], ...]`` for a
    conv, svd ``[[r], ...]`` for a Linear layer."""
    return {name: {"decomposition": "tucker2" if len(ranks[0]) == 2 else "svd", "rank_selection": "manual",
                   "manual_rank": [list(r) if len(r) == 2 else r[0] for r in ranks]}
            for name, ranks in ranks_per_stage.items()}


def full_ranks(model, compressible):
    """A conv's (out, in) channels; a Linear layer's (min(out, in),)."""
    full = {}
    for name in compressible:
        layer = model.get_submodule(name)
        full[name] = ((layer.out_channels, layer.in_channels) if isinstance(layer, nn.Conv2d)
                      else (min(layer.out_features, layer.in_features),))
    return full


def final_ranks(model, compressible, example, target):
    """The same fraction ``a`` of every layer's full ranks, the largest with MACs reduced >= ``target`` x."""
    full = full_ranks(model, compressible)

    def ranks_at(a):
        return {name: tuple(max(1, round(a * n)) for n in dims) for name, dims in full.items()}

    def ratio(a):
        compressor = Compressor(model, model_compr_kwargs=manual_schedule({n: [r] for n, r in ranks_at(a).items()}),
                                ft_every=len(full), example_input=example, progress=False)
        compressor.compression_step()
        return compressor.report().macs_ratio

    low, high = 0.02, 1.0  # ratio(low) >= target > ratio(high)
    if ratio(low) < target:
        raise SystemExit(f"--target {target}: not reachable by compressing {', '.join(full)}")
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio(middle) >= target else (low, middle)
    return ranks_at(low)


def geometric_stages(full, final, stages):
    """Ranks of stages 1..K falling geometrically from ``full`` to ``final`` (stage K is ``final`` exactly)."""
    per_stage = []
    for k in range(1, stages + 1):
        per_stage.append(tuple(max(f, round(n * (f / n) ** (k / stages))) for n, f in zip(full, final)))
    return per_stage


def split_batches(batches, parts):
    """``batches`` cut into ``parts`` consecutive runs as evenly as possible; the later runs get the remainder."""
    sizes = [len(batches) // parts + (i >= parts - len(batches) % parts) for i in range(parts)]
    return [batches[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(parts)]


def make_compressor(model, plan, method, args, example, seed=0):
    """One-shot: every layer in one step. Multi-stage: ``--stages`` compressions per layer, ``--ft-every``
    layers per step (all by default)."""
    multi = method == "multi-stage"
    return Compressor(model, model_compr_kwargs=manual_schedule(plan[method]),
                      ft_every=(args.ft_every or len(plan[method])) if multi else len(plan[method]),
                      nglobal_compress_iters=args.stages if multi else 1, example_input=example, seed=seed,
                      progress=False)


def run_seed(seed, args, task, plan, example):
    """One seed: the control, one-shot and multi-stage runs from the same trained weights."""
    train_data, test_data = task.data
    model = task.trained(seed)
    out = {"baseline": Outcome(*evaluate(model, test_data))}
    # the same batches for the control and both methods
    batches = epoch_batches(len(train_data[1]), args.epochs, torch.Generator().manual_seed(10_000 + seed))
    if args.finetune == "labels":
        control = copy.deepcopy(model)
        train(control, train_data, batches, args.ft_lr)
        out["control"] = Outcome(*evaluate(control, test_data))

    for method in ("one-shot", "multi-stage"):
        compressor = make_compressor(model, plan, method, args, example, seed)
        before_ft = []
        for part in split_batches(batches, compressor.niters):
            results = compressor.compression_step()
            kept = [r.name for r in results if not r.applied]
            if kept:
                raise SystemExit(f"{method}, seed {seed}: layers {kept} were not compressed at step "
                                 f"{compressor.curr_iter}: {[r.note for r in results if not r.applied]}")
            before_ft.append(evaluate(compressor.compressed_model, test_data)[0])
            finetune(args.finetune, model, compressor.compressed_model, train_data, part, args.ft_lr, seed)
        report = compressor.report()
        compressed = standardize_model(compressor.compressed_model)
        flops = count_flops(compressed, example)
        out[method] = Outcome(*evaluate(compressor.compressed_model, test_data), tuple(before_ft),
                              report.macs_ratio, report.params_ratio, flops)
    if (out["one-shot"].macs_ratio, out["one-shot"].flops) != (out["multi-stage"].macs_ratio, out["multi-stage"].flops):
        raise SystemExit(f"seed {seed}: one-shot and multi-stage ended at different sizes: {out}")
    return out


def mean_std(values, sign=""):
    """'mean ± sample std' of ``values``; ``sign='+'`` shows the mean's sign."""
    return f"{statistics.mean(values):{sign}.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("digits", "mnist"), default="digits",
                        help="digits: a CNN trained on scikit-learn's digits for each seed (default); mnist: the "
                             "pretrained MNIST CNN of accuracy_mnist_cnn.py")
    parser.add_argument("--finetune", choices=("labels", "distill"), default="labels",
                        help="fine-tuning with the labels (default) or by distillation from the uncompressed model")
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (0..N-1); default 10")
    parser.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs in total, per method; default 12")
    parser.add_argument("--stages", type=int, default=3, help="multi-stage: times each layer is compressed (K)")
    parser.add_argument("--target", type=float, default=3.0, help="MACs reduction of the whole model; default 3")
    parser.add_argument("--ft-every", type=int, default=0,
                        help="multi-stage: layers per step (default 0: all layers, one step per stage)")
    parser.add_argument("--train-epochs", type=int, default=None,
                        help="training epochs of the baseline (default: 30 for digits, 8 for mnist)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of the digits CNN's training")
    parser.add_argument("--ft-lr", type=float, default=3e-4,
                        help="Adam (labels) or AdamW (distill) learning rate of every fine-tuning")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these layers are too small for a second thread to help, and "
                             "on a busy 2-core machine it made training 10x slower; results depend on this number)")
    args = parser.parse_args()
    if args.seeds < 2 or args.epochs < 1 or args.stages < 2:
        parser.error("need --seeds >= 2, --epochs >= 1 and --stages >= 2")
    if args.train_epochs is None:
        args.train_epochs = 30 if args.model == "digits" else 8
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    task = (digits_task if args.model == "digits" else mnist_task)(args)
    data, reference = task.data, task.reference
    example = data[0][0][:1]
    final = final_ranks(reference, task.compressible, example, args.target)
    full = full_ranks(reference, task.compressible)
    plan = {"one-shot": {name: [r] for name, r in final.items()},
            "multi-stage": {name: geometric_stages(full[name], r, args.stages) for name, r in final.items()}}
    steps = make_compressor(reference, plan, "multi-stage", args, example).niters
    n_train = len(data[0][1])
    per_stage = [len(part) for part in split_batches(epoch_batches(n_train, args.epochs, torch.Generator()), steps)]
    print(f"torch {torch.__version__}, {args.threads} threads; {args.model}: {n_train} train / "
          f"{len(data[1][1])} test images; {args.seeds} seeds; {args.train_epochs} training epochs; {args.epochs} "
          f"fine-tuning epochs ({args.finetune}) per method, {sum(per_stage)} steps (multi-stage: {per_stage} over "
          f"its {steps} steps)")
    for name in final:
        print(f"  {name}: full ranks {full[name]}, one-shot {plan['one-shot'][name]}, "
              f"multi-stage {plan['multi-stage'][name]}")

    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(seed, args, task, plan, example))
        r = runs[-1]
        control = f"control {r['control'].accuracy:.4f}, " if "control" in r else ""
        print(f"seed {seed}: baseline {r['baseline'].accuracy:.4f}, {control}"
              + ", ".join(f"{m} {' -> '.join(f'{a:.4f}' for a in (*r[m].right_after, r[m].accuracy))}"
                          for m in METHODS[2:])
              + f" ({time.perf_counter() - started:.0f} s)", flush=True)

    base_flops = count_flops(reference, example)
    print("\n| method | MACs reduction | FLOPs reduction | params reduction | acc. right after compression "
          "| acc. after fine-tuning (mean ± std) | min | max | test loss (mean ± std) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"baseline": "uncompressed", "control": f"uncompressed + {args.epochs} fine-tuning epochs",
              "one-shot": "one-shot", "multi-stage": f"multi-stage, {args.stages} stages"}
    for method in (m for m in METHODS if m in runs[0]):
        outcomes = [r[method] for r in runs]
        first, acc = outcomes[0], [o.accuracy for o in outcomes]
        right_after = " / ".join(f"{statistics.mean(step):.4f}" for step in zip(*(o.right_after for o in outcomes)))
        flops_ratio = base_flops / first.flops if first.flops else 1.0
        print(f"| {labels[method]} | {first.macs_ratio:.2f} | {flops_ratio:.2f} | {first.params_ratio:.2f} | "
              f"{right_after or '-'} | {mean_std(acc)} | {min(acc):.4f} | {max(acc):.4f} | "
              f"{mean_std([o.loss for o in outcomes])} |")

    multi, one = ([r[m] for r in runs] for m in ("multi-stage", "one-shot"))
    diff = [m.accuracy - o.accuracy for m, o in zip(multi, one)]
    loss_diff = [m.loss - o.loss for m, o in zip(multi, one)]
    wins, ties = sum(d > 0 for d in diff), sum(d == 0 for d in diff)
    p_acc = scipy_stats.ttest_rel([m.accuracy for m in multi], [o.accuracy for o in one]).pvalue
    p_loss = scipy_stats.ttest_rel([m.loss for m in multi], [o.loss for o in one]).pvalue
    print(f"\nmulti-stage minus one-shot, paired by seed: accuracy {mean_std(diff, '+')} "
          f"(multi-stage better on {wins}, tied on {ties}, worse on {len(diff) - wins - ties} of {len(diff)} seeds; "
          f"paired t-test p = {p_acc:.3g}); test loss {mean_std(loss_diff, '+')} (p = {p_loss:.3g})")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
