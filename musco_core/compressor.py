"""The ``Compressor`` facade, compatible with the original musco-pytorch API, over the step function of
:mod:`musco_core.run`."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from . import distributed, io
from .allocation import check_model_inputs
from .config import generated_layers
from .engine import LayerResult
from .errors import ConfigError, short_repr
from .registry import Registry, default_registry
from .report import BudgetRecord, CompressionReport
from .run import (build_report, check_calibration, check_resumable, check_same_example, check_same_model,
                  checked_schedule, component_inputs, run_step, start_run, with_inputs)
from .schedule import ModelSchedule, ScheduleCodec, read_yaml
from .state import RunContext, RunInput, RunState
from .stats import ModelStats, as_model_stats
from .surgery import deep_copy, factor_layouts, layer_aliases, on_meta, state_problem, unwrapped

log = logging.getLogger(__name__)


def _refuse_run_arguments(arguments: dict[str, tuple[Any, Any, str]], config_type: Any) -> None:
    """With a full schedule, whose settings and layers apply: one ConfigError naming each argument that the run
    would ignore, ``{argument: (value, default, setting)}``: any not its default value of its default type
    (``ft_every=True`` is no ``1``), and a ``config_type`` other than ``none``."""
    problems = [f"Compressor({name}=...): model_compr_kwargs is a full schedule, whose $.settings.{setting} applies: "
                f"set it there, not as an argument (got {short_repr(value)})"
                for name, (value, default, setting) in arguments.items()
                if type(value) is not type(default) or value != default]
    if config_type != "none":
        problems.append(f"Compressor(config_type=...): model_compr_kwargs is a full schedule, whose $.layers apply: "
                        f"leave config_type at 'none' (it fills in the layers of an original {{layer: settings}} "
                        f"dict), or write the generated layers into the schedule (got {short_repr(config_type)})")
    if problems:
        raise ConfigError("\n".join(problems))


def _original_layers(model: nn.Module, stats: ModelStats, given: Any, config_type: str, registry: Registry
                     ) -> tuple[Any, dict[str, str]]:
    """The original's ``model_compr_kwargs`` for a ``{layer: settings or None}`` dict (or None): every layer generated
    for ``config_type``, updated with ``given`` (its entry for a module replaces the generated one, None leaving the
    layer out), in model order as the original's ``model_stats`` listed them, so steps take the layers in that order
    whatever order the dict has; and ``{layer: why it is left out}`` for the layers the dict does not name. Anything
    but a mapping is returned as it is, for the schedule check to refuse."""
    if given is not None and not isinstance(given, Mapping):
        return given, dict(stats.excluded)
    aliases = layer_aliases(model)
    named = {aliases.get(name, name) for name in given or {}}
    if given is None or config_type != "none":
        generated, reasons = generated_layers(stats, config_type, registry=registry)
    else:
        generated, reasons = {}, dict(stats.excluded)
    layers = {**{name: layer for name, layer in generated.items() if name not in named}, **(given or {})}
    position = {name: index for index, name in
                enumerate(stats.in_model_order(dict.fromkeys(aliases.get(name, name) for name in layers)))}
    ordered = dict(sorted(layers.items(), key=lambda item: position[aliases.get(item[0], item[0])]))
    return ordered, {name: reason for name, reason in reasons.items() if name not in named}


def _run_inputs(calibration_data: Any, evaluate: Any, inputs: Mapping[str, RunInput | str] | None,
                components: Mapping[str, RunInput]) -> dict[str, RunInput]:
    """What the state records of a run's other inputs (see :func:`~musco_core.run.with_inputs`): whether
    calibration data and an evaluation were given (their contents are not hashed: a DataLoader may be any size), the
    plugins of the ``components`` the schedule uses (:func:`~musco_core.run.component_inputs`), and the caller's own
    ``inputs`` (a string for a :class:`RunInput`'s value), which may replace them."""
    recorded = {"calibration_data": RunInput("none" if calibration_data is None else "batches"),
                "evaluate": RunInput("none" if evaluate is None else "a callable"), **components}
    return {**recorded, **{str(name): value if isinstance(value, RunInput) else RunInput(str(value))
                           for name, value in (inputs or {}).items()}}


def _check_materialized(model: nn.Module) -> None:
    """One ConfigError when the model's weights hold no values yet: lazy parameters (shapes unknown until a
    forward pass), or tensors on the ``meta`` device (shapes alone, as a model built under ``torch.device('meta')``
    has before its weights are loaded)."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise ConfigError(f"{type(model).__name__} has uninitialized (lazy) parameters; run one forward pass "
                          f"before compressing it")
    if meta := on_meta(model):
        raise ConfigError(f"{meta}, which hold no values "
                          f"to decompose: load its weights first (model.to_empty(device=...) then load_state_dict, "
                          f"or load_state_dict(..., assign=True)), or compress it with compress_blockwise and a "
                          f"checkpoint")


def _check_plain(model: nn.Module) -> None:
    """One ConfigError for a model whose layers no step can replace or whose state no run can save: a TorchScript
    module (``torch.jit.script`` or ``trace``: its compiled code calls its own layers, and no layer of it is read as
    a Conv or Linear, so a run would silently compress nothing), a graph of ATen operators (``torch.export``: no
    layers either, and its ``eval()`` raises), or state entries that are not plain tensors (quantized modules, such
    as ``torch.ao.quantization.quantize_dynamic``'s packed parameters, or a module's ``get_extra_state``)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(f"the model is a TorchScript {type(model).__name__} (torch.jit.script or trace), whose "
                          f"compiled code calls its own layers, which cannot be replaced: compress the Python "
                          f"nn.Module, then script or trace the result")
    if isinstance(model, torch.fx.GraphModule) and any(isinstance(node.target, torch._ops.OpOverload)
                                                       for node in model.graph.nodes):
        raise ConfigError("the model is a graph of ATen operators (as torch.export's ExportedProgram.module() gives), "
                          "which computes with its weights directly and calls no layer that could be replaced: "
                          "compress the nn.Module, then export the result")
    if (problem := state_problem(model)) is not None:
        raise ConfigError(problem)


class Compressor:
    """Multi-stage compression: call :meth:`compression_step` until :attr:`done`, fine-tuning in between.

    ``model_compr_kwargs`` is the original ``{layer: settings or None}`` dict (never modified) or a
    :class:`ModelSchedule`. As in the original, the dict updates the layers generated from ``model_stats`` with
    ``config_type`` (none by default), and the layers are compressed in model order whatever order the dict lists
    them in; ``ft_every=None`` (or 0, as in the original) compresses them all in one step, and
    ``nglobal_compress_iters=None`` (or 0) compresses each layer once.
    ``model_stats`` may be a ``flopco.FlopCo`` object or :class:`ModelStats`; when omitted the statistics are
    computed from ``example_input`` (or, without it, from the model's layers alone, with no MAC counts).
    The input model is deep-copied unless ``inplace=True``. A progress bar goes to stderr when it is a terminal
    and ``progress`` is true. With a full schedule (a ``ModelSchedule`` or a dict with ``version``) its own settings
    apply and ``ft_every``, ``nglobal_compress_iters``, ``all_algo_kwargs`` and ``seed`` must be left at their
    defaults (``ft_every=True`` is refused, not taken for ``1``).
    ``calibration_data`` (a list or DataLoader of input batches, see :mod:`musco_core.calibration`) is required by
    data-aware decompositions such as ``whitened_svd``: at each step the input statistics of the step's layers
    that use one are collected on the model as it is then.
    ``evaluate(model) -> float`` is an optional loss on a few batches (lower is better) for whole-model rank
    selectors: before each of their passes every layer is compressed alone at half its ranks and the loss measured
    (in eval mode, each module's mode put back after), so layers that hurt the model more get a larger share of the
    budget (a sensitivity pass). In a distributed job
    a rank whose evaluation data is empty returns None, and the ranks' losses are averaged over the others.
    ``inputs`` names what else shapes the run that the Compressor cannot see (``{"finetune": "my_training v2"}``;
    the command line records its calibration file's hash and its fine-tuning there): the state records them with
    whether ``calibration_data`` and ``evaluate`` were given, and :meth:`resume` refuses other ones.

    The run's progress is one value, :attr:`state` (a :class:`~musco_core.state.RunState`); each step maps it
    and the model to the next ones, so a failing step changes neither.

    A step replaces layers by new modules with new parameters: build the optimizer anew after each step, or it
    goes on training the parameters of the layers that are gone and never the new ones. ``compressed_model`` may
    be set to the model wrapped by ``torch.compile``, ``nn.DataParallel`` or ``DistributedDataParallel`` for
    fine-tuning: steps and saves work on the module inside (which keeps the schedule's layer names) and leave the
    wrapper in place; wrap the model again after each step, as a wrapper built before it tracks the old parameters.
    A model given wrapped (to the constructor or :meth:`resume`) is compressed as the module inside, which
    ``compressed_model`` then is.

    Inside a ``torch.distributed`` job every rank builds its own Compressor over its replica, with its own shard of
    ``calibration_data`` (and an ``evaluate`` on its own shard), and takes the steps together: see
    :mod:`musco_core.distributed`.
    """

    def __init__(self, model: nn.Module, model_stats: Any = None, model_compr_kwargs: Any = None,
                 ft_every: int | None = 1, nglobal_compress_iters: int | None = None, all_algo_kwargs: Any = None,
                 config_type: str = "none", *, example_input: Any = None, inplace: bool = False,
                 seed: int = 0, registry: Registry | None = None, progress: bool = True,
                 calibration_data: Any = None, evaluate: Callable[[nn.Module], float | None] | None = None,
                 inputs: Mapping[str, RunInput | str] | None = None) -> None:
        # checked on every rank before the first collective (start_run's): a rank refusing alone would leave the
        # others failing on a dropped connection
        with distributed.agreement(distributed.current(), "checking the Compressor's arguments"):
            registry = registry or default_registry()
            model = unwrapped(model)  # the schedule names the layers of the module inside, as steps and saves do
            _check_materialized(model)
            _check_plain(model)
            model = model if inplace else deep_copy(model, "Compressor copies the model unless inplace=True",
                                                      "or pass inplace=True to compress the model itself")
            stats = as_model_stats(model_stats, model, registry, example_input)
            carries_settings = isinstance(model_compr_kwargs, ModelSchedule) or (
                isinstance(model_compr_kwargs, Mapping) and "version" in model_compr_kwargs)
            if carries_settings:
                _refuse_run_arguments({"ft_every": (ft_every, 1, "ft_every"), "seed": (seed, 0, "seed"),
                                       "nglobal_compress_iters": (nglobal_compress_iters, None,
                                                                  "nglobal_compress_iters"),
                                       "all_algo_kwargs": (all_algo_kwargs, None, "algo_kwargs")}, config_type)
                left_out = dict(stats.excluded)
            else:
                model_compr_kwargs, left_out = _original_layers(model, stats, model_compr_kwargs, config_type, registry)
            # None is the default (ft_every's: every layer in one step, set below), and so is 0, as in the original
            # (which took any false value for it); False or [] are checked, and refused
            ft_every, nglobal_compress_iters = (None if type(value) is int and value == 0 else value
                                                for value in (ft_every, nglobal_compress_iters))
            settings = {"ft_every": 1 if ft_every is None else ft_every, "seed": seed,
                        "nglobal_compress_iters": 1 if nglobal_compress_iters is None else nglobal_compress_iters,
                        "algo_kwargs": {} if all_algo_kwargs is None else all_algo_kwargs}
            schedule = checked_schedule(model, model_compr_kwargs, "model_compr_kwargs", registry, settings, stats)
            if ft_every is None:
                schedule = attrs.evolve(schedule, settings=attrs.evolve(
                    schedule.settings, ft_every=max(1, len(schedule.compressed_layers()))))
            calibration = check_calibration(model, schedule, registry, schedule.compressed_layers(), calibration_data)
            check_model_inputs(schedule, registry, example_input, stats)
        self._attach(model, start_run(model, schedule, registry, left_out, example_input,
                                      _run_inputs(calibration_data, evaluate, inputs,
                                                  component_inputs(model, schedule, registry))),
                     RunContext(registry, stats, calibration, evaluate, progress, example_input,
                                began_factorized=factor_layouts(model)))

    def _attach(self, model: nn.Module, state: RunState, context: RunContext) -> None:
        self.compressed_model = model
        self.state = state
        self.context = context

    @classmethod
    def from_yaml(cls, model: nn.Module, path: str | os.PathLike, model_stats: Any = None, **kwargs: Any
                  ) -> Compressor:
        """A compressor for a YAML schedule file (see :mod:`musco_core.schedule`); every problem of the file, on
        its own and against the model, is reported in one ConfigError naming the file. A file holding an original
        ``{layer: settings}`` dict (no ``version``) is then taken as the constructor takes that dict: its layers in
        model order, the run settings from the arguments."""
        registry = kwargs.pop("registry", None) or default_registry()
        data = read_yaml(path)
        schedule = checked_schedule(model, data, str(path), registry)
        original = isinstance(data, Mapping) and "version" not in data
        return cls(model, model_stats, data if original else schedule, registry=registry, **kwargs)

    def save_state(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Saves what :meth:`resume` needs to continue after the current step in ``directory/step-NNNN``;
        ``directory/LATEST`` names the newest complete one. See :func:`musco_core.io.save_state`. In a distributed
        job rank 0 writes it and the other ranks wait; every rank returns the folder."""
        def save() -> str:
            return str(io.save_state(self.compressed_model, self.state, directory, registry=self.registry,
                                     report=self.report(), overwrite=overwrite))

        return Path(distributed.on_first_rank(distributed.current(), f"saving the run state to {directory}", save))

    @classmethod
    def resume(cls, model: nn.Module, directory: str | os.PathLike, *, example_input: Any = None,
               model_stats: Any = None, registry: Registry | None = None, progress: bool = True,
               calibration_data: Any = None, evaluate: Callable[[nn.Module], float | None] | None = None,
               inputs: Mapping[str, RunInput | str] | None = None, allow_changed_inputs: bool = False
               ) -> Compressor:
        """A compressor that continues a run from the newest state :meth:`save_state` wrote in ``directory``.

        ``model`` is a fresh, uncompressed instance of the architecture with the weights the run began with
        (checked), or, for a run that began on a compressed model, that model as :func:`~musco_core.io.load_compressed`
        gives it; it is not modified. A resumed run ends with the same ranks and weights as an uninterrupted one
        with the same schedule and seed (and, for data-aware decompositions, the same ``calibration_data``). Only the
        compressions still to come are checked against the model, as its layers are now (their ranks, as the run
        checked them, against the layers as the run began: ``model``). ``example_input`` must have
        the dtypes and shapes of the one the run began with (None if it had none): MACs counted on another would be
        added to the run's. A run that counted its MACs from ``model_stats`` without an example input needs the
        same ``model_stats`` again (a run that counted MACs is not resumed without them, nor one that counted none
        with them). Whether ``calibration_data`` and ``evaluate`` are given, and ``inputs``, must be as when the run
        began, or ``allow_changed_inputs`` must be true: then the state and the report record the change and the
        step it applies from (see :func:`~musco_core.run.with_inputs`).
        """
        registry = registry or default_registry()
        model = unwrapped(model)
        _check_materialized(model)
        _check_plain(model)
        with distributed.agreement(distributed.current(), f"resuming from {directory}"):  # all ranks, or none
            restored, state, origin = io.load_state(model, directory, registry)
            check_same_model(model, state, origin)
            check_same_example(state, example_input, origin)
            components = component_inputs(model, state.initial_schedule, registry)  # model: as the run began
            state = with_inputs(state, _run_inputs(calibration_data, evaluate, inputs, components), origin,
                                allow_changed=allow_changed_inputs, recorded_later=components)
            stats = as_model_stats(model_stats, restored, registry, example_input)
            check_resumable(restored, state, registry, stats, origin, began=model)
        distributed.on_first_rank(distributed.current(), f"removing older states from {directory}",
                                  lambda: io.tidy_checkpoints(directory))
        remaining = [name for name, stages in state.stages_taken().items()
                     if stages < state.initial_schedule.settings.nglobal_compress_iters]
        context = RunContext(registry, stats, check_calibration(restored, state.initial_schedule, registry, remaining,
                                                                calibration_data), evaluate, progress, example_input,
                             began_factorized=factor_layouts(model))  # the model as the run began
        check_model_inputs(state.initial_schedule, registry, example_input, stats)
        compressor = cls.__new__(cls)
        compressor._attach(restored, state, context)
        log.info("resumed from %s after step %d of %d", origin, state.next_step, len(state.steps))
        return compressor

    def compression_step(self) -> list[LayerResult]:
        """Compresses the next group of layers. All of them are swapped in together, or none on failure.

        The new layers have new parameters: build the optimizer (and a ``DistributedDataParallel`` wrapper) anew
        after each step. A wrapper in ``compressed_model`` stays; the module inside it is compressed.
        """
        taken = len(self.state.history)
        _, self.state = run_step(unwrapped(self.compressed_model), self.state, self.context)
        return list(self.state.history[taken:])

    def report(self) -> CompressionReport:
        """What compression did so far: one row per layer and stage, and the model's totals."""
        return build_report(self.compressed_model, self.state, self.model_stats)

    # -- the original's attributes, derived from the state -----------------------------------------------------
    @property
    def registry(self) -> Registry:
        return self.context.registry

    @property
    def model_stats(self) -> ModelStats:
        return self.context.model_stats

    @property
    def schedule(self) -> ModelSchedule:
        """The schedule as it stands, each layer's ``curr_compr_iter`` counting its stages so far (also those that
        kept it as it was; :attr:`history` says which changed it)."""
        return self.state.schedule

    @property
    def initial_schedule(self) -> ModelSchedule:
        return self.state.initial_schedule

    @property
    def lnames(self) -> list[str]:
        """The layers compressed, in schedule order."""
        return self.state.layer_names

    @property
    def ft_every(self) -> int:
        """Layers per step (capped at the number of compressed layers)."""
        every = self.initial_schedule.settings.ft_every
        return min(every, len(self.lnames)) if self.lnames else every

    @property
    def nglobal_compress_iters(self) -> int:
        return self.initial_schedule.settings.nglobal_compress_iters

    @property
    def niters(self) -> int:
        """The number of compression steps."""
        return len(self.state.steps)

    @property
    def curr_iter(self) -> int:
        """The number of steps taken so far."""
        return self.state.next_step

    @property
    def done(self) -> bool:
        """True once every planned step was taken (at once when the schedule compresses no layer)."""
        return self.state.done

    @property
    def ranks(self) -> dict[str, tuple[int, ...] | None]:
        """``{layer: ranks}`` after each layer's last compression (None while not compressed)."""
        return self.state.ranks

    @property
    def history(self) -> list[LayerResult]:
        """One result per layer and stage, in order."""
        return list(self.state.history)

    @property
    def budgets(self) -> list[BudgetRecord]:
        """What whole-model rank selectors planned, one entry per selector and pass."""
        return list(self.state.budgets)

    @property
    def model_compr_kwargs(self) -> dict[str, Any]:
        """The current schedule in the original dict form (a fresh copy, with updated ``curr_compr_iter``)."""
        return {name: ScheduleCodec.unstructure_layer(layer) for name, layer in self.schedule.layers.items()}
