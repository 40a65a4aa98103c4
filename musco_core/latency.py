"""Measured latency for whole-model budgets on ``metric: latency``: layer chains timed on this machine, cached on disk.

A layer's cost at some ranks is the median time of its factor chain on the layer's input shape (batch included),
on the device and dtype of the model's weights, at the current ``torch.get_num_threads()``: timed in alternation
with the dense layer (see :mod:`musco_core.timing`). The time depends on the geometry alone, so the chains are built
with zero weights, and each time is cached on disk under a key naming the device, dtype, thread count, torch version
and the geometry (layer spec, factor layouts, input shape): a second run, or another model with the same layer
shapes, measures nothing.

The cache is one JSON file (:func:`default_cache_path`, or ``$MUSCO_LATENCY_CACHE``), replaced atomically on
every save; a file that cannot be read, or one of another format, is ignored with one warning.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from .components import Factor, FactorLayout, LayerSpec
from .factors import layer_layout
from .timing import time_alternated, time_modules_at

log = logging.getLogger(__name__)

#: Version of the cache file's layout; a file of another version is ignored (and replaced on the next save).
CACHE_FORMAT = 1
#: Environment variable naming the cache file, replacing :func:`default_cache_path`.
CACHE_ENV = "MUSCO_LATENCY_CACHE"


def default_cache_path() -> Path:
    """``$MUSCO_LATENCY_CACHE``, else ``$XDG_CACHE_HOME/musco-core/latency.json`` (``~/.cache`` without it)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "musco-core" / "latency.json"


class LatencyCache:
    """Seconds per timing key, read from and written back to one JSON file."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.entries: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("latency cache %s: ignored, it cannot be read (%s); timings are measured again", self.path,
                        exc)
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(entries, dict) or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                for value in entries.values()):
            log.warning("latency cache %s: ignored, it is not a musco-core latency cache of format %d; timings are "
                        "measured again", self.path, CACHE_FORMAT)
            return {}
        return {str(key): float(value) for key, value in entries.items()}

    def save(self) -> None:
        """Writes the entries to a temporary file next to the cache and renames it over the cache, so a reader
        never sees half a file; a cache that cannot be written is reported with a warning, never an error."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.path.parent, prefix=".latency-",
                                             suffix=".tmp", delete=False) as handle:
                json.dump({"format": CACHE_FORMAT, "entries": self.entries}, handle, indent=0, sort_keys=True)
            os.replace(handle.name, self.path)
        except OSError as exc:
            log.warning("latency cache %s: not saved (%s)", self.path, exc)
            try:
                os.unlink(handle.name)
            except (OSError, NameError):
                pass


class Timer:
    """How the profiler measures: layer chains on a random input, and whole-model calls, in alternation. Tests
    substitute a deterministic one."""

    def layers(self, modules: Sequence[nn.Module], input_shape: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> list[float]:
        """Median seconds of each module on a random input of ``input_shape``, timed in alternation."""
        return time_modules_at(modules, input_shape, dtype=dtype, device=device, warmup=3, min_rounds=15,
                               min_seconds=0.2)

    def close(self) -> None:
        """Ends the progress bar and logs how many layers were timed and how many came from the cache."""
        log.info("latency profiling: %d layer(s) timed, %d from the cache %s", self.timed_layers, self.cached_layers,
                 self.cache.path)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def calls(self, calls: Sequence[Callable[[], Any]], device: torch.device) -> list[float]:
        """Median seconds of each call (whole forward passes), timed in alternation."""
        return time_alternated(calls, device=device, min_rounds=15, min_seconds=2.0)


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
        are timed in alternation with the layer's dense chain, and cached. A progress bar counts the layers timed
        until :meth:`close`."""
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
            self.cache.entries.update({self.key(chain): float(t) for chain, t in zip(timed, times, strict=True)})
            self._bar.update(1)
        if missing:
            self.cache.save()
        self.timed_layers += len(missing)
        self.cached_layers += len(layers) - len(missing)
        return [[self.cache.entries[self.key(chain)] for chain in chains] for chains in layers]

    def close(self) -> None:
        """Ends the progress bar and logs how many layers were timed and how many came from the cache."""
        log.info("latency profiling: %d layer(s) timed, %d from the cache %s", self.timed_layers, self.cached_layers,
                 self.cache.path)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def calls(self, calls: Sequence[Callable[[], Any]]) -> list[float]:
        """Seconds of each call (whole forward passes), timed in alternation, never cached."""
        with torch.no_grad():
            return self.timer.calls(calls, self.device)
