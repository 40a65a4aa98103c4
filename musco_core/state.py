"""The state of a multi-stage run as one frozen value, and its versioned YAML form.

A run is a plan of steps over the layers of a schedule; :class:`RunState` holds everything a run needs to continue
(and nothing it can derive): the schedule as the run began, the plan, the index of the next step, the ranks a
whole-model selector allocated for compressions still to come, every layer compression so far and the budgets'
plans. The current schedule (each layer's ``curr_compr_iter``) and the current ranks are derived from it.

:class:`StateCodec` writes and reads it as plain data. Reading checks every field's type and bounds, and reports
every problem at once as ``origin: $.path: what was expected``; :func:`musco_core.run.check_resumable` then checks
the state against the schedule and the model it is resumed on.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import cattrs
from torch import nn

from .engine import LayerResult
from .errors import ConfigError, short_repr
from .report import BudgetRecord
from .schedule import (ModelSchedule, NonNegativeInt, PositiveInt, ScheduleCodec, ValueProblem, make_converter,
                       plain_data, validation_problems)
from .stats import ModelStats

#: Version of the state's YAML form; 1 was musco-core 0.1's ``state.yaml``, which cannot be resumed. 3 added the
#: budgets' ``measured`` speed-up; a state of format 2 (which has none) is read as it is. 4 added the fingerprint of
#: the model's weights when the run began, which a state of format 4 or later must have; a state without one (format
#: 2 or 3) resumes without that check, and a run resumed from one is saved in format 3 again (it has no fingerprint to
#: record). 5 added the example input's dtypes and shapes; a state without them (format 2 to 4) resumes without that
#: check. 6 added the run's other inputs (``inputs``: calibration data, fine-tuning, sensitivity evaluation, and
#: since then the plugins of the components the schedule uses, see :func:`musco_core.run.component_inputs`) and
#: the changes a resume was allowed to make to them (``inputs_changed``); a state of format 6 must record them, one
#: without (format 2 to 5) resumes without that check and records the inputs given to the resume from then on.
STATE_FORMAT = 6
RESUMABLE_STATE_FORMATS = (2, 3, 4, 5, 6)
#: The first format that records the run's inputs.
INPUTS_STATE_FORMAT = 6
#: The newest format without the fingerprint.
UNFINGERPRINTED_STATE_FORMAT = 3

Ranks = tuple[int, ...]


@attrs.frozen
class Allocated:
    """The decomposition and ranks a whole-model selector chose for a layer's compression still to come."""

    decomposition: str
    ranks: Ranks


@attrs.frozen
class RunInput:
    """Something besides the schedule, the model and the example input that shapes a run's result: ``value``
    identifies it and is compared when the run is resumed (a calibration file's content hash and batch size, a
    fine-tuning callable's name, or just whether one was given); ``source`` says where it came from, shown but not
    compared (the same file moved is the same input)."""

    value: str
    source: str | None = None

    def describe(self) -> str:
        return self.value if self.source is None else f"{self.value} ({self.source})"


@attrs.frozen
class RunState:
    """Where a multi-stage run stands; a compression step maps it (and the model) to the next one.

    ``steps`` is the plan (lists of layer names compressed together), ``next_step`` the index of the step to take
    next, ``allocated`` the decomposition and ranks a whole-model rank selector chose for layers whose compression
    in the current pass is still to come (None keeps the layer as it is at that pass), ``history`` one :class:`LayerResult` per
    layer compression taken, in order, and ``budgets`` the whole-model selectors' plans. ``params_before`` is the
    model's parameter count when the run began; ``run_id`` tells this run's files from another run's;
    ``model_fingerprint`` tells the weights the run began with from others (None in a state written before it was
    recorded), so that a run is never resumed on another model; ``example_input`` describes the dtypes and shapes of
    the example input the run began with (:func:`musco_core.stats.describe_input`, ``"none"`` without one; None in a
    state written before it was recorded), so that a report never adds up MACs counted on two inputs. ``inputs``
    records the run's other inputs (:class:`RunInput` by name; None in a state written before they were recorded),
    so that a run is never finished with other calibration data or fine-tuning than it began with unless the resume
    allows it, and ``inputs_changed`` says which changes resumes allowed, and from which step (for the report).
    """

    run_id: str
    initial_schedule: ModelSchedule
    steps: tuple[tuple[str, ...], ...]
    params_before: int
    next_step: int = 0
    allocated: Mapping[str, Allocated | None] = attrs.field(factory=dict)
    history: tuple[LayerResult, ...] = ()
    budgets: tuple[BudgetRecord, ...] = ()
    #: Layers the run leaves out, with why (see :attr:`CompressionReport.left_out`).
    left_out: Mapping[str, str] = attrs.field(factory=dict)
    model_fingerprint: str | None = None
    example_input: str | None = None
    inputs: Mapping[str, RunInput] | None = attrs.field(factory=dict)
    inputs_changed: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.next_step >= len(self.steps)

    @property
    def layer_names(self) -> list[str]:
        """The layers the run compresses, in schedule order."""
        return self.initial_schedule.compressed_layers()

    def stages_taken(self) -> dict[str, int]:
        """How many times each layer was compressed (or kept) by the steps taken so far."""
        taken = dict.fromkeys(self.layer_names, 0)
        for step in self.steps[:self.next_step]:
            for name in step:
                taken[name] += 1
        return taken

    @property
    def schedule(self) -> ModelSchedule:
        """The schedule as it stands: each layer's ``curr_compr_iter`` counts the stages taken so far (also those
        that kept the layer as it was)."""
        taken = self.stages_taken()
        layers = {name: layer if layer is None else
                  attrs.evolve(layer, curr_compr_iter=layer.curr_compr_iter + taken[name])
                  for name, layer in self.initial_schedule.layers.items()}
        return attrs.evolve(self.initial_schedule, layers=layers)

    @property
    def ranks(self) -> dict[str, Ranks | None]:
        """Each layer's ranks after its last applied compression (None while it was never compressed)."""
        ranks: dict[str, Ranks | None] = dict.fromkeys(self.layer_names)
        for result in self.history:
            if result.applied:
                ranks[result.name] = result.ranks
        return ranks


@attrs.frozen(eq=False)
class RunContext:
    """What a step uses besides the model and the state, and that is not saved with it: the components, the
    model's layer statistics on the example input, the calibration batches of data-aware decompositions, an
    optional ``evaluate(model) -> loss`` for sensitivity passes, and whether to show progress bars; the example
    input and the timer (a :class:`musco_core.latency.Timer`; None: the default) for selectors that measure
    latency; ``began_factorized``, the factor layouts of the layers that were factor chains when the run began (a
    model compressed before it), as which a latency budget times them "as the run began"."""

    registry: Any
    model_stats: ModelStats
    calibration_data: Any = None
    evaluate: Callable[[nn.Module], float | None] | None = None
    progress: bool = True
    example_input: Any = None
    latency_timer: Any = None
    began_factorized: Mapping[str, tuple] = attrs.field(factory=dict)


@attrs.frozen
class _StateDocument:
    """The typed fields of a state's YAML form, checked by cattrs (the schedule is checked by its own codec)."""

    format: int
    run_id: str
    initial_schedule: dict
    steps: list[list[str]]
    next_step: NonNegativeInt
    params_before: PositiveInt
    allocated: dict[str, Allocated | None]
    history: list[LayerResult]
    budgets: list[BudgetRecord]
    left_out: dict[str, str] = attrs.field(factory=dict)
    model_fingerprint: str | None = None
    example_input: str | None = None
    inputs: dict[str, RunInput] | None = None
    inputs_changed: list[str] = attrs.field(factory=list)


class StateCodec:
    """Converts run states to and from plain data; reading checks types and bounds and names every problem."""

    def __init__(self, registry) -> None:
        self.schedules = ScheduleCodec(registry)
        self.converter = make_converter()
        self.converter.register_structure_hook_func(lambda kind: kind == tuple[int, ...], self._ranks)  # ranks

    @staticmethod
    def _ranks(value: Any, _type=None) -> tuple[int, ...]:
        if isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            return tuple(value)
        raise ValueProblem(f"expected a non-empty list of positive ints, got {short_repr(value)}")

    def unstructure(self, state: RunState) -> dict[str, Any]:
        return {
            "format": UNFINGERPRINTED_STATE_FORMAT if state.model_fingerprint is None else
            STATE_FORMAT if state.inputs is not None else INPUTS_STATE_FORMAT - 1,
            "run_id": state.run_id,
            "next_step": state.next_step,
            "params_before": state.params_before,
            "initial_schedule": self.schedules.unstructure(state.initial_schedule),
            "steps": [list(step) for step in state.steps],
            "allocated": {name: None if chosen is None else {"decomposition": chosen.decomposition,
                                                             "ranks": list(chosen.ranks)}
                          for name, chosen in state.allocated.items()},
            "history": plain_data([attrs.asdict(result, recurse=False) for result in state.history]),
            "budgets": [attrs.asdict(record) for record in state.budgets],
            "left_out": dict(state.left_out),
            "model_fingerprint": state.model_fingerprint,
            "example_input": state.example_input,
            "inputs": None if state.inputs is None else {name: attrs.asdict(given)
                                                         for name, given in state.inputs.items()},
            "inputs_changed": list(state.inputs_changed),
        }

    def structure(self, data: Any, origin: str) -> RunState:
        """A state from its YAML form; a ConfigError lists every problem with its path."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin}: $: expected a musco-core run state (a mapping), got {type(data).__name__}")
        found = data.get("format")
        if found not in RESUMABLE_STATE_FORMATS:
            formats = ", ".join(map(str, RESUMABLE_STATE_FORMATS[:-1])) + f" or {RESUMABLE_STATE_FORMATS[-1]}"
            raise ConfigError(f"{origin}: $.format: expected {formats} (a run state this musco-core can resume), got "
                              f"{short_repr(found)}; a state of another version cannot be resumed")
        try:
            document = self.converter.structure(dict(data), _StateDocument)
        except (cattrs.BaseValidationError, ValueProblem) as exc:
            raise ConfigError("\n".join(f"{origin}: {line}" for line in validation_problems(exc))) from None
        problems = []
        if not document.run_id:
            problems.append("$.run_id: expected a non-empty string")
        if any(not step for step in document.steps):
            problems.append("$.steps: expected non-empty lists of layer names")
        if found > UNFINGERPRINTED_STATE_FORMAT and document.model_fingerprint is None:
            got = "null" if "model_fingerprint" in data else "nothing"
            problems.append(f"$.model_fingerprint: expected the hash of the model's weights the run began with (a "
                            f"string), which a state of format {found} records, got {got}")
        if found >= INPUTS_STATE_FORMAT and document.inputs is None:
            got = "null" if "inputs" in data else "nothing"
            problems.append(f"$.inputs: expected the inputs the run began with (a mapping), which a state of format "
                            f"{found} records, got {got}")
        if problems:
            raise ConfigError("\n".join(f"{origin}: {problem}" for problem in problems))
        schedule = self.schedules.structure(document.initial_schedule, f"{origin}: $.initial_schedule")
        return RunState(document.run_id, schedule, tuple(tuple(step) for step in document.steps),
                        document.params_before, document.next_step,
                        document.allocated,
                        tuple(document.history), tuple(document.budgets), document.left_out,
                        document.model_fingerprint, document.example_input, document.inputs,
                        tuple(document.inputs_changed))
