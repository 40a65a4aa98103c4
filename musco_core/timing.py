"""Measuring how long modules take on this machine: warmed up, alternated, medians, at a fixed thread count.

Timings on a shared machine drift by tens of percent within seconds, so candidates are never timed one after
the other: every round calls each candidate once, in a rotating order, and the medians over the rounds are
compared. Only ratios between candidates measured together are meaningful.
"""
from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def call_arguments(example_input: Any) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments of a call on ``example_input``: ``(x,)``; ``x`` as positional arguments
    for a tuple or list; ``x`` as keyword arguments for a mapping (a tokenizer's output)."""
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model(x)``; ``model(*x)`` for a tuple or list; ``model(**x)`` for a mapping (a tokenizer's output)."""
    args, kwargs = call_arguments(example_input)
    return model(*args, **kwargs)



def first_input(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """The input of one call of ``module``: its first positional argument, else the keyword argument named by the
    first parameter of its forward (``self.fc(input=x)``: ``input`` of torch's layers); None when neither is given."""
    if args:
        return args[0]
    if not kwargs:
        return None
    return kwargs.get(next(iter(inspect.signature(module.forward).parameters), ""))

def map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` (a model's input or output) with ``function`` applied to each tensor in it, through tuples, lists
    (named tuples kept) and mappings (which become dicts, as a call with ``**`` takes them)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, Mapping):
        return {key: map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        items = [map_tensors(item, function) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def fresh_copy(example_input: Any) -> Any:
    """``example_input`` with each tensor cloned, for one call of a model: a forward that changes its input in place
    (``x.mul_(0.5)``) would otherwise change the caller's tensor and, call after call, what the next call gets."""
    return map_tensors(example_input, torch.Tensor.clone)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in a model's input or output: a tensor, or tensors nested in tuples, lists and mappings (a
    Hugging Face ``ModelOutput``), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


@contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Runs the block with torch's intra-op thread count set to ``threads`` (None: as it is), then restores it."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternated(calls: Sequence[Callable[[], Any]], *, warmup: int = 2, min_rounds: int = 5,
                    max_rounds: int = 50, min_seconds: float = 0.2, threads: int | None = None,
                    device: torch.device | None = None, prepare: Callable[[int], Any] | None = None) -> list[float]:
    """Median seconds per call of each callable, measured in alternation.

    Each callable runs ``warmup`` times first (lazy initialisation, caches, oneDNN primitive creation). Then
    rounds call every callable once, starting at a different one each round so none always runs right after
    another; rounds go on until ``min_rounds`` are done and ``min_seconds`` have passed, or ``max_rounds``.
    ``device`` set to a CUDA device synchronizes around every call, so the time is the kernel time. ``prepare``,
    where given, runs before every call with the call's index, untimed (a fresh copy of the input the call takes,
    modules swapped in for it).
    """
    if not calls:
        return []
    prepare = prepare or (lambda index: None)
    with fixed_threads(threads):
        for index, call in enumerate(calls):
            for _ in range(warmup):
                prepare(index)
                call()
        _synchronize(device)
        samples: list[list[float]] = [[] for _ in calls]
        started = time.perf_counter()
        for round_ in range(max_rounds):
            for offset in range(len(calls)):
                index = (round_ + offset) % len(calls)
                prepare(index)
                _synchronize(device)
                begin = time.perf_counter()
                calls[index]()
                _synchronize(device)
                samples[index].append(time.perf_counter() - begin)
            if round_ + 1 >= min_rounds and time.perf_counter() - started >= min_seconds:
                break
    return [statistics.median(s) for s in samples]


def _forwards(modules: Sequence[nn.Module], inputs: Callable[[], Any]) -> list[Callable[[], Any]]:
    """A call of each module on ``inputs()`` under ``torch.no_grad``."""

    def forward(module: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return call_model(module, inputs())
        return run

    return [forward(m) for m in modules]


def time_modules(modules: Sequence[nn.Module], example_input: Any, **options: Any) -> list[float]:
    """Median seconds of one forward pass of each module on ``example_input``, timed in alternation under
    ``torch.no_grad`` (options as :func:`time_alternated`). Each call gets a fresh copy of the input, made before
    its time starts: a model may change its input in place, which would change the caller's tensor and, call
    after call, what the next call gets."""
    fresh = [example_input]

    def prepare(index: int) -> None:
        fresh[0] = fresh_copy(example_input)

    return time_alternated(_forwards(modules, lambda: fresh[0]), prepare=prepare, **options)


def time_modules_at(modules: Sequence[nn.Module], input_shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", channels_last: bool = False, seed: int = 0,
                    **options: Any) -> list[float]:
    """Median seconds of one forward pass of each module on a random input of ``input_shape`` (batch included),
    timed in alternation (options as :func:`time_alternated`); ``channels_last`` puts a 4-d input and the modules'
    4-d weights in that memory format first. Synchronizes around each call on a CUDA device."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(input_shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        modules = [module.to(memory_format=torch.channels_last) for module in modules]
    return time_alternated(_forwards(modules, lambda: x), device=device, **options)  # x is its own
