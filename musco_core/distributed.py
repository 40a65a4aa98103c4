"""Multi-stage compression inside a ``torch.distributed`` job: the one module that talks to ``torch.distributed``.

When a process group of more than one process is initialized (``torchrun``, or ``init_process_group`` by hand),
every rank holds a replica of the model and calls the same steps (:class:`~musco_core.Compressor`,
:func:`~musco_core.run.run_step`) with its own shard of the calibration data:

- calibration statistics (sums of ``x x^T`` and ``x_ref x^T``, row and batch counts) and the losses of sensitivity
  passes are all-reduced, so every rank sees the statistics of all the data;
- the layers of a step are split across ranks by estimated cost (:func:`assign`); each layer's owner decomposes
  it and broadcasts the result and factors, so every rank swaps in bitwise the same modules. Broadcasting, not
  recomputing on every rank, because decompositions (SVD, ALS) are not bitwise reproducible across processes and
  devices, and it divides the decomposition time by the number of ranks;
- a whole-model allocation is computed on every rank and rank 0's is broadcast, for the same reason;
- each local piece of work runs under :func:`agreement`: the ranks all-reduce whether it succeeded before any
  collective that depends on it, so a rank that fails makes every rank raise the same error (naming the failing
  rank) instead of leaving the others blocked in a collective; the step swaps in its layers only after that;
- run states and output sets are written by rank 0 alone (:func:`on_first_rank`), the others waiting for it.

Collectives time out after the process group's ``timeout`` (set it in ``init_process_group``) if a rank dies
outside these agreements. Everything is a no-op without a process group of two or more ranks.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn

from . import errors
from .errors import CompressionError, MuscoError, one_line

log = logging.getLogger(__name__)


@attrs.frozen
class Group:
    """The default process group as the compression sees it: this process's rank, the number of ranks, and the
    device its collectives' tensors must be on (CUDA for NCCL, CPU for gloo)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def first(self) -> bool:
        return self.rank == 0


def current() -> Group | None:
    """The initialized default process group, or None outside a distributed job of two or more ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    return Group(dist.get_rank(), dist.get_world_size(), device)


def launched_for_several() -> bool:
    """Whether this process is one of a ``torchrun`` job of two or more processes (``WORLD_SIZE`` > 1), known before
    any process group is initialized: a refusal made then reaches every rank without a collective."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group_from_env(timeout: datetime.timedelta | None = None) -> Iterator[Group | None]:
    """The default process group of a ``torchrun`` job (None for a single process), initialized from the variables
    torchrun sets (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when they ask for two or more
    processes and none is initialized yet, and destroyed on leaving (a gloo group left to the interpreter's exit
    aborts the process): NCCL when CUDA is available, gloo otherwise. ``timeout`` bounds every collective. An
    environment that cannot make the group (no ``MASTER_ADDR``) is a ConfigError."""
    started = not dist.is_initialized() and launched_for_several()
    if started:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
        except (ValueError, RuntimeError) as exc:  # the environment's, not ours: a missing variable, a bad address
            raise errors.ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a torch.distributed job, but "
                                     f"its {backend} process group could not be initialized: {one_line(str(exc), 500)}"
                                     f"; launch with torchrun, which sets RANK, MASTER_ADDR and MASTER_PORT") from exc
        log.info("process group initialized: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    try:
        yield current()
    finally:
        if started:
            dist.destroy_process_group()


def _collective(group: Group, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``operation(*args, **kwargs)``, a collective; its failure (a peer that died, or did not answer within the
    process group's timeout) as one CompressionError saying so, not the backend's RuntimeError, which the CLI would
    report as a bug in musco-core."""
    try:
        operation(*args, **kwargs)
    except RuntimeError as exc:  # gloo and NCCL raise RuntimeError (DistError) subclasses
        raise CompressionError(f"rank {group.rank} of {group.world_size}: {operation.__name__} with the other ranks "
                               f"failed: another rank stopped (killed, out of memory, or an error outside "
                               f"musco-core: see its log) or did not answer within the process group's timeout: "
                               f"{one_line(str(exc), 500)}") from exc


# -- agreeing on success ---------------------------------------------------------------------------------------
def _error_class(name: str) -> type[MuscoError]:
    kind = getattr(errors, name, None)
    return kind if isinstance(kind, type) and issubclass(kind, MuscoError) else CompressionError


@contextlib.contextmanager
def agreement(group: Group | None, what: str) -> Iterator[None]:
    """Runs the body on this rank, then agrees with every rank on whether it succeeded everywhere; when it failed on
    some rank, every rank raises the first failing rank's error (a MuscoError of the same class, or a
    CompressionError for anything else), naming that rank and ``what``. A no-op without a group.

    The body must not run collectives itself: a rank that fails in it would leave the others waiting in them.
    """
    if group is None:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks before we raise it
        error = exc
    flag = torch.tensor([group.rank if error is not None else group.world_size], dtype=torch.int64,
                        device=group.device)
    _collective(group, dist.all_reduce, flag, op=dist.ReduceOp.MIN)
    failed = int(flag.item())
    if failed == group.world_size:
        return
    mine = None
    if error is not None and failed == group.rank:
        message = str(error) if isinstance(error, MuscoError) else f"{type(error).__name__}: {error}"
        mine = {"kind": type(error).__name__, "message": message}
    sent = broadcast_json(group, mine, src=failed)
    raise _error_class(sent["kind"])(f"rank {failed} of {group.world_size}: {what}: "
                                     f"{one_line(sent['message'], 2000)}") from error


def on_first_rank(group: Group | None, what: str, work: Callable[[], Any], src: int = 0) -> Any:
    """``work()`` run by rank ``src`` alone (rank 0 by default: files are written once; or the first rank that holds
    what the work needs, :func:`first_holding`), the other ranks waiting for it; every rank returns its result,
    which must be JSON data. A failure on that rank is raised on every rank."""
    if group is None:
        return work()
    result = None
    with agreement(group, what):
        if group.rank == src:
            result = work()
    return broadcast_json(group, result, src=src)


def first_holding(group: Group | None, holds: bool) -> int | None:
    """The lowest rank whose ``holds`` is true (each rank passes its own: whether its calibration shard has a
    batch, say), the same on every rank; None when no rank's is. Work that only a rank holding something can do is
    then run on that rank on every rank's word, never decided by each rank alone (a rank that skipped a collective
    the others entered would leave them waiting). Without a group: 0, or None."""
    if group is None:
        return 0 if holds else None
    flag = torch.tensor([group.rank if holds else group.world_size], dtype=torch.int64, device=group.device)
    _collective(group, dist.all_reduce, flag, op=dist.ReduceOp.MIN)
    found = int(flag.item())
    return None if found == group.world_size else found


# -- moving values ---------------------------------------------------------------------------------------------
def broadcast_json(group: Group | None, value: Any, src: int = 0) -> Any:
    """``value`` (JSON data) as rank ``src`` has it, on every rank, round-tripped through JSON on ``src`` too so every
    rank holds the same kinds (lists, not tuples). No pickle: a peer's bytes are only ever parsed as JSON."""
    if group is None:
        return value
    payload = json.dumps(value).encode("utf-8") if group.rank == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=group.device)
    _collective(group, dist.broadcast, size, src=src)
    buffer = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(group.device) if group.rank == src
              else torch.empty(int(size.item()), dtype=torch.uint8, device=group.device))
    _collective(group, dist.broadcast, buffer, src=src)
    return json.loads(buffer.cpu().numpy().tobytes().decode("utf-8"))


def broadcast_tensors(group: Group, tensors: Iterable[torch.Tensor], src: int) -> None:
    """Overwrites ``tensors`` (in the same order on every rank) with rank ``src``'s values, in place."""
    for tensor in tensors:
        direct = tensor.device == group.device and tensor.is_contiguous()
        buffer = tensor.detach() if direct else tensor.detach().to(group.device).contiguous()
        _collective(group, dist.broadcast, buffer, src=src)
        if not direct:
            with torch.no_grad():
                tensor.copy_(buffer)


def _all_reduce_sum(group: Group, tensor: torch.Tensor) -> torch.Tensor:
    buffer = tensor.to(group.device)
    _collective(group, dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def sum_tensor(group: Group, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor summed over the ranks (each rank passes its own, of the same shape and dtype)."""
    return _all_reduce_sum(group, tensor)


def sum_counts(group: Group | None, counts: Sequence[int]) -> list[int]:
    """Integer counts summed over the ranks (as they are without a group)."""
    if group is None:
        return list(counts)
    return [int(v) for v in _all_reduce_sum(group, torch.tensor(list(counts), dtype=torch.int64)).tolist()]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random draws in a job seeded with ``seed``: ``seed`` itself on rank 0 (so a
    one-process run is unchanged), a distinct one derived from both on every other rank, so that the ranks' draws
    are independent instead of each repeating rank 0's on its own shard; below 2**63, as every seed of a run."""
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}".encode()).digest()[:8], "little") >> 1


def sum_moments(group: Group | None, accumulators: Mapping[str, Any], n_batches: int) -> int:
    """Adds up the running float64 sums and row counts of
    :class:`~musco_core.calibration.InputStatsAccumulator` objects (the same layers, in the same order, on every
    rank) over the ranks, in place, before they are normalized; returns the number of batches of all ranks.
    A rank whose shard never reached a layer adds zeros."""
    if group is None:
        return n_batches
    names = list(accumulators)
    counts = sum_counts(group, [n_batches] + [accumulators[n].count for n in names]
                        + [accumulators[n].cross is not None for n in names])
    for index, name in enumerate(names):
        acc = accumulators[name]
        size = acc.spec.in_channels * acc.spec.kernel_numel
        zeros = torch.zeros(size, size, dtype=torch.float64, device=group.device)
        acc.total = _all_reduce_sum(group, zeros if acc.total is None else acc.total)
        if counts[1 + len(names) + index]:
            acc.cross = _all_reduce_sum(group, torch.zeros_like(acc.total) if acc.cross is None else acc.cross)
        acc.count = counts[1 + index]
        if acc.count == 0:
            acc.total = acc.cross = None
    return counts[0]


def mean(group: Group | None, value: float | None) -> float | None:
    """The mean of a float over the ranks that have one (a loss measured on each rank's shard, None on a rank whose
    shard is empty), in float64; None when no rank has one."""
    if group is None:
        return value
    total, count = _all_reduce_sum(group, torch.tensor([value or 0.0, value is not None], dtype=torch.float64))
    return float(total) / float(count) if count else None


# -- replicas --------------------------------------------------------------------------------------------------
def fingerprint(model: nn.Module) -> str:
    """A SHA-256 of the model's state_dict (names, dtypes, shapes and bytes): equal exactly when bitwise equal."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas(group: Group | None, model: nn.Module, agreed: Mapping[str, Any] | None = None) -> None:
    """A ConfigError on every rank unless every rank's model is bitwise rank 0's, and so is each value of
    ``agreed`` (JSON data, by what it is: the schedule, the example input's shapes...): the step decomposes each
    layer on one rank and gives its factors to all, so replicas that differ would be silently mixed, and ranks that
    plan other work would leave each other waiting in collectives that do not match."""
    if group is None:
        return
    mine = {"model": fingerprint(model)}
    for what, value in (agreed or {}).items():
        mine[what] = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    reference = broadcast_json(group, mine if group.first else None, src=0)
    with agreement(group, "checking the replicas"):
        if mine["model"] != reference["model"]:
            raise errors.ConfigError("this rank's model differs from rank 0's; every rank must hold the same "
                                     "weights when a compression step starts (load the same checkpoint, or fine-tune "
                                     "with DistributedDataParallel, which keeps them equal)")
        if differing := [what for what in mine if mine[what] != reference.get(what)]:
            raise errors.ConfigError(f"this rank's {' and '.join(differing)} differ from rank 0's; every rank must "
                                     f"call the same step of the same run, with the same example input and plugins, "
                                     f"each with or without calibration data and evaluate as every other")


# -- sharing the decompositions of a step ----------------------------------------------------------------------
def assign(costs: Mapping[str, float], world_size: int, loads: list[float] | None = None) -> dict[str, int]:
    """Each layer's owner rank: greedily, the costliest layer first, to the least loaded rank (ties: the name, then
    the lower rank), so every rank computes the same split. ``loads``, the ranks' work so far (say, from earlier
    batches of the same step), is counted and updated in place."""
    loads = [0.0] * world_size if loads is None else loads
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    return owners


def share(group: Group, jobs: Sequence[str], costs: Mapping[str, float],
          compute: Callable[[str], tuple[nn.Module | None, Any]],
          encode: Callable[[Any], Any], decode: Callable[[Any], Any],
          skeleton: Callable[[str, Any], nn.Module], loads: list[float] | None = None
          ) -> dict[str, tuple[nn.Module | None, Any]]:
    """``compute(name) -> (module or None, result)`` for every job, each on its owner rank (:func:`assign`, with
    ``loads``), with
    the results on every rank: the owner's result (``encode``-d to JSON data, ``decode``-d back) and module, whose
    state is broadcast into ``skeleton(name, result)`` on the other ranks. A failure on any rank is raised on every
    rank before anything is broadcast."""
    owners = assign(costs, group.world_size, loads)
    mine: dict[str, tuple[nn.Module | None, Any]] = {}
    with agreement(group, "decomposition"):
        for name in jobs:
            if owners[name] == group.rank:
                mine[name] = compute(name)
    shared = {}
    for name in jobs:
        owner = owners[name]
        new, result = mine.get(name, (None, None))
        header = broadcast_json(group, {"result": encode(result), "module": new is not None}
                                if owner == group.rank else None, src=owner)
        result = decode(header["result"])
        if header["module"]:
            if owner != group.rank:
                new = skeleton(name, result)
            broadcast_tensors(group, new.state_dict().values(), src=owner)
        shared[name] = (new, result)
    return shared


# -- training after a step -------------------------------------------------------------------------------------
def rewrap(model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
           **ddp_options: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model to fine-tune after a compression step, and its optimizer: the model (or a
    DistributedDataParallel's ``.module``) wrapped in a new ``DistributedDataParallel`` (``ddp_options`` passed
    on) and ``make_optimizer(parameters)`` over the new parameters. A step replaces layers, so the old wrapper's
    gradient buckets and the old optimizer's state point at parameters that left the model.
    Without a process group of two or more ranks the model is returned unwrapped."""
    from torch.nn.parallel import DistributedDataParallel

    plain = model.module if isinstance(model, DistributedDataParallel) else model
    wrapped = DistributedDataParallel(plain, **ddp_options) if current() is not None else plain
    return wrapped, make_optimizer(wrapped.parameters())
