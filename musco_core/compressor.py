"""The ``Compressor`` facade, compatible with the original musco-pytorch API."""
from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import attrs
import yaml
from torch import nn
from tqdm.auto import tqdm

from .config import generate_model_compr_kwargs
from .engine import LayerResult, compress_layer, read_layer, split_groups
from .errors import CompressionError, ConfigError, MuscoError
from .registry import Registry, default_registry
from .report import CompressionReport
from .schedule import ModelSchedule, ScheduleCodec, key_path, read_yaml, write_text_atomic
from .stats import ModelStats, as_model_stats
from .surgery import module_paths, replace_module

log = logging.getLogger(__name__)

STATE_FILE = "state.yaml"
LATEST_FILE = "LATEST"
STATE_FORMAT = 1


class Compressor:
    """Multi-stage compression: call :meth:`compression_step` until :attr:`done`, fine-tuning in between.

    ``model_compr_kwargs`` is the original ``{layer: settings or None}`` dict (never modified) or a
    :class:`ModelSchedule`; when omitted it is generated from ``model_stats`` with ``config_type``.
    ``model_stats`` may be a ``flopco.FlopCo`` object or :class:`ModelStats`; when omitted the statistics are
    computed from ``example_input`` (or, without it, from the model's layers alone, with no MAC counts).
    The input model is deep-copied unless ``inplace=True``. A progress bar goes to stderr when it is a terminal
    and ``progress`` is true. With a ``ModelSchedule`` its own settings apply and
    ``ft_every``, ``nglobal_compress_iters`` and ``all_algo_kwargs`` must be left at their defaults.
    """

    def __init__(self, model: nn.Module, model_stats: Any = None, model_compr_kwargs: Any = None,
                 ft_every: int = 1, nglobal_compress_iters: int | None = None, all_algo_kwargs: Any = None,
                 config_type: str = "none", *, example_input: Any = None, inplace: bool = False,
                 seed: int = 0, registry: Registry | None = None, progress: bool = True) -> None:
        self.registry = registry or default_registry()
        self.progress = progress
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
            raise ConfigError(f"{type(model).__name__} has uninitialized (lazy) parameters; run one forward pass "
                              f"before compressing it")
        self.compressed_model = model if inplace else copy.deepcopy(model)
        self._params_before = sum(p.numel() for p in self.compressed_model.parameters())
        self.model_stats: ModelStats = as_model_stats(model_stats, self.compressed_model, self.registry,
                                                      example_input)
        carries_settings = isinstance(model_compr_kwargs, ModelSchedule) or (
            isinstance(model_compr_kwargs, dict) and "version" in model_compr_kwargs)
        if carries_settings and (ft_every, nglobal_compress_iters, all_algo_kwargs, seed) != (1, None, None, 0):
            raise ConfigError("model_compr_kwargs is a full schedule with its own settings: put ft_every, "
                              "nglobal_compress_iters, all_algo_kwargs and seed there, not in arguments")
        if isinstance(model_compr_kwargs, ModelSchedule):
            schedule = model_compr_kwargs
        else:
            if model_compr_kwargs is None:
                model_compr_kwargs = generate_model_compr_kwargs(self.model_stats, config_type,
                                                                 registry=self.registry)
            settings = {"ft_every": ft_every, "nglobal_compress_iters": nglobal_compress_iters or 1,
                        "seed": seed, "algo_kwargs": all_algo_kwargs or {}}
            schedule = ScheduleCodec(self.registry).structure(model_compr_kwargs, "model_compr_kwargs",
                                                              settings=settings)
        self._validate_against_model(schedule)
        self.initial_schedule = schedule
        self.schedule = schedule
        self.lnames = schedule.compressed_layers()
        settings = schedule.settings
        self.ft_every = min(settings.ft_every, len(self.lnames)) if self.lnames else settings.ft_every
        self.nglobal_compress_iters = settings.nglobal_compress_iters
        scheduler = self.registry.schedulers.get(settings.scheduler)
        self._steps = scheduler.plan(self.lnames, settings, None)
        self.niters = len(self._steps)
        self.curr_iter = 0
        self.ranks: dict[str, tuple[int, ...] | None] = dict.fromkeys(self.lnames)
        self.history: list[LayerResult] = []
        if not self.lnames:
            log.warning("the schedule compresses no layer; the compressor is done at once")

    @classmethod
    def from_yaml(cls, model: nn.Module, path: str | os.PathLike, model_stats: Any = None, **kwargs: Any
                  ) -> Compressor:
        """A compressor for a YAML schedule file (see :mod:`musco_core.schedule`)."""
        registry = kwargs.pop("registry", None) or default_registry()
        schedule = ScheduleCodec(registry).structure(read_yaml(path), str(path))
        return cls(model, model_stats, schedule, registry=registry, **kwargs)

    def save_state(self, directory: str | os.PathLike) -> Path:
        """Saves what :meth:`resume` needs to continue after the current step: weights, structure, schedule and
        progress, in ``directory/step-NNNN``; ``directory/LATEST`` names the newest complete one.

        The step folder is written under a temporary name and renamed, and LATEST is replaced atomically after
        it, so a run killed while saving resumes from the previous complete state. Older states are removed.
        """
        from .io import save_compressed

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.curr_iter:04d}"
        staging = directory / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        save_compressed(self, staging)
        codec = ScheduleCodec(self.registry)
        state = {"format": STATE_FORMAT, "initial_schedule": codec.unstructure(self.initial_schedule),
                 "schedule": codec.unstructure(self.schedule), "steps": self._steps, "curr_iter": self.curr_iter,
                 "params_before": self._params_before}
        write_text_atomic(staging / STATE_FILE, yaml.safe_dump(state, sort_keys=False, default_flow_style=None))
        shutil.rmtree(directory / name, ignore_errors=True)
        os.replace(staging, directory / name)
        write_text_atomic(directory / LATEST_FILE, name + "\n")
        for old in directory.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return directory / name

    @classmethod
    def resume(cls, model: nn.Module, directory: str | os.PathLike, *, example_input: Any = None,
               registry: Registry | None = None, progress: bool = True) -> Compressor:
        """A compressor that continues a run from the newest state :meth:`save_state` wrote in ``directory``.

        ``model`` is a fresh, uncompressed instance of the architecture; it is not modified. A resumed run ends
        with the same ranks and weights as an uninterrupted one with the same schedule and seed.
        """
        from .io import load_compressed, read_report

        registry = registry or default_registry()
        directory = Path(directory)
        latest = directory / LATEST_FILE
        try:
            step_dir = directory / latest.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{latest}: cannot read: {exc.strerror or exc}; nothing to resume") from None
        state = read_yaml(step_dir / STATE_FILE)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{step_dir / STATE_FILE}: not a musco-core compressor state of format {STATE_FORMAT}")
        codec = ScheduleCodec(registry)
        origin = str(step_dir / STATE_FILE)
        initial = codec.structure(state["initial_schedule"], f"{origin}: initial_schedule")
        compressor = cls(load_compressed(model, step_dir, registry), model_compr_kwargs=initial,
                         example_input=example_input, inplace=True, registry=registry, progress=progress)
        if compressor._steps != state["steps"]:
            raise ConfigError(f"{origin}: the saved plan of steps does not match its schedule")
        compressor.schedule = codec.structure(state["schedule"], f"{origin}: schedule")
        compressor.curr_iter = state["curr_iter"]
        compressor._params_before = state["params_before"]
        compressor.history = list(read_report(step_dir).layers)
        for result in compressor.history:
            if result.applied:
                compressor.ranks[result.name] = result.ranks
        log.info("resumed from %s at step %d of %d", step_dir, compressor.curr_iter, compressor.niters)
        return compressor

    @property
    def done(self) -> bool:
        """True once every planned step was taken (at once when the schedule compresses no layer)."""
        return self.curr_iter >= self.niters

    @property
    def model_compr_kwargs(self) -> dict[str, Any]:
        """The current schedule in the original dict form (a fresh copy, with updated ``curr_compr_iter``)."""
        return {name: ScheduleCodec.unstructure_layer(layer) for name, layer in self.schedule.layers.items()}

    def report(self) -> CompressionReport:
        """What compression did so far: one row per layer and stage, and the model's totals."""
        macs_before = self.model_stats.total_macs
        macs_after = None
        if macs_before is not None:
            current = {s.name: s.macs for s in self.model_stats.layers.values()}
            current.update({r.name: r.macs_after for r in self.history})
            macs_after = sum(current.values())
        return CompressionReport(list(self.history), self._params_before,
                                 sum(p.numel() for p in self.compressed_model.parameters()), macs_before, macs_after)

    def _validate_against_model(self, schedule: ModelSchedule) -> None:
        problems = []
        modules = dict(self.compressed_model.named_modules())
        settings = schedule.settings
        for name, layer in schedule.layers.items():
            path = key_path("$.layers", name)
            if layer is None:
                continue
            if name not in modules or not name:
                problems.append(f"{path}: no layer of that name in {type(self.compressed_model).__name__}")
                continue
            decomposer = self.registry.decompositions.get(layer.decomposition)
            try:
                _, source, _ = read_layer(modules[name], self.registry, name)
                group_spec, group_sources = split_groups(source)
                decomposer.check(group_spec)
            except MuscoError as exc:
                problems.append(f"{path}: {exc}")
                continue
            selector = self.registry.rank_selectors.get(layer.rank_selection)
            reason = selector.check_layer(layer.rank_params, decomposer, group_sources[0],
                                          layer.curr_compr_iter + settings.nglobal_compress_iters)
            if reason:
                problems.append(f"{path}: {reason}")
        if problems:
            raise ConfigError("\n".join(f"model_compr_kwargs: {problem}" for problem in problems))

    def compression_step(self) -> list[LayerResult]:
        """Compresses the next group of layers. All of them are swapped in together, or none on failure."""
        if self.done:
            raise MuscoError(f"compression is done: all {self.niters} steps were taken")
        names = self._steps[self.curr_iter]
        paths = module_paths(self.compressed_model)
        replacements, results = [], []
        progress = tqdm(names, desc=f"compression step {self.curr_iter + 1}/{self.niters}", unit="layer",
                        disable=not (self.progress and sys.stderr.isatty()), file=sys.stderr, leave=False)
        for name in progress:
            layer = self.schedule.layers[name]
            module = self.compressed_model.get_submodule(name)
            stats = self.model_stats.layers.get(name)
            try:
                new, result = compress_layer(module, name, layer, self.schedule.settings, self.registry,
                                             stats.input_shape if stats else None)
            except MuscoError as exc:
                raise CompressionError(f"layer {name!r}: {exc}; the model was left as before this step") from exc
            except Exception as exc:  # a plugin's bug must not leave the model half-compressed either
                raise CompressionError(f"layer {name!r}: {type(exc).__name__}: {exc}; the model was left as "
                                       f"before this step") from exc
            replacements.append((name, module, new))
            results.append(result)
        layers = dict(self.schedule.layers)
        for (name, module, new), result in zip(replacements, results):
            if new is not None:
                for path in paths[id(module)]:
                    replace_module(self.compressed_model, path, new)
                self.ranks[name] = result.ranks
            layers[name] = attrs.evolve(layers[name], curr_compr_iter=layers[name].curr_compr_iter + 1)
        self.schedule = attrs.evolve(self.schedule, layers=layers)
        self.history.extend(results)
        self.curr_iter += 1
        applied = sum(r.applied for r in results)
        log.info("compression step %d/%d: %d of %d layers compressed", self.curr_iter, self.niters, applied,
                 len(results))
        return results
