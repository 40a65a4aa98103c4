"""One rank of a 2-process gloo job for test_distributed (the environment carries RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT, as torchrun sets them). Also imported by the test for the single-process reference run.

    python distributed_worker.py run OUT [--steps N]   # a new run: N steps (all without --steps), states in OUT/ckpt
    python distributed_worker.py resume OUT            # continues the run in OUT/ckpt to the end
    python distributed_worker.py fail OUT              # after a step, rank 1 fails in calibration, decomposing, and
                                                       # with a model that differs from rank 0's
    python distributed_worker.py latency OUT           # a latency budget whose layer timings differ between ranks
    python distributed_worker.py moments OUT           # output moments (output weighting) of each rank's shard,
                                                       # summed over the ranks: OUT/moments-R.safetensors
    python distributed_worker.py disagree OUT          # rank 1 differs from rank 0 in one thing (DISAGREEMENTS)
                                                       # when a step starts: the errors in OUT/rank-R.json
    python distributed_worker.py killed OUT            # rank 1 dies while decomposing: rank 0's error in
                                                       # OUT/rank-0.json
    python distributed_worker.py empty OUT             # runs with one calibration batch, one rank's shard empty
                                                       # (EMPTY_SHARD_CASES): OUT/empty-CASE-R.safetensors, or
                                                       # the error (no rank's shard holds it) in OUT/rank-R.json

The run is resume_worker's schedule (tucker2/vbmf, cp3, cp4, svd, whitened_svd on calibration data, a whole-model
budget over two passes) with a sensitivity pass, each rank feeding its own shard of the calibration and evaluation
batches. Each rank writes OUT/rank-R.json: the fingerprint of its model after every step, its ranks, its history, and
the error of a failing step; and OUT/rank-R.safetensors, its final weights.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import attrs
import resume_worker as base
import torch
from safetensors.torch import save_file
from torch import nn

from musco_core import Compressor, MuscoError, default_registry, distributed
from musco_core.calibration import collect_output_moments
from musco_core.engine import read_layer
from musco_core.latency import CACHE_ENV

from clocks import GeometryClock

SCHEDULE = base.SCHEDULE
EVAL_BATCHES = 2  # one per rank: the mean of the ranks' losses is the loss over all the data


def shard(batches: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of the batches: every ``world_size``-th one."""
    return batches[rank::world_size]


def evaluation(rank: int = 0, world_size: int = 1):
    """A loss on this rank's share of a few fixed batches (cross-entropy against seeded labels)."""
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 10, (2,), generator=generator))
               for _ in range(EVAL_BATCHES)]
    mine = shard(batches, rank, world_size)

    def evaluate(net: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(nn.functional.cross_entropy(net(x), y)) for x, y in mine) / len(mine)
    return evaluate


def start(rank: int = 0, world_size: int = 1) -> Compressor:
    return Compressor(base.model(), model_compr_kwargs=SCHEDULE, example_input=base.EXAMPLE, progress=False,
                      calibration_data=shard(base.calibration(), rank, world_size),
                      evaluate=evaluation(rank, world_size))


def resume(state_dir: Path, rank: int = 0, world_size: int = 1) -> Compressor:
    return Compressor.resume(base.model(), state_dir, example_input=base.EXAMPLE, progress=False,
                             calibration_data=shard(base.calibration(), rank, world_size),
                             evaluate=evaluation(rank, world_size))


def fine_tune(net: nn.Module, step: int) -> None:
    """resume_worker's SGD step, through DistributedDataParallel in a job (:func:`distributed.rewrap`), every rank on
    the same batch: the averaged gradient is each rank's own, so the result is the single-process one."""
    wrapped, optimizer = distributed.rewrap(net, lambda parameters: torch.optim.SGD(parameters, lr=0.01))
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    wrapped.train()
    nn.functional.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    net.eval()


def step(compressor: Compressor, state_dir: Path) -> None:
    """One step, then the same fine-tuning on every rank (replicas stay equal), then the state."""
    compressor.compression_step()
    fine_tune(compressor.compressed_model, compressor.curr_iter)
    compressor.save_state(state_dir)


LATENCY_SCHEDULE = {
    "version": 1, "settings": {"ft_every": 8, "algo_kwargs": {"budget": {"reduction": 1.3, "metric": "latency"}}},
    "layers": {name: {"decomposition": "tucker2", "rank_selection": "budget"} for name in (
        "layer1.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2", "layer4.0.conv1", "layer4.0.conv2")}}


def rank_clock(rank: int) -> GeometryClock:
    """A deterministic clock that differs between ranks: a per-call overhead of 1e-6 s on rank 0 and 1e-3 s on
    other ranks (where a chain of factors looks slower than the dense layer, so the rank alone would keep every
    layer)."""
    return GeometryClock(overhead=1e-6 if rank == 0 else 1e-3)


MOMENT_LAYERS = ["layer2.0.downsample.0", "fc"]


def output_moments(rank: int = 0, world_size: int = 1, group: distributed.Group | None = None
                   ) -> dict[str, torch.Tensor]:
    """The output moments of two layers on this rank's shard of the calibration batches (2 projections each),
    drawn from the rank's seed (in one process, the seed the rank draws from in the job)."""
    net = base.model().eval()
    specs = {name: read_layer(net.get_submodule(name), default_registry(), name)[1].spec for name in MOMENT_LAYERS}
    return collect_output_moments(net, specs, shard(base.calibration(), rank, world_size), projections=2,
                                  seed=5 if group is not None else distributed.rank_seed(5, rank),
                                  progress=False, group=group)


def latency_run(rank: int) -> Compressor:
    """The latency budget's run on this rank's clock (its own timing cache)."""
    compressor = Compressor(base.model(), model_compr_kwargs=LATENCY_SCHEDULE, example_input=base.EXAMPLE,
                            progress=False)
    compressor.context = attrs.evolve(compressor.context, latency_timer=rank_clock(rank))
    while not compressor.done:
        compressor.compression_step()
    return compressor


#: Runs whose one calibration batch (and evaluation batch) only one rank holds: (its calibration mode, with an
#: example input, the holder (None: no rank holds it), the rank selection: manual ranks, or a budget with data-aware
#: damage, a sensitivity pass and output weighting).
EMPTY_SHARD_CASES = {"rank1_empty_no_example": ("independent", False, 0, "manual"),
                     "rank0_empty_sequential": ("sequential", True, 1, "manual"),
                     "rank0_empty_budget": ("independent", False, 1, "budget"),
                     "rank1_empty_budget_sequential": ("sequential", False, 0, "budget"),
                     "all_empty_budget": ("independent", False, None, "budget")}


def empty_shard_run(case: str, rank: int = 0, world_size: int = 1) -> Compressor:
    """Every step of a whitened_svd run of a small MLP whose one calibration batch is rank ``holder``'s alone (all
    of it in one process): the other rank's shard is empty, and so is its evaluation data (its ``evaluate`` returns
    None). In one process the run is seeded as the holder draws output weighting's projections in the job."""
    mode, with_example, holder, selection = EMPTY_SHARD_CASES[case]
    holds = holder is not None and (world_size == 1 or rank == holder)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    generator = torch.Generator().manual_seed(1)
    batch, x, y = torch.randn(32, 16, generator=generator), torch.randn(8, 16, generator=generator), \
        torch.randint(0, 4, (8,), generator=generator)
    layer = ({"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [4]} if selection == "manual"
             else {"decomposition": ["whitened_svd", "svd"], "rank_selection": "budget"})
    schedule = {"version": 1, "layers": dict.fromkeys(("0", "2", "4"), layer), "settings": {
        "ft_every": 2, "calibration": mode, "seed": distributed.rank_seed(0, holder or 0) if world_size == 1 else 0,
        "algo_kwargs": {"budget": {"reduction": 2.0, "metric": "params"}, "whitened_svd": {"output_weighting": True}}}}

    def evaluate(model: nn.Module) -> float | None:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x), y)) if holds else None

    compressor = Compressor(net, model_compr_kwargs=schedule, progress=False,
                            calibration_data=[batch] if holds else [],
                            example_input=torch.randn(1, 16) if with_example else None,
                            evaluate=evaluate if selection == "budget" else None)
    while not compressor.done:
        compressor.compression_step()
    return compressor


#: What rank 1 passes other than rank 0, case by case: each must be refused on every rank when the step starts.
DISAGREEMENTS = {"schedule or run state": "a manual rank of 3, not 4", "example input": "another shape",
                 "plugins": "without musco_plugins.cp", "calibration data or evaluate (given or not)": "no evaluate",
                 "arguments": "a schedule that only rank 1 refuses"}


def disagreeing_step(case: str, rank: int) -> None:
    """The first step of an svd run of a small MLP, rank 1 passing something other than rank 0 (``case``); with
    ``case`` "arguments", a schedule that only rank 1 refuses (rank 8 where svd can use 4 at most)."""
    other = rank == 1
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ranks = [8 if other and case == "arguments" else 3 if other and case == "schedule or run state" else 4]
    schedule = {"version": 1, "settings": {"ft_every": 2},
                "layers": dict.fromkeys(("0", "2"), {"decomposition": "svd", "rank_selection": "manual",
                                                     "manual_rank": ranks})}
    example = torch.ones(2 if other and case == "example input" else 1, 16)
    if other and case == "plugins":
        os.environ["MUSCO_DISABLE_PLUGINS"] = "musco_plugins.cp"
    try:
        evaluate = None if other and case.startswith("calibration") else (lambda model: 0.0)
        Compressor(net, model_compr_kwargs=schedule, example_input=example, progress=False, evaluate=evaluate,
                   registry=default_registry()).compression_step()
    finally:
        os.environ.pop("MUSCO_DISABLE_PLUGINS", None)


def weights(compressor: Compressor) -> dict[str, torch.Tensor]:
    """The model's weights now (the keys standardize_model leaves, without changing the model)."""
    return {key: value.detach().clone().contiguous() for key, value in compressor.compressed_model.state_dict().items()}


def history(compressor: Compressor) -> list:
    return [{**attrs.asdict(result), "seconds": 0.0} for result in compressor.history]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["run", "resume", "resume_other", "fail", "latency", "moments", "empty",
                                             "disagree", "killed"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with distributed.process_group_from_env(timeout=datetime.timedelta(seconds=30)) as group:
        sys.exit(run(args, group))


def run(args: argparse.Namespace, group: distributed.Group) -> int:
    rank, world_size = group.rank, group.world_size
    record: dict = {"fingerprints": []}
    state_dir = args.out / "ckpt"
    if args.scenario == "moments":
        save_file(output_moments(rank, world_size, group), str(args.out / f"moments-{rank}.safetensors"))
        return 0
    if args.scenario == "killed":
        if rank == 1:
            import musco_core.run
            musco_core.run.compress_layer = lambda *args, **kwargs: os._exit(9)
        try:
            disagreeing_step("none", rank)  # one layer for each rank
        except MuscoError as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        (args.out / f"rank-{rank}.json").write_text(json.dumps(record), encoding="utf-8")
        return 0
    if args.scenario == "disagree":
        for case in DISAGREEMENTS:
            try:
                disagreeing_step(case, rank)
            except MuscoError as exc:
                record.setdefault("errors", {})[case] = f"{type(exc).__name__}: {exc}"
        (args.out / f"rank-{rank}.json").write_text(json.dumps(record), encoding="utf-8")
        return 0
    if args.scenario == "empty":
        for case in EMPTY_SHARD_CASES:
            try:
                save_file(weights(empty_shard_run(case, rank, world_size)),
                          str(args.out / f"empty-{case}-{rank}.safetensors"))
            except MuscoError as exc:
                record.setdefault("errors", {})[case] = f"{type(exc).__name__}: {exc}"
        (args.out / f"rank-{rank}.json").write_text(json.dumps(record), encoding="utf-8")
        return 0
    if args.scenario == "latency":
        os.environ[CACHE_ENV] = str(args.out / f"latency-cache-{rank}.json")
        compressor = latency_run(rank)
        record.update(ranks=compressor.ranks, budgets=[attrs.asdict(b) for b in compressor.budgets])
        (args.out / f"rank-{rank}.json").write_text(json.dumps(record), encoding="utf-8")
        return 0
    if args.scenario == "resume_other":  # rank 1 resumes with other weights than the run began with
        model = base.model()
        if rank == 1:
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        try:
            Compressor.resume(model, state_dir, example_input=base.EXAMPLE, progress=False,
                              calibration_data=shard(base.calibration(), rank, world_size),
                              evaluate=evaluation(rank, world_size))  # as the run began: only the weights differ
        except MuscoError as exc:
            (args.out / f"rank-{rank}.json").write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}),
                                                        encoding="utf-8")
            return 3
        return 0
    if args.scenario == "resume":
        compressor = resume(state_dir, rank, world_size)
    else:
        compressor = start(rank, world_size)
    record["fingerprints"].append(distributed.fingerprint(compressor.compressed_model))
    exit_code = 0
    if args.scenario == "fail":  # the first step's layers need no calibration: the failures come in the second
        step(compressor, state_dir)
        record["errors"] = []
        before = distributed.fingerprint(compressor.compressed_model)
        if rank == 1:  # a batch only rank 1 has, which the model cannot run
            compressor.context.calibration_data.append(torch.zeros(1, 5, 32, 32))
        try:
            compressor.compression_step()
        except MuscoError as exc:
            record["errors"].append(f"{type(exc).__name__}: {exc}")
        if rank == 1:
            compressor.context.calibration_data.pop()
            import musco_core.run

            def broken(module, name, *args, **kwargs):
                raise RuntimeError(f"decomposer crashed on {name}")
            musco_core.run.compress_layer = broken
        try:
            compressor.compression_step()
        except MuscoError as exc:
            record["errors"].append(f"{type(exc).__name__}: {exc}")
        bias = compressor.compressed_model.fc.bias
        kept = bias.detach().clone()
        if rank == 1:  # replicas that drifted apart (fine-tuning without DDP, say)
            with torch.no_grad():
                bias.add_(1e-6)
        try:
            compressor.compression_step()
        except MuscoError as exc:
            record["errors"].append(f"{type(exc).__name__}: {exc}")
            exit_code = 3
        with torch.no_grad():
            bias.copy_(kept)
        record["untouched"] = distributed.fingerprint(compressor.compressed_model) == before
        record["next_step"] = compressor.curr_iter
    else:
        while not compressor.done and (args.steps is None or compressor.curr_iter < args.steps):
            step(compressor, state_dir)
            record["fingerprints"].append(distributed.fingerprint(compressor.compressed_model))
        save_file(weights(compressor), str(args.out / f"rank-{rank}.safetensors"))
        record.update(ranks=compressor.ranks, history=history(compressor), run_id=compressor.state.run_id,
                      step=compressor.curr_iter)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    return exit_code


if __name__ == "__main__":
    main()
