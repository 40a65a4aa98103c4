"""Measured latency for whole-model budgets on ``metric: latency``: layer chains timed on this machine, cached on disk.

A layer's cost at some ranks is the median time of its factor chain on the layer's input shape (batch included),
on the device and dtype of the model's weights, at the current ``torch.get_num_threads()``: timed in alternation
with the dense layer (see :mod:`musco_core.timing`). The time depends on the geometry alone, so the chains are built
with zero weights, and each time is cached on disk under a key naming the device, dtype, thread count, torch version
and the geometry (layer spec, factor layouts, input shape): a second run, or another model with the same layer
shapes, measures nothing.

The cache is one JSON file (:func:`default_cache_path`, or ``$MUSCO_LATENCY_CACHE``; ``off`` there keeps none).
Each save merges what this process measured into the file as it is then, under a lock (processes profiling into
one cache keep each other's entries), keeps the :data:`CACHE_MAX_ENTRIES` measured last, and replaces the file
atomically (a link's target, with its mode). A path that holds anything else than a cache of this format (a
device, a FIFO, a directory, an unreadable or foreign file, another format) is never written: one warning, and
the run keeps its timings in memory only.

Whole-model timings are never cached: :func:`timed_totals` times the model against its rest (the compressible
layers stubbed out) and gives the selector a function that times a plan in place.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import stat
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from .components import Factor, FactorLayout, LayerSpec, ModelTotals
from .engine import factorized_like
from .errors import ConfigError, finite_number
from .factors import layer_layout
from .inference import memory_format_candidates, optimize_for_inference
from .schedule import advisory_lock
from .state import RunContext
from .surgery import FactorizedLayer, evaluating, module_paths, swapped
from .timing import call_model, fresh_copy, time_alternated, time_modules_at

log = logging.getLogger(__name__)

#: Version of the cache file's layout; a file of another version is ignored and left as it is.
CACHE_FORMAT = 1
#: Environment variable naming the cache file, replacing :func:`default_cache_path`; :data:`CACHE_OFF` there keeps
#: no cache file.
CACHE_ENV = "MUSCO_LATENCY_CACHE"
#: The value of ``$MUSCO_LATENCY_CACHE`` that keeps no cache file: timings live as long as the process.
CACHE_OFF = "off"
#: Most entries a cache file keeps; a save drops the least recently measured beyond them (about 650 bytes each).
CACHE_MAX_ENTRIES = 10_000

_warned: set[tuple[str, str]] = set()  # (cache path, problem) already reported by this process


def default_cache_path() -> Path | None:
    """``$MUSCO_LATENCY_CACHE`` (None where it is ``off``: no cache file), else
    ``$XDG_CACHE_HOME/musco-core/latency.json`` (``~/.cache`` without it)."""
    if os.environ.get(CACHE_ENV):
        return None if os.environ[CACHE_ENV] == CACHE_OFF else Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "musco-core" / "latency.json"


class _Unusable(Exception):
    """The file at the cache path is not one to read or write: not a regular file, unreadable, or not a cache of
    this format."""


def _read_entries(path: Path) -> dict[str, tuple[float, float]]:
    """``(seconds, measured)`` per key of the cache file at ``path`` ({} where there is none; ``measured`` the Unix
    time of the measurement, 0 where the file does not say). Only a regular file (or a link to one) is read: a
    device or a FIFO there is never opened."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise _Unusable("it is not a regular file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Unusable(f"it cannot be read ({exc})") from exc
    entries = data.get("entries") if isinstance(data, dict) else None
    measured = data.get("measured", {}) if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(entries, dict) or not all(
            _is_time(value) for value in entries.values()) or not isinstance(measured, dict):
        raise _Unusable(f"it is not a musco-core latency cache of format {CACHE_FORMAT} (entries: positive finite "
                        f"seconds)")
    return {key: (float(value), float(measured[key]) if _is_time(measured.get(key)) else 0.0)
            for key, value in entries.items()}


def _is_time(value: Any) -> bool:
    return finite_number(value) and value > 0


def _warn_once(path: Path, problem: str) -> None:
    if (str(path), problem) not in _warned:
        _warned.add((str(path), problem))
        log.warning("latency cache %s: %s", path, problem)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``<path>.lock``, waiting for it, so that processes saving into one cache
    take turns (unguarded where there are no advisory locks: :func:`~musco_core.schedule.advisory_lock`)."""
    with open(path.with_name(path.name + ".lock"), "a", encoding="utf-8") as lock, \
            advisory_lock(lock.fileno(), wait=True):
        yield


class LatencyCache:
    """Seconds per timing key, read from one JSON file when first asked for (a profiler that only times whole
    models never reads it) and saved back into it; ``path`` None: :func:`default_cache_path`, which may be no
    file (then the entries live as long as the cache).

    A path that holds something else than a cache of this format (not a regular file, unreadable, another
    format) is never written: it is reported once, and the timings are measured again and not saved."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self._measured: dict[str, tuple[float, float]] = {}  # entries added here: (seconds, Unix time)
        self._writable = self.path is not None  # False once the path was found to hold no cache of this format

    @functools.cached_property
    def entries(self) -> dict[str, float]:
        if self.path is None:
            return {}
        try:
            return {key: seconds for key, (seconds, _) in _read_entries(self.path).items()}
        except _Unusable as exc:
            _warn_once(self.path, self._unusable(exc))
            self._writable = False
            return {}

    def add(self, key: str, seconds: float) -> float:
        """The cached seconds of ``key``, ``seconds`` (measured now) where it has none."""
        if key not in self.entries:
            self.entries[key] = seconds
            self._measured[key] = (seconds, time.time())
        return self.entries[key]

    def save(self) -> None:
        """Merges the entries measured here into the file as it is now, under a lock (another process may have
        saved since it was read), keeps the :data:`CACHE_MAX_ENTRIES` measured last, writes them to a temporary
        file next to the file (the target of a link) with the file's mode, and renames it over the file, so a
        reader never sees half a file. A cache that cannot be written is reported with a warning, never an
        error."""
        if not self._writable or not self._measured:
            return
        target = Path(os.path.realpath(self.path))
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _locked(target):
                merged = {**_read_entries(target), **self._measured}
                kept = sorted(merged.items(), key=lambda item: (-item[1][1], item[0]))[:CACHE_MAX_ENTRIES]
                mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
                with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w",
                          encoding="utf-8") as handle:  # created as any new file is (the umask applies)
                    json.dump({"format": CACHE_FORMAT, "entries": {key: seconds for key, (seconds, _) in kept},
                               "measured": {key: measured for key, (_, measured) in kept}}, handle, indent=0,
                              sort_keys=True)
                if mode is not None:
                    os.chmod(temporary, mode)
                os.replace(temporary, target)
        except _Unusable as exc:
            _warn_once(self.path, self._unusable(exc))
            self._writable = False
        except OSError as exc:
            log.warning("latency cache %s: not saved, nor will it be by this run (%s)", self.path, exc)
            self._writable = False
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    @staticmethod
    def _unusable(problem: _Unusable) -> str:
        return (f"ignored and left as it is: {problem}; the layers are timed again and their timings not saved "
                f"(delete the file, or set ${CACHE_ENV} to another file, or to {CACHE_OFF} for no cache file)")


class Timer:
    """How the profiler measures: layer chains on a random input, and whole-model calls, in alternation. Tests
    substitute a deterministic one."""

    def layers(self, modules: Sequence[nn.Module], input_shape: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> list[float]:
        """Median seconds of each module on a random input of ``input_shape``, timed in alternation."""
        return time_modules_at(modules, input_shape, dtype=dtype, device=device, warmup=3, min_rounds=15,
                               min_seconds=0.2)

    def calls(self, calls: Sequence[Callable[[], Any]], device: torch.device,
              prepare: Callable[[int], Any]) -> list[float]:
        """Median seconds of each call (whole forward passes), timed in alternation; ``prepare(index)`` runs,
        untimed, before every call of ``calls[index]`` (see :func:`~musco_core.timing.time_alternated`)."""
        return time_alternated(calls, device=device, min_rounds=7, min_seconds=3.0, prepare=prepare)


@attrs.frozen
class Chain:
    """A layer geometry to time: the layer's spec, the chain of factor layouts standing for it, its input shape."""

    spec: LayerSpec
    layouts: tuple[FactorLayout, ...]
    input_shape: tuple[int, ...]

    @classmethod
    def dense(cls, spec: LayerSpec, input_shape: Sequence[int]) -> Chain:
        """The uncompressed layer of ``spec``."""
        return cls(spec, tuple(layer_layout(spec)), tuple(input_shape))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


class LatencyProfiler:
    """Times layer chains (cached) and whole models on the device and dtype of ``like`` (a weight of the model), at
    the thread count current when it was made."""

    def __init__(self, registry: Any, like: torch.Tensor, *, timer: Timer | None = None,
                 cache: LatencyCache | None = None, progress: bool = False) -> None:
        self.registry = registry
        self.device, self.dtype = like.device, like.dtype
        self.threads = torch.get_num_threads()
        self.timer = timer or Timer()
        self.cache = cache if cache is not None else LatencyCache()
        self.progress = progress
        self._bar: tqdm | None = None
        self.timed_layers = 0  # layers timed (not all their chains in the cache) since made, for the log
        self.cached_layers = 0
        self.environment = {"device": f"{self.device.type}:{_device_name(self.device)}", "dtype": str(self.dtype),
                            "threads": self.threads, "torch": torch.__version__}

    def key(self, chain: Chain) -> str:
        """The cache key of a chain's time here: the environment and the geometry, as canonical JSON."""
        return json.dumps({**self.environment, "spec": attrs.asdict(chain.spec),
                           "layouts": [attrs.asdict(layout) for layout in chain.layouts],
                           "input": list(chain.input_shape)}, sort_keys=True)

    def module(self, chain: Chain) -> nn.Module:
        """The chain as modules with zero weights (time depends on the geometry alone)."""
        like = torch.empty(0, device=self.device, dtype=self.dtype)
        factors = [Factor(layout, like.new_zeros(layout.weight_shape),
                          like.new_zeros(layout.out_channels) if layout.bias else None) for layout in chain.layouts]
        adapter = self.registry.adapters.get(chain.spec.adapter)
        return nn.Sequential(*adapter.build(chain.spec, factors, like)).eval()

    def seconds(self, layers: Sequence[Sequence[Chain]]) -> list[list[float]]:
        """Seconds of every chain, per layer: the chains of one layer (same spec and input shape) not in the cache
        are timed in alternation with the layer's dense chain, and cached as their ratio to it times the dense
        layer's first cached time (so all the chains of a layer share one reference, and a busy moment that slows a
        whole round of timings cancels out). A progress bar counts the layers timed until :meth:`close`."""
        missing = [index for index, chains in enumerate(layers)
                   if any(self.key(chain) not in self.cache.entries for chain in chains)]
        if missing and self._bar is None:
            self._bar = tqdm(desc="latency profiling", unit="layer", leave=False, file=sys.stderr,
                             disable=not (self.progress and sys.stderr.isatty()))
        for index in missing:
            chains = list(dict.fromkeys(layers[index]))
            dense = Chain.dense(chains[0].spec, chains[0].input_shape)
            timed = [dense] + [chain for chain in chains if chain != dense]
            with torch.no_grad():
                times = self.timer.layers([self.module(chain) for chain in timed], chains[0].input_shape,
                                          self.dtype, self.device)
            # each chain's time relative to the dense layer timed with it, times the layer's one reference time
            reference = self.cache.add(self.key(dense), float(times[0]))
            for chain, seconds in zip(timed[1:], times[1:], strict=True):
                self.cache.add(self.key(chain), float(seconds) / float(times[0]) * reference)
            self._bar.update(1)
        if missing:
            self.cache.save()
        self.timed_layers += len(missing)
        self.cached_layers += len(layers) - len(missing)
        return [[self.cache.entries[self.key(chain)] for chain in chains] for chains in layers]

    def close(self) -> None:
        """Ends the progress bar and logs how many layers were timed and how many came from the cache."""
        log.info("latency profiling: %d layer(s) timed, %d from the cache %s", self.timed_layers, self.cached_layers,
                 self.cache.path or "in memory")
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def calls(self, calls: Sequence[Callable[[], Any]], prepare: Callable[[int], Any]) -> list[float]:
        """Seconds of each call (whole forward passes), timed in alternation, ``prepare(index)`` untimed before
        every call of ``calls[index]``; never cached."""
        with torch.no_grad():
            return self.timer.calls(calls, self.device, prepare)


def profiler_for(model: nn.Module, context: RunContext) -> LatencyProfiler:
    """The latency profiler of a step: on the device and dtype of the model's first weight, the context's timer."""
    like = next((p for p in model.parameters() if p.is_floating_point()), None)
    if like is None:
        raise ConfigError(f"{type(model).__name__} has no floating-point weights to time the layers on")
    return LatencyProfiler(context.registry, like.detach(), timer=context.latency_timer, progress=context.progress)


class _FixedOutput(nn.Module):
    """Stands in for a layer when the rest of the model is timed: returns the layer's output for the shape of its
    input (as the example input called it), computing nothing."""

    def __init__(self, outputs: Mapping[tuple[int, ...], torch.Tensor]) -> None:
        super().__init__()
        self.outputs = dict(outputs)

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: A002 - torch's name
        return self.outputs[tuple(input.shape)]


class TimedForm:
    """The form in which whole models are timed: ``optimized`` false, the model as the run leaves it, run in place;
    true, as :func:`~musco_core.optimize_for_inference` deploys it: an eval-mode copy with BatchNorm folded and
    factor chains merged where that saves MACs, timed in its memory format, in ``channels_last`` and (a model with
    2-d convolutions) in ``channels_last`` with every 1x1 convolution a matrix product (those of these forms that
    run on the example input), the fastest counting.
    ``optimize_for_inference`` chooses the memory format per model and the matrix products per geometry; timing
    each chain's splits and each geometry for every plan would take too long.

    Made from the model as it is to be timed (eval mode): each call to :meth:`seconds` must find it so (the
    caller's replacements swapped in alike), since the optimized copies of the model without swaps are made once
    and kept. An optimized timing holds up to three copies of the model per variant."""

    def __init__(self, model: nn.Module, example_input: Any, optimized: bool) -> None:
        self.model, self.example_input, self.optimized = model, example_input, optimized
        self._unswapped: list[nn.Module] | None = None  # the optimized copies of the model as it is

    def seconds(self, profiler: LatencyProfiler, variants: Sequence[Mapping[str, nn.Module]],
                stubs: Sequence[Mapping[str, nn.Module]] = ()) -> list[float]:
        """Seconds of each variant of the model (the modules at these paths swapped in, then the variant's
        ``stubs``, if given: modules standing in for layers, swapped into the optimized copy after folding, except
        at paths it no longer has, e.g. inside a merged chain), timed in alternation."""
        stubs = list(stubs) or [{} for _ in variants]
        if not self.optimized:
            return self._timed(profiler, [(self.model, {**swaps, **stubbed})
                                          for swaps, stubbed in zip(variants, stubs)])
        runs, owner = [], []
        for index, (swaps, stubbed) in enumerate(zip(variants, stubs)):
            for form in self._deployed(swaps):
                runs.append((form, {path: stub for path, stub in stubbed.items() if _has_submodule(form, path)}))
                owner.append(index)
        times = self._timed(profiler, runs)
        return [min(t for t, i in zip(times, owner) if i == index) for index in range(len(variants))]

    def _deployed(self, swaps: Mapping[str, nn.Module]) -> list[nn.Module]:
        """The optimized copies of the model with ``swaps`` swapped in, in each memory format worth timing
        (``optimize_for_inference`` puts the copy in eval mode)."""
        if not swaps and self._unswapped is not None:
            return self._unswapped
        with swapped(self.model, swaps):
            forms = memory_format_candidates(optimize_for_inference(self.model, progress=False), self.example_input)
        if not swaps:
            self._unswapped = forms
        return forms

    def _timed(self, profiler: LatencyProfiler, runs: Sequence[tuple[nn.Module, Mapping[str, nn.Module]]]
               ) -> list[float]:
        """Seconds of a forward pass of each model with its modules swapped in, timed in alternation. Before each
        call, untimed, the previous call's swaps are put back, the call's made and the example input copied afresh
        (a forward may change its input in place); timed with the forward, they inflated both times of a
        difference or ratio alike. All put back afterwards, also on error."""
        undo, given = contextlib.ExitStack(), [None]

        def prepare(index: int) -> None:
            undo.close()
            model, swaps = runs[index]
            undo.enter_context(swapped(model, swaps))
            given[0] = fresh_copy(self.example_input)

        def forward(model: nn.Module) -> Callable[[], Any]:
            return lambda: call_model(model, given[0])

        with undo:
            return profiler.calls([forward(model) for model, _ in runs], prepare)


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def timed_totals(model: nn.Module, context: RunContext, profiler: LatencyProfiler, totals: ModelTotals,
                 scheduled_layers: Sequence[str], current: Mapping[str, nn.Module],
                 replacements: Mapping[str, nn.Module], factorized: Collection[str],
                 optimized: bool = False) -> ModelTotals:
    """``totals`` with measured seconds, in the units of the layers' chain times (timed alone, cached).

    The model as the step leaves it so far is timed in alternation with its *rest*: the same model with every
    compressible layer returning a fixed output (one per input shape the example input calls it at). Their
    difference is the layers' time in place; dividing it by the layers' summed times alone (each layer's at every
    call: a module the forward calls twice, or at two input shapes, is timed at each shape and counted per call;
    counted once, a scheduled layer called twice was planned at 1.51x of the scheduled layers' time for 1.39x)
    gives the scale between a long forward pass and short layer calls (on a shared machine, preemption inflates the
    first more than the medians of the second), and the model's time in layer units. Its time when the run began
    adds, for every layer the run ``factorized`` so far (the step's replacements included), its time as the run
    began (its dense layer's, or the chain of a model compressed before the run: timed as a dense layer, such a
    chain re-compressed by the run made the plan say 1.294x since the run began for 1.156x) minus its chain's; the
    scheduled layers' seconds are their summed times. ``current`` maps each compressible layer to its module as the
    step leaves it so far, ``replacements`` the paths where the step's new layers are still to be swapped in.

    ``speedup_of`` times a plan in place: its chains, with zero weights, swapped into the model, in alternation with
    the model as it is. With ``optimized`` every whole-model timing is of the :class:`TimedForm` that
    ``optimize_for_inference`` deploys."""
    paths = module_paths(model)
    current = {name: current[name] if name in current else model.get_submodule(name)
               for name in context.model_stats.layers}
    reached = {name: stats for name, stats in context.model_stats.layers.items()
               if stats.input_shape is not None and stats.output_shape is not None}
    layers, owners = [], []  # the layer as the run began and now at each input shape, and whose calls they are
    for name, stats in reached.items():
        layouts = current[name].layouts if isinstance(current[name], FactorizedLayer) else layer_layout(stats.spec)
        began = context.began_factorized.get(name, layer_layout(stats.spec))
        for shape, count in stats.input_calls or ((stats.input_shape, 1),):
            layers.append([Chain(stats.spec, tuple(began), tuple(shape)), Chain(stats.spec, tuple(layouts),
                                                                                tuple(shape))])
            owners.append((name, count))
    times: dict[str, tuple[float, float]] = {}  # per layer, as the run began and now, summed over its calls
    for (name, count), (at_start, chain) in zip(owners, profiler.seconds(layers)):
        summed = times.get(name, (0.0, 0.0))
        times[name] = (summed[0] + count * at_start, summed[1] + count * chain)
    layer_paths = {name: paths[id(model.get_submodule(name))] for name in reached}
    form = TimedForm(model, context.example_input, optimized)
    calls = {name: {input_shape: output_shape for input_shape, output_shape, _ in stats.calls}
             for name, stats in reached.items()}  # the example input's calls, as the statistics pass saw them
    with swapped(model, replacements), evaluating(model):
        stubs = {path: _FixedOutput({shape: torch.zeros(output, device=profiler.device, dtype=profiler.dtype)
                                     for shape, output in calls[name].items()})
                 for name in reached for path in layer_paths[name]}
        model_seconds, rest_seconds = form.seconds(profiler, [{}, {}], stubs=[{}, stubs])
    alone = sum(chain for _, chain in times.values())
    in_place = model_seconds - rest_seconds
    scale = in_place / alone if in_place > 0 and alone > 0 else 1.0
    now = model_seconds / scale
    log.info("latency: the model takes %.2f ms, of which its compressible layers %.2f ms in place and %.2f ms "
             "timed alone; the rest %.1f%%", 1e3 * model_seconds, 1e3 * in_place, 1e3 * alone,
             100 * rest_seconds / model_seconds)
    original = now + sum(at_start - chain for name, (at_start, chain) in times.items() if name in factorized)
    scheduled = [times[name] for name in scheduled_layers if name in times]

    def speedup_of(plan: Mapping[str, tuple[str, tuple[int, ...]] | None]) -> float:
        planned = {path: new for name, chosen in plan.items() if chosen is not None
                   for new in [factorized_like(current[name], name, chosen[0], chosen[1], context.registry)]
                   for path in paths[id(model.get_submodule(name))]}

        with swapped(model, replacements), evaluating(model, *planned.values()):
            as_is, planned_seconds = form.seconds(profiler, [{}, planned])
        return as_is / planned_seconds

    scheduled_totals = attrs.evolve(totals.scheduled, seconds_original=sum(at_start for at_start, _ in scheduled),
                                    seconds_now=sum(chain for _, chain in scheduled))
    return attrs.evolve(totals, seconds_original=original, seconds_now=now, speedup_of=speedup_of,
                        scheduled=scheduled_totals)
