"""The ``Compressor`` facade, compatible with the original musco-pytorch API."""
from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import yaml
from torch import nn
from tqdm.auto import tqdm

from .calibration import InputStats, check_reiterable, collect_input_stats
from .config import generate_model_compr_kwargs
from .components import LayerChoice, ModelTotals
from .engine import LayerResult, compress_layer, read_layer, split_groups
from .errors import CompressionError, ConfigError, MuscoError
from .factors import layer_layout
from .registry import Registry, default_registry
from .report import BudgetRecord, CompressionReport
from .schedule import ModelSchedule, ScheduleCodec, key_path, read_yaml, write_text_atomic
from .stats import ModelStats, as_model_stats
from .surgery import by_canonical_name, module_paths, replace_module, tied_parameters

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
    ``calibration_data`` (a list or DataLoader of input batches, see :mod:`musco_core.calibration`) is required by
    data-aware decompositions such as ``whitened_svd``: at each step the input statistics of the step's layers
    that use one are collected on the model as it is then.
    ``evaluate(model) -> float`` is an optional loss on a few batches (lower is better) for whole-model rank
    selectors: before each of their passes every layer is compressed alone at half its ranks and the loss measured,
    so layers that hurt the model more get a larger share of the budget (a sensitivity pass).
    """

    def __init__(self, model: nn.Module, model_stats: Any = None, model_compr_kwargs: Any = None,
                 ft_every: int = 1, nglobal_compress_iters: int | None = None, all_algo_kwargs: Any = None,
                 config_type: str = "none", *, example_input: Any = None, inplace: bool = False,
                 seed: int = 0, registry: Registry | None = None, progress: bool = True,
                 calibration_data: Any = None, evaluate: Callable[[nn.Module], float] | None = None) -> None:
        self.registry = registry or default_registry()
        self.progress = progress
        self.evaluate = evaluate
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
        schedule = self._validate_against_model(schedule)
        self.calibration_data = self._check_calibration(schedule, calibration_data)
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
        #: What whole-model rank selectors planned, one entry per selector and pass.
        self.budgets: list[BudgetRecord] = []
        self._allocated: dict[str, tuple[int, ...] | None] = {}  # ranks for the layers' next compression
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
                 "params_before": self._params_before,
                 "allocated": {name: None if ranks is None else list(ranks) for name, ranks in self._allocated.items()}}
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
               registry: Registry | None = None, progress: bool = True, calibration_data: Any = None
               ) -> Compressor:
        """A compressor that continues a run from the newest state :meth:`save_state` wrote in ``directory``.

        ``model`` is a fresh, uncompressed instance of the architecture; it is not modified. A resumed run ends
        with the same ranks and weights as an uninterrupted one with the same schedule and seed (and, for
        data-aware decompositions, the same ``calibration_data``).
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
                         example_input=example_input, inplace=True, registry=registry, progress=progress,
                         calibration_data=calibration_data)
        if compressor._steps != state["steps"]:
            raise ConfigError(f"{origin}: the saved plan of steps does not match its schedule")
        compressor.schedule = codec.structure(state["schedule"], f"{origin}: schedule")
        compressor.curr_iter = state["curr_iter"]
        compressor._params_before = state["params_before"]
        compressor._allocated = {name: None if ranks is None else tuple(ranks)
                                 for name, ranks in (state.get("allocated") or {}).items()}
        saved_report = read_report(step_dir)
        compressor.history = list(saved_report.layers)
        compressor.budgets = list(saved_report.budgets)
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
            if None in current.values():  # a compressed layer the statistics do not count: totals unknown
                macs_before = None
            else:
                macs_after = sum(current.values())
        return CompressionReport(list(self.history), self._params_before,
                                 sum(p.numel() for p in self.compressed_model.parameters()), macs_before, macs_after,
                                 list(self.budgets))

    def _validate_against_model(self, schedule: ModelSchedule) -> ModelSchedule:
        """The schedule with each layer under its canonical name; a ConfigError naming every problem."""
        layers, clashes = by_canonical_name(schedule.layers, self.compressed_model)
        problems = [f"{key_path('$.layers', second)}: names the same module as {first!r}; name it once"
                    for first, second in clashes]
        schedule = attrs.evolve(schedule, layers=layers)
        modules = dict(self.compressed_model.named_modules())
        settings = schedule.settings
        for name, layer in schedule.layers.items():
            path = key_path("$.layers", name)
            if layer is None:
                continue
            if name not in modules or not name:
                problems.append(f"{path}: no layer of that name in {type(self.compressed_model).__name__}")
                continue
            if name in self.model_stats.excluded:
                problems.append(f"{path}: cannot be compressed: {self.model_stats.excluded[name]}")
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
        return schedule

    def _needs_input_stats(self, schedule: ModelSchedule, names) -> list[str]:
        return [name for name in names if schedule.layers[name] is not None
                and self.registry.decompositions.get(schedule.layers[name].decomposition).needs_input_stats]

    def _check_calibration(self, schedule: ModelSchedule, calibration_data: Any) -> Any:
        """``calibration_data`` checked against the schedule: required exactly when a decomposition needs it."""
        needing = self._needs_input_stats(schedule, schedule.compressed_layers())
        if calibration_data is None:
            if needing:
                raise ConfigError(f"calibration_data: layer(s) {', '.join(map(repr, needing))} use data-aware "
                                  f"decompositions that need the layers' input statistics; pass calibration_data, "
                                  f"a list or DataLoader of input batches")
            return None
        check_reiterable(calibration_data, "calibration_data")
        if not needing:
            log.info("calibration_data is not used: no layer of the schedule uses a data-aware decomposition")
        return calibration_data

    def _input_stats(self, names) -> dict[str, InputStats]:
        """Input statistics of this step's layers that need them, on the model as it is now."""
        needing = self._needs_input_stats(self.schedule, names)
        if not needing:
            return {}
        specs = {name: read_layer(self.compressed_model.get_submodule(name), self.registry, name)[1].spec
                 for name in needing}
        return collect_input_stats(self.compressed_model, specs, self.calibration_data, progress=self.progress)

    def compression_step(self) -> list[LayerResult]:
        """Compresses the next group of layers. All of them are swapped in together, or none on failure."""
        if self.done:
            raise MuscoError(f"compression is done: all {self.niters} steps were taken")
        names = self._steps[self.curr_iter]
        input_stats = self._input_stats(names)
        paths = module_paths(self.compressed_model)
        tied = tied_parameters(self.compressed_model, names)
        replacements, results = [], []
        allocated_before, budgets_before = dict(self._allocated), list(self.budgets)
        progress = tqdm(names, desc=f"compression step {self.curr_iter + 1}/{self.niters}", unit="layer",
                        disable=not (self.progress and sys.stderr.isatty()), file=sys.stderr, leave=False)
        for name in progress:
            layer = self.schedule.layers[name]
            module = self.compressed_model.get_submodule(name)
            stats = self.model_stats.layers.get(name)
            try:
                self._allocate(name, dict(zip(names, zip(replacements, results))), input_stats)
            except MuscoError:
                self._allocated, self.budgets = allocated_before, budgets_before
                raise
            allocated = {}
            if name in self._allocated:
                ranks = self._allocated.pop(name)
                allocated = {"ranks": ranks} if ranks is not None else {
                    "keep_note": f"kept as is: the {layer.rank_selection} allocation leaves it at this pass"}
            if name in tied and not layer.force:
                allocated = {"keep_note": f"kept as is: its weights are tied to {', '.join(tied[name])}, which "
                                          f"stay, so factorizing it would add weights (force: true does it anyway "
                                          f"and unties them)"}
            try:
                new, result = compress_layer(module, name, layer, self.schedule.settings, self.registry,
                                             stats.input_shape if stats else None,
                                             input_stats=input_stats.get(name), **allocated)
            except Exception as exc:  # a plugin's bug must not leave the model half-compressed either
                self._allocated, self.budgets = allocated_before, budgets_before
                reason = str(exc) if isinstance(exc, MuscoError) else f"{type(exc).__name__}: {exc}"
                raise CompressionError(f"layer {name!r}: {reason}; the model was left as before this step") from exc
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

    def _allocate(self, name: str, pending: dict[str, tuple[tuple[str, nn.Module, nn.Module | None], LayerResult]],
                  step_stats: dict[str, InputStats]) -> None:
        """Runs a whole-model rank selector for the pass ``name`` is in, unless its ranks are allocated already.

        A pass holds every layer using the selector at the same stage: the allocation sees them together, on the
        model as it is now (with this step's ``pending`` replacements), and fixes their ranks until each is
        compressed. ``step_stats`` are the input statistics already collected for this step's layers.
        """
        layer = self.schedule.layers[name]
        selector = self.registry.rank_selectors.get(layer.rank_selection)
        if selector.scope != "model" or name in self._allocated:
            return
        settings = self.schedule.settings

        def stage(other: str) -> int:  # a layer compressed earlier in this step is one stage on
            return self.schedule.layers[other].curr_compr_iter + (other in pending)

        members = [other for other in self.lnames if self.schedule.layers[other].rank_selection == selector.name
                   and stage(other) == layer.curr_compr_iter]

        def current(other: str) -> nn.Module:  # the layer as this step leaves it so far
            if other not in pending:
                return self.compressed_model.get_submodule(other)
            (_, before, after), _ = pending[other]
            return before if after is None else after

        # data-aware decompositions' spectra and probes need input statistics: collect only the missing ones
        input_stats = {**step_stats, **self._input_stats([other for other in members if other not in step_stats])}
        choices = [self._layer_choice(other, current(other), input_stats.get(other)) for other in members]
        if self.evaluate is not None:
            sensitivity = self._sensitivities(choices, input_stats)
            choices = [attrs.evolve(choice, sensitivity=sensitivity[choice.name]) for choice in choices]
        report = self.report()
        saved_params = sum(sum(p.numel() for p in module.parameters()) - sum(p.numel() for p in new.parameters())
                           for (_, module, new), _ in pending.values() if new is not None)
        saved_macs = sum(r.macs_before - r.macs_after for _, r in pending.values() if r.macs_before is not None)
        totals = ModelTotals(report.params_before, report.params_after - saved_params, report.macs_before,
                             None if report.macs_after is None else report.macs_after - saved_macs)
        pass_index = layer.curr_compr_iter - self.initial_schedule.layers[name].curr_compr_iter
        params = settings.algo_kwargs.get(selector.name) or selector.Params()
        try:
            allocation = selector.allocate(choices, totals, pass_index, settings.nglobal_compress_iters, params,
                                           settings.rank_multiple)
        except MuscoError as exc:
            raise CompressionError(f"rank selection {selector.name!r}: {exc}; the model was left as before "
                                   f"this step") from exc
        missing = set(members) - set(allocation.ranks)
        if missing:
            raise CompressionError(f"rank selection {selector.name!r} allocated no ranks for {sorted(missing)}; "
                                   f"the model was left as before this step")
        if allocation.note:
            log.warning("%s: %s", selector.name, allocation.note)
        self.budgets.append(BudgetRecord(selector.name, pass_index, settings.nglobal_compress_iters,
                                         allocation.metric, allocation.target, allocation.planned, allocation.note))
        self._allocated.update({member: allocation.ranks[member] for member in members})

    def _layer_choice(self, name: str, module: nn.Module, input_stats: InputStats | None) -> LayerChoice:
        _, source, _ = read_layer(module, self.registry, name)
        source.input_stats = input_stats
        _, group_sources = split_groups(source)
        stats = self.model_stats.layers.get(name)
        current = tuple(f.layout for f in source.factors) if source.factors else tuple(layer_layout(source.spec))
        return LayerChoice(name, self.registry.decompositions.get(self.schedule.layers[name].decomposition),
                           source.spec, tuple(group_sources), current, stats.input_shape if stats else None)

    def _sensitivities(self, choices: list[LayerChoice], input_stats: dict[str, InputStats]) -> dict[str, float]:
        """Loss growth per unit of relative squared weight error of each layer, compressed alone at half its
        ranks, relative to the mean over the layers (floored at 1% of it; 1.0 where nothing was measured)."""
        settings = self.schedule.settings
        paths = module_paths(self.compressed_model)
        base = float(self.evaluate(self.compressed_model))
        measured: dict[str, float] = {}
        for choice in tqdm(choices, desc="sensitivity pass", unit="layer", leave=False, file=sys.stderr,
                           disable=not (self.progress and sys.stderr.isatty())):
            module = self.compressed_model.get_submodule(choice.name)
            probe = tuple(max(choice.decomposer.min_rank, limit // 2)
                          for limit in choice.decomposer.max_ranks(choice.sources[0]))
            layer = attrs.evolve(self.schedule.layers[choice.name], force=True)
            try:
                new, result = compress_layer(module, choice.name, layer, settings, self.registry, choice.input_shape,
                                             ranks=probe, input_stats=input_stats.get(choice.name))
            except MuscoError as exc:
                raise CompressionError(f"layer {choice.name!r}: sensitivity pass: {exc}; the model was left as "
                                       f"before this step") from exc
            if new is None or not result.relative_error:
                continue
            try:
                for path in paths[id(module)]:
                    replace_module(self.compressed_model, path, new)
                loss = float(self.evaluate(self.compressed_model))
            finally:
                for path in paths[id(module)]:
                    replace_module(self.compressed_model, path, module)
            measured[choice.name] = max(loss - base, 0.0) / result.relative_error ** 2
            log.debug("sensitivity of %r: loss %.4g -> %.4g at ranks %s", choice.name, base, loss, probe)
        mean = sum(measured.values()) / len(measured) if measured else 0.0
        if mean <= 0:
            return {choice.name: 1.0 for choice in choices}
        return {choice.name: max(measured.get(choice.name, mean) / mean, 0.01) for choice in choices}
