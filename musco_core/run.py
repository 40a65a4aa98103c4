"""A multi-stage run as a function: ``run_step(model, state, context) -> (model, state)``.

:func:`start_run` checks a schedule against the model once, as the model is when the run begins, and plans the
steps. Each :func:`run_step` compresses the next step's layers and either returns the model (with the new layers
swapped in) and the next :class:`~musco_core.state.RunState`, or raises with the model and the state untouched.
:func:`check_resumable` checks a saved state against its schedule and the model it is resumed on, re-validating only
the compressions still to come, against the layers as they are now.
"""
from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .allocation import Pending, allocate_pass, pending_replacements
from .calibration import (TokenMask, check_reiterable, collect_input_stats, collect_output_moments,
                          collect_sequential_stats, layer_dataflow, token_mask)
from .components import Cost, Decomposer, InputStats, ModelTotals
from .engine import (LayerResult, compress_layer, factorized_like, given_copy, layer_specs, read_layer,
                     refuse_changed, split_groups, usable_decompositions)
from .errors import CompressionError, ConfigError, MuscoError, short_repr
from .factors import chain_cost, layer_layout
from .registry import Registry
from .report import BudgetRecord, CompressionReport
from .schedule import LayerSchedule, ModelSchedule, ScheduleCodec, key_path, plain_data
from .state import RunContext, RunInput, RunState, StateCodec
from .stats import NO_EXAMPLE, ModelStats, describe_input
from .latency import Chain, TimedForm, profiler_for
from .surgery import (FactorizedLayer, by_canonical_name, clear_broken_ties, distinct_numel, evaluating, held_elsewhere,
                      module_paths, replace_module, tied_by_config, tied_parameters, unwrapped)
from .verify import unfaithful_swaps

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def without_autocast(function: F) -> F:
    """``function`` run with the caller's ``torch.autocast`` off on CPU and CUDA: a step called inside a
    mixed-precision loop would otherwise compute its statistics, factors and checks in bfloat16 or float16; the
    result must be the same wherever the step is called (a resumed run, the command line, have no autocast)."""
    return torch.autocast("cpu", enabled=False)(torch.autocast("cuda", enabled=False)(function))


def count_params(model: nn.Module) -> int:
    """``model``'s parameters, each memory counted once (Parameters tied to one tensor, see
    :func:`~musco_core.surgery.distinct_numel`)."""
    return distinct_numel(list(model.parameters()))


def check_same_model(model: nn.Module, state: RunState, origin: str) -> None:
    """A ConfigError unless ``model`` has the weights the run of ``state`` began with: resumed on others, it would go
    on from layers it never compressed, and distil from another teacher. The parameter count the run began with
    must be the model's too, or every report of the run would state a wrong reduction."""
    if state.params_before != count_params(model):
        raise ConfigError(f"{origin}: $.params_before: the run began with {state.params_before:,} parameters, the "
                          f"model passed to resume has {count_params(model):,}; resume with the same model")
    if state.model_fingerprint is None:
        log.info("%s: records no fingerprint of the model's weights (written before states did): cannot check that "
                 "the model passed has the weights the run began with", origin)
    elif distributed.fingerprint(model) != state.model_fingerprint:
        raise ConfigError(f"{origin}: $.model_fingerprint: the model passed to resume has other weights than the run "
                          f"began with; resume with the same model and weights (musco compress: the same --model and "
                          f"--weights; a factory that draws random weights must seed them)")


def check_same_example(state: RunState, example_input: Any, origin: str) -> None:
    """A ConfigError unless ``example_input`` has the dtypes and shapes of the one the run of ``state`` began with
    (or both are None): the report adds the MACs of the layers compressed before and after the resume, and a
    whole-model target counts or times them, so all must be counted on the same input."""
    if state.example_input is None:
        log.info("%s: records no example input (written before states did): cannot check that the example input "
                 "passed is the one the run began with", origin)
        return
    given = describe_input(example_input)
    if given != state.example_input:
        began = "no example input" if state.example_input == NO_EXAMPLE else f"example input {state.example_input}"
        now = "no example input" if example_input is None else f"example input {given}"
        raise ConfigError(f"{origin}: $.example_input: the run began with {began}, the resume was given {now}; the "
                          f"report and the budget would count MACs on both: resume with the same example input "
                          f"(musco compress: the same --input-shape)")


def with_inputs(state: RunState, inputs: Mapping[str, RunInput], origin: str, *, allow_changed: bool = False,
                recorded_later: Collection[str] = ()) -> RunState:
    """``state`` continued with the run's other ``inputs`` (see :attr:`RunState.inputs`): one ConfigError naming
    each input the run recorded that the resume was given otherwise, or was given and the run did not record (old
    and new), unless ``allow_changed``, which records the change and the step it applies from in the state and so in
    the report. The steps taken so far were shaped by the recorded inputs; finishing with others silently would
    make a model that neither set of inputs makes. A state written before inputs were recorded resumes unchecked
    and records ``inputs`` from now on, as one lacking an input of ``recorded_later`` (records that states began
    to hold later, the plugins' versions) does for that input; a finished run, which no input changes any more,
    keeps its record."""
    if state.done:
        return state
    if state.inputs is None:
        log.info("%s: records none of the run's inputs (written before states did): cannot check that the calibration "
                 "data and fine-tuning are those the run began with; recording those given now", origin)
        return attrs.evolve(state, inputs=dict(inputs))
    nothing = RunInput("nothing")
    compared = [*state.inputs, *(name for name in inputs if name not in state.inputs and name not in recorded_later)]
    changed = {name: (began, now) for name in compared
               if (now := inputs.get(name, nothing)).value != (began := state.inputs.get(name, nothing)).value}
    if changed and not allow_changed:
        lines = [f"{origin}: {key_path('$.inputs', name)}: the run began with {began.describe()}, the resume was "
                 f"given {now.describe()}" for name, (began, now) in changed.items()]
        raise ConfigError("\n".join(lines) + f"; its {state.next_step} step(s) so far were made with the first: resume "
                          f"with the inputs the run began with, or allow the change from step {state.next_step + 1} "
                          f"on, recorded in the state and the report (musco compress --allow-changed-inputs; "
                          f"Compressor.resume(..., allow_changed_inputs=True))")
    notes = [f"from step {state.next_step + 1} of {len(state.steps)}: {name} changed from {began.describe()} to "
             f"{now.describe()}" for name, (began, now) in changed.items()]
    for note in notes:
        log.warning("%s: %s (allowed)", origin, note)
    return attrs.evolve(state, inputs={**state.inputs, **inputs}, inputs_changed=(*state.inputs_changed, *notes))


def component_inputs(model: nn.Module, schedule: ModelSchedule, registry: Registry) -> dict[str, RunInput]:
    """The distribution and version of each component ``schedule`` uses on ``model`` (its scheduler, and each
    layer's decompositions, rank selector and layer adapter), as run inputs named ``role/name`` as the output set's
    musco.yaml names them: a resume whose plugins changed version, or come from another distribution, is then
    refused as a changed input (see :func:`with_inputs`), where before it finished silently and the output credited
    the new version with every step."""
    modules = dict(model.named_modules())
    used = {("scheduler", schedule.settings.scheduler)}
    for name in schedule.compressed_layers():
        layer, module = schedule.layers[name], modules.get(name)
        used |= {("decomposition", candidate) for candidate in layer.candidates}
        used.add(("rank selector", layer.rank_selection))
        adapter = (module.spec.adapter if isinstance(module, FactorizedLayer) else
                   None if module is None else getattr(registry.adapter_for(module), "name", None))
        if adapter is not None:
            used.add(("layer adapter", adapter))
    return {f"{role}/{name}": RunInput(f"{source.distribution} {source.version}", f"plugin {source.name!r}")
            for role, name in sorted(used) if (source := registry.source_of(role, name)) is not None}


def stages_of(schedule: ModelSchedule, taken: Mapping[str, int] | None = None) -> dict[str, range]:
    """The compressions (0-based stage numbers) still to run on each layer, after ``taken`` ones of the run."""
    total = schedule.settings.nglobal_compress_iters
    stages = {}
    for name, layer in schedule.layers.items():
        if layer is not None:
            done = (taken or {}).get(name, 0)
            first = layer.curr_compr_iter - done  # the layer's stage when the run began
            stages[name] = range(layer.curr_compr_iter, first + total)
    return stages


def schedule_problems(model: nn.Module, schedule: ModelSchedule, registry: Registry,
                      stages: Mapping[str, range], excluded: Mapping[str, str], began: nn.Module | None = None
                      ) -> list[str]:
    """What keeps the schedule's compressions ``stages`` from running on the model as it is now, one line each.
    ``excluded`` holds the layers that must not be replaced, with why (:attr:`ModelStats.excluded`). ``began``, the
    model as the run began (when resuming), is what the ranks are checked against, as the run checked them then: a
    later stage clamps ranks above the layer's current ones, so a resumed run must not refuse them."""
    problems = []
    modules = dict(model.named_modules())
    for name, remaining in stages.items():
        if not remaining:
            continue
        layer = schedule.layers[name]
        path = key_path("$.layers", name)
        if name not in modules or not name:
            problems.append(f"{path}: no layer of that name in {type(model).__name__}")
            continue
        if name in excluded:
            problems.append(f"{path}: cannot be compressed: {excluded[name]}")
            continue
        try:
            _, source, _ = read_layer(modules[name], registry, name)
            group_spec, group_sources = split_groups(source)
            if began is not None:
                group_spec, group_sources = split_groups(read_layer(began.get_submodule(name), registry, name)[1])
        except MuscoError as exc:
            problems.append(f"{path}: {exc}")
            continue
        usable = usable_decompositions(registry, layer, group_spec)
        if not usable:
            problems.append(f"{path}: " + "; ".join(
                f"{name} cannot decompose a {group_spec.describe()}: "
                f"{registry.decompositions.get(name).unsupported_reason(group_spec)}" for name in layer.candidates))
            continue
        decomposer = usable[0]
        limit = max(max(candidate.max_ranks(group_sources[0])) for candidate in usable)
        if len(remaining) > max(1, limit.bit_length()):
            problems.append(f"{path}: compressed {len(remaining)} more time(s), but its largest rank {limit} can "
                            f"halve at most {max(1, limit.bit_length())} times; lower nglobal_compress_iters")
            continue
        selector = registry.rank_selectors.get(layer.rank_selection)
        given, changed = given_copy(group_sources[0], schedule.settings.params_for(decomposer))
        reason = selector.check_layer(layer.rank_params, decomposer, given, remaining)
        refuse_changed(changed, name, registry.rank_selectors.describe(selector.name), "rank selector")
        if reason:
            problems.append(f"{path}: {reason}")
    return problems


def checked_schedule(model: nn.Module, data: Any, origin: str, registry: Registry,
                     settings: Mapping[str, Any] | None = None, stats: ModelStats | None = None) -> ModelSchedule:
    """A schedule (YAML document, original dict or ModelSchedule) checked on its own and against the model, with
    each layer under its canonical name (a module reachable by two names may be named by either); one ConfigError
    lists every problem of both, named by ``origin``. ``stats`` tells which layers must not be replaced (read from
    the model's layers alone when not given)."""
    if isinstance(data, ModelSchedule):
        schedule, problems = data, []
        origin = data.origin
    else:
        schedule, problems = ScheduleCodec(registry).structure_partial(data, origin, settings=settings)
    layers, clashes = by_canonical_name(schedule.layers, model)
    schedule = attrs.evolve(schedule, layers=layers)
    problems += [f"{origin}: {key_path('$.layers', second)}: names the same module as {first!r}; name it once"
                 for first, second in clashes]
    excluded = (stats or ModelStats.from_model(model, registry)).excluded
    problems += [f"{origin}: {problem}" for problem in
                 schedule_problems(model, schedule, registry, stages_of(schedule), excluded)]
    if problems:
        raise ConfigError("\n".join(problems))
    return schedule


def usable_candidates(model: nn.Module, schedule: ModelSchedule, registry: Registry, name: str) -> list[Decomposer]:
    """The decompositions layer ``name`` lists that can factorize it as it is in ``model`` (a whole-model selector
    chooses among these alone: a Conv3d listing ``[whitened_svd, tucker2]`` can only get tucker2). A layer listing
    one is not read: checking the schedule found that one usable, and a layer keeps its geometry between stages."""
    layer = schedule.layers[name]
    if len(layer.candidates) == 1:
        return [registry.decompositions.get(layer.candidates[0])]
    source = read_layer(model.get_submodule(name), registry, name)[1]
    return usable_decompositions(registry, layer, split_groups(source)[0])


def needs_input_stats(model: nn.Module, schedule: ModelSchedule, registry: Registry, names: Sequence[str]
                      ) -> list[str]:
    """The layers among ``names`` that a decomposition fitting to calibration data may compress."""
    return [name for name in names if schedule.layers[name] is not None and any(
        decomposer.needs_input_stats for decomposer in usable_candidates(model, schedule, registry, name))]


def output_projections(model: nn.Module, schedule: ModelSchedule, registry: Registry, names: Sequence[str]
                       ) -> dict[str, int]:
    """``{layer: projections}`` for the layers among ``names`` whose data-aware decomposition, with the schedule's
    parameters, also weighs its fit by the model's output
    (:meth:`~musco_core.components.Decomposer.output_projections`): the most any of its usable candidates asks
    for."""
    def asked(decomposer: Decomposer) -> int:
        if not decomposer.needs_input_stats:
            return 0
        return decomposer.output_projections(schedule.settings.params_for(decomposer))

    wanted = {name: max(map(asked, usable_candidates(model, schedule, registry, name)))
              for name in needs_input_stats(model, schedule, registry, names)}
    return {name: projections for name, projections in wanted.items() if projections > 0}


def check_calibration(model: nn.Module, schedule: ModelSchedule, registry: Registry, names: Sequence[str],
                      calibration_data: Any) -> Any:
    """``calibration_data`` checked against the layers ``names`` of ``model`` still to compress: required exactly
    when a data-aware decomposition may compress one of them; also used by a whole-model rank selector's passes
    (see :func:`~musco_core.allocation.allocate_pass`)."""
    needing = needs_input_stats(model, schedule, registry, names)
    token_mask(model, schedule.settings.calibration_mask)  # its selectors checked before the first step
    if calibration_data is None:
        if needing:
            raise ConfigError(f"calibration_data: layer(s) {', '.join(map(repr, needing))} use data-aware "
                              f"decompositions that need the layers' input statistics; pass calibration_data, "
                              f"a list or DataLoader of input batches (musco compress: --calibration FILE)")
        return None
    check_reiterable(calibration_data, "calibration_data")
    if not needing and not any(schedule.layers[name] is not None and registry.rank_selectors.get(
            schedule.layers[name].rank_selection).scope == "model" for name in names):
        log.info("calibration_data gives no statistics: no layer of the schedule uses a data-aware decomposition "
                 "or a whole-model rank selector (its first batch checks each step's replacements when there is no "
                 "example input)")
    return calibration_data


def plan_steps(schedule: ModelSchedule, registry: Registry) -> tuple[tuple[str, ...], ...]:
    """The scheduler's plan for the schedule, checked against the Scheduler contract: non-empty steps of distinct
    layers of the schedule, each layer in as many steps as it has stages to run, so that none is left out or
    compressed more often than ``nglobal_compress_iters`` says. A plan that breaks it is a CompressionError naming
    the scheduler and its plugin."""
    names = schedule.compressed_layers()
    name = schedule.settings.scheduler
    scheduler, who = registry.schedulers.get(name), registry.schedulers.describe(name)
    plan = scheduler.plan(names, schedule.settings, None)
    if not (isinstance(plan, (list, tuple)) and all(isinstance(step, (list, tuple)) for step in plan)):
        raise CompressionError(f"{who} planned {short_repr(plan)}; expected a list of steps, each a list of layers")
    # A str subclass (numpy's str_) as a plain str, the layer name saved states and reports write.
    steps = tuple(tuple(str.__str__(layer) if isinstance(layer, str) else layer for layer in step) for step in plan)
    known = set(names)
    for index, step in enumerate(steps):
        if not step or not all(isinstance(layer, str) and layer in known for layer in step) or (
                len(set(step)) != len(step)):
            raise CompressionError(f"{who} planned step {index} as {short_repr(list(step))}; expected a non-empty "
                                   f"list of distinct layers of the schedule")
    planned = dict.fromkeys(names, 0)
    for step in steps:
        for layer in step:
            planned[layer] += 1
    wrong = [(layer, len(stages)) for layer, stages in stages_of(schedule).items() if planned[layer] != len(stages)]
    if wrong:
        layer, expected = wrong[0]
        others = f"; {len(wrong) - 1} more layer(s) planned wrongly too" if len(wrong) > 1 else ""
        raise CompressionError(f"{who} planned layer {layer!r} in {planned[layer]} step(s); expected {expected}, one "
                               f"per compression (nglobal_compress_iters: {schedule.settings.nglobal_compress_iters})"
                               f"{others}")
    return steps


def start_run(model: nn.Module, schedule: ModelSchedule, registry: Registry,
              left_out: Mapping[str, str] | None = None, example_input: Any = None,
              inputs: Mapping[str, RunInput] | None = None) -> RunState:
    """The state of a new run of ``schedule`` (already checked against ``model``) before its first step;
    ``left_out`` records the layers the run leaves out and why, ``example_input`` is described for resumes, and
    ``inputs`` are the run's other inputs a resume must be given again (:func:`with_inputs`)."""
    run_id = distributed.broadcast_json(distributed.current(), uuid.uuid4().hex)  # one run on every rank
    state = RunState(run_id, schedule, plan_steps(schedule, registry), count_params(model),
                     left_out=dict(left_out or {}), model_fingerprint=distributed.fingerprint(model),
                     example_input=describe_input(example_input), inputs=dict(inputs or {}))
    if not state.steps:
        log.warning("the schedule compresses no layer; the run is done at once")
    return state


def layer_costs(model: nn.Module, state: RunState, model_stats: ModelStats) -> dict[str, tuple[Cost, Cost]]:
    """Each layer of the statistics and of the schedule: its parameters (bias included) and MACs on the example
    input (each None when unknown) when the run began and now. For a layer the run compressed, its first row's before
    and its last row's after; for any other, as it is in ``model`` (one factorized before the run began, in a model
    compressed earlier, counts as its factors, not as the layer they replaced, which is how the statistics see it)."""
    first: dict[str, LayerResult] = {}
    last: dict[str, LayerResult] = {}
    for result in state.history:
        first.setdefault(result.name, result)
        last[result.name] = result
    costs: dict[str, tuple[Cost, Cost]] = {}
    modules = dict(model.named_modules())  # a layer the model lacks (edited by hand) has no parameter count
    for name in dict.fromkeys([*model_stats.layers, *state.layer_names, *last]):
        module = modules.get(name)
        params = None if module is None else count_params(module)
        if name in last:  # the rows count weights; the bias is the same before and after
            began = None if params is None else params - last[name].params_after + first[name].params_before
            costs[name] = (Cost(began, first[name].macs_before), Cost(params, last[name].macs_after))
            continue
        stats = model_stats.layers.get(name)
        now = Cost(params, None if stats is None else chain_cost(module.spec, module.layouts, stats.input_calls).macs
                   if isinstance(module, FactorizedLayer) else stats.macs)
        costs[name] = (now, now)
    return costs


def build_report(model: nn.Module, state: RunState, model_stats: ModelStats) -> CompressionReport:
    """What the run did so far: one row per layer compression, and the model's totals now (MACs: those of
    :func:`layer_costs`, as the run began and now). ``model`` may be wrapped for fine-tuning (see
    :func:`~musco_core.surgery.unwrapped`)."""
    macs = [(before.macs, after.macs) for before, after in layer_costs(unwrapped(model), state, model_stats).values()]
    macs_before = macs_after = None
    if not any(value is None for pair in macs for value in pair):  # else a layer is not counted: unknown
        macs_before, macs_after = sum(before for before, _ in macs), sum(after for _, after in macs)
    return CompressionReport(list(state.history), state.params_before, count_params(model), macs_before, macs_after,
                             list(state.budgets), dict(state.left_out), list(state.inputs_changed))


def _totals(model: nn.Module, state: RunState, context: RunContext, pending: Mapping[str, Pending]) -> ModelTotals:
    """The model's counts, and those of the schedule's layers, as the current step leaves them so far (its pending
    replacements counted)."""
    report = build_report(model, state, context.model_stats)
    saved_params = sum(count_params(p.module) - count_params(p.new) for p in pending.values() if p.new is not None)
    saved_macs = sum(p.result.macs_before - p.result.macs_after for p in pending.values()
                     if p.result.macs_before is not None)
    costs = layer_costs(model, state, context.model_stats)
    began = [costs[name][0] for name in state.layer_names]
    macs = {name: costs[name][1].macs for name in state.layer_names}
    macs.update({name: entry.result.macs_after for name, entry in pending.items()})
    scheduled = ModelTotals(
        sum(cost.params for cost in began),
        sum(count_params(pending[name].current if name in pending else model.get_submodule(name))
            for name in state.layer_names),
        None if any(cost.macs is None for cost in began) else sum(cost.macs for cost in began),
        None if any(value is None for value in macs.values()) else sum(macs.values()))
    return ModelTotals(report.params_before, report.params_after - saved_params, report.macs_before,
                       None if report.macs_after is None else report.macs_after - saved_macs, scheduled)


def tied_note(others: Sequence[str]) -> str:
    """Why a layer whose weights are tied to the parameters ``others`` (of other modules) is kept as it is."""
    return (f"kept as is: its weights are tied to {', '.join(others)}, which stay, so factorizing it would add "
            f"weights (force: true does it anyway and unties them)")


def config_tie_note(owner: str) -> str:
    """Why a tied layer is kept even with ``force: true``: ``owner``, a transformers 4 model, ties it by its
    ``config.tie_word_embeddings`` (see :func:`~musco_core.surgery.tied_by_config`)."""
    return (f"kept as is although forced: {owner} ties it to its input embeddings by config.tie_word_embeddings "
            f"(transformers 4), which must stay True (its forward may read it: T5 scales its output by it), so "
            f"tie_weights() would tie it again; transformers 5 can untie it")


def untied_note(model: nn.Module, module: nn.Module, new: nn.Module, others: Sequence[str]) -> str:
    """What factorizing ``module`` into ``new``, its weights tied to the parameters ``others``, did (``force:
    true``): they stay, so its row's fewer weights are not the model's; the model's parameters grow by what the
    factors add less what only the layer held."""
    freed = count_params(module) - held_elsewhere(model, module, others)
    return (f"forced although its weights are tied to {', '.join(others)}, which stay: the model gained "
            f"{count_params(new) - freed:,} parameters")


@torch.inference_mode(False)  # called under inference_mode, it would build factors that fine-tuning cannot train
@without_autocast
def run_step(model: nn.Module, state: RunState, context: RunContext) -> tuple[nn.Module, RunState]:
    """Compresses the layers of the next step; returns the model with them swapped in and the next state.

    Every layer of the step is factorized before any is swapped in, so a failure raises with the model as it was
    (the state is a frozen value, so it is untouched too). On success ``model`` itself is modified and returned;
    its new layers have new parameters, so an optimizer built before the step no longer trains them.
    In a distributed job (see :mod:`musco_core.distributed`) every rank calls it on its replica with its own shard
    of the calibration data; the layers are decomposed across the ranks and every rank ends with the same model
    and state, or every rank raises. A caller's ``torch.autocast`` is off inside (:func:`without_autocast`).
    """
    if state.done:
        raise MuscoError(f"compression is done: all {len(state.steps)} steps were taken")
    group = distributed.current()
    distributed.check_replicas(group, model, _agreed(state, context) if group else None)
    schedule, registry = state.schedule, context.registry
    names = state.steps[state.next_step]
    modules = dict(model.named_modules())
    if missing := [name for name in names if name not in modules]:
        raise ConfigError(f"the model ({type(model).__name__}) has no layer {', '.join(map(repr, missing))}, which "
                          f"this step compresses; step on the model the run compressed so far, with all its layers "
                          f"(Compressor.compressed_model)")
    step_stats: dict[str, InputStats] = {}
    mask = token_mask(model, schedule.settings.calibration_mask)
    output_moments = _output_moments(model, schedule, names, context, group, mask)

    def with_output(name: str, stats: InputStats | None) -> InputStats | None:
        """``stats`` with the layer's output moment, where its decomposition asked for one."""
        if stats is None or name not in output_moments:
            return stats
        return attrs.evolve(stats, output_moment=output_moments[name])

    def input_stats_for(layers: Sequence[str]) -> dict[str, InputStats]:
        """Calibration statistics of ``layers`` (none without calibration data), on the model as the step found it,
        collected once."""
        missing = [name for name in layers if name not in step_stats]
        if missing and context.calibration_data is not None:
            specs = layer_specs(model, missing, registry)
            collected = collect_input_stats(model, specs, context.calibration_data, progress=context.progress,
                                            group=group, mask=mask)
            step_stats.update({name: with_output(name, stats) for name, stats in collected.items()})
        return step_stats

    needing = needs_input_stats(model, schedule, registry, names)
    sequential = schedule.settings.calibration == "sequential" and bool(needing)
    if not sequential:  # sequentially, each layer's statistics are collected when it comes up, then freed
        input_stats_for(needing)
    paths = module_paths(model)
    tied = tied_parameters(model, names)
    allocated, budgets = dict(state.allocated), list(state.budgets)
    planned: list[str] = []  # the step's layers a whole-model plan counts as compressed
    counted: dict[str, set[str]] = {}  # per whole-model selector, the step's layers compressed before its last plan
    pending: dict[str, Pending] = {}
    queued: dict[str, _Job] = {}
    loads = [0.0] * group.world_size if group else None  # each rank's decomposition work in this step

    def decompose_queued() -> None:
        """Decomposes the layers queued so far (across the ranks in a distributed job) into ``pending``."""
        if not queued:
            return
        pending.update(_decompose(queued, schedule, context, group, loads))
        for name in queued:
            step_stats.pop(name, None)  # F x F float64 each: only the layers still to come keep theirs
        queued.clear()

    order, sources = names, {}
    calibrated: dict[str, InputStats] = {}  # sequential statistics collected with an earlier layer's, until it comes
    if sequential:  # one rank's order (the first whose shard has a batch): the collectives below run in it everywhere
        holder = distributed.first_holding(group, _first_batch(context.calibration_data) is not None) if group else 0
        # no rank has a batch: rank 0 reports the empty data
        order, sources = distributed.on_first_rank(group, "the order of the step's layers",
                                                   lambda: layer_dataflow(model, names, context.calibration_data),
                                                   src=holder or 0)
    bar = tqdm(order, desc=f"compression step {state.next_step + 1}/{len(state.steps)}", unit="layer",
               disable=not (context.progress and sys.stderr.isatty()), file=sys.stderr, leave=False)
    for name in bar:
        layer = schedule.layers[name]
        module = model.get_submodule(name)
        if registry.rank_selectors.get(layer.rank_selection).scope == "model" and name not in allocated:
            decompose_queued()  # the allocation counts the step's earlier replacements
            ranks, record = allocate_pass(model, name, state, context, pending,
                                          _totals(model, state, context, pending), input_stats_for, group=group)
            counted[record.selector] = set(pending)
            allocated.update(ranks)
            budgets.append(record)
        chosen: dict[str, Any] = {}
        if name in allocated:
            allocation = allocated.pop(name)
            if allocation is None:
                chosen = {"keep_note": f"kept as is: the {layer.rank_selection} allocation leaves it at this pass"}
            else:
                layer, chosen = attrs.evolve(layer, decomposition=allocation.decomposition), {"ranks": allocation.ranks}
                planned.append(name)
        if name in tied and not layer.force:
            chosen = {"keep_note": tied_note(tied[name])}
        elif name in tied and (owner := tied_by_config(model, module)):
            chosen = {"keep_note": config_tie_note(owner)}
        if sequential and name in needing:
            if name not in calibrated:  # taken with the step's earlier layers compressed
                decompose_queued()
                layers = _independent_run(order, order.index(name), needing, sources)
                calibrated.update(_calibrated(model, layers, sources, input_stats_for, pending, paths, context, group,
                                              mask))
            stats = with_output(name, calibrated.pop(name))
        else:
            stats = step_stats.get(name)
        queued[name] = _Job(module, layer, chosen, stats)
    decompose_queued()
    _keep_unfaithful(model, pending, paths, context, group)
    for name, entry in pending.items():
        if name in tied and entry.new is not None:
            note = "; ".join(filter(None, [entry.result.note, untied_note(model, entry.module, entry.new, tied[name])]))
            pending[name] = attrs.evolve(entry, result=attrs.evolve(entry.result, note=note))
    budgets = _with_measured_speedup(model, pending, paths, state, context, budgets, counted, group)
    for entry in pending.values():
        if entry.new is not None:
            for path in paths[id(entry.module)]:
                replace_module(model, path, entry.new)
    clear_broken_ties(model)
    results = tuple(pending[name].result for name in names)  # in the plan's order, whatever order they ran in
    log.info("compression step %d/%d: %d of %d layers compressed", state.next_step + 1, len(state.steps),
             sum(r.applied for r in results), len(results))
    budgets = _with_kept_after_plan(state, budgets, [name for name in planned if pending[name].new is None])
    return model, attrs.evolve(state, next_step=state.next_step + 1, allocated=allocated,
                               history=state.history + results, budgets=tuple(budgets))


def _agreed(state: RunState, context: RunContext) -> dict[str, Any]:
    """What every rank of a distributed job must share when a step starts, besides the weights: the run (its
    schedule, plan and progress; not its history, which holds timings), the example input's shapes, the registry's
    components, and whether calibration data and ``evaluate`` are given (a rank without them would skip the
    collectives of the others)."""
    run = StateCodec(context.registry).unstructure(state)
    components = {role.title: {name: [entry.source.name, entry.source.version,
                                      f"{entry.component.__module__}.{entry.component.__qualname__}"]
                               for name, entry in role.entries.items()} for role in context.registry.roles}
    return {"schedule or run state": {key: value for key, value in run.items() if key not in ("history", "budgets")},
            "example input": describe_input(context.example_input),  # its values only rank 0's timings use
            "plugins": components,
            "calibration data or evaluate (given or not)": [context.calibration_data is not None,
                                                            context.evaluate is not None]}


def _keep_unfaithful(model: nn.Module, pending: dict[str, Pending], paths: Mapping[int, list[str]],
                     context: RunContext, group: distributed.Group | None) -> None:
    """Keeps as they are (in ``pending``, with the reason) the layers whose replacement the model would not use as
    it uses the layer (:func:`~musco_core.verify.unfaithful_swaps`), run on the example input, else on the first
    calibration batch. In a distributed job the verdict of the first rank holding such an input counts on every
    rank (every rank takes part, whether its own shard is empty or not)."""
    swaps = {name: (entry.module, entry.new) for name, entry in pending.items() if entry.new is not None}
    if not swaps:
        return
    probe, input_name = context.example_input, "the example input"
    if probe is None:
        probe, input_name = _first_batch(context.calibration_data), "the first calibration batch"
    holder = distributed.first_holding(group, probe is not None)
    if holder is None:
        log.warning("compression step: the replacements are not checked in the whole model (no example input or "
                    "calibration data to run it on): a layer the model uses other than by calling it (a branch on "
                    "its type, a read of its weight) would not be kept; give an example input (example_input, or "
                    "--input-shape) or calibration data (calibration_data, --calibration) to check")
        return
    unfaithful = distributed.on_first_rank(group, "checking the step's replacements in the whole model",
                                           lambda: unfaithful_swaps(model, swaps, paths, probe, input_name), src=holder)
    for name, why in unfaithful.items():
        log.warning("layer %r: kept as is: %s", name, why)
        pending[name] = Pending(pending[name].module, None, pending[name].result.kept(why))


def _with_kept_after_plan(state: RunState, budgets: Sequence[BudgetRecord], kept: Sequence[str]
                          ) -> list[BudgetRecord]:
    """``budgets`` with a note on each plan of a whole-model selector that counted one of the ``kept`` layers
    compressed (the step kept it after its factorization: the whole-model check, say): its ``planned`` figure is
    then not what the model reaches."""
    schedule, taken, budgets = state.schedule, state.stages_taken(), list(budgets)
    for index, record in enumerate(budgets):
        names = [name for name in kept if schedule.layers[name].rank_selection == record.selector
                 and taken[name] == record.pass_index]
        if names:
            note = (f"layer(s) {', '.join(map(repr, names))} it planned to compress were kept after the plan (see "
                    f"their rows): the model ends less reduced than planned")
            log.warning("%s: %s", record.selector, note)
            budgets[index] = attrs.evolve(record, note="; ".join(filter(None, [record.note, note])))
    return budgets


def _first_batch(calibration_data: Any) -> Any:
    """The first batch of the calibration data (this rank's shard in a distributed job), or None when it is empty
    or absent."""
    return None if calibration_data is None else next(iter(calibration_data), None)


def _with_measured_speedup(model: nn.Module, pending: Mapping[str, Pending], paths: Mapping[int, list[str]],
                           state: RunState, context: RunContext, budgets: Sequence[BudgetRecord],
                           counted: Mapping[str, Collection[str]], group: distributed.Group | None
                           ) -> list[BudgetRecord]:
    """``budgets`` with the measured speed-up of the step multiplied into the latest plan of every selector that
    measures latency and whose layers the step compressed: the model as the step found it with the step's
    replacements that the selector's plan covers swapped in (its own layers', and those of the layers ``counted``
    compressed before its plan in the step: left out, a manual layer there made the plan say 1.294x and the
    measurement 1.108x for a model 1.304x faster), timed in alternation against it without them (in eval mode; the
    model is left as it was), in the form the selector plans for (:class:`~musco_core.latency.TimedForm`). A
    selector's first measurement also times the model as the run began (every layer the steps before factorized
    swapped back to its form then: a dense layer, or the chain of a model compressed before the run), as its plan
    counts the speed-up since then: a manual layer compressed in an earlier step made the plan say 1.294x and the
    measurement 1.127x for a model 1.304x faster. In a distributed job rank 0's measurement counts on every rank,
    so the states stay equal."""
    registry, schedule = context.registry, state.schedule
    forms: dict[str, bool] = {}  # selector name: whether it times the optimized form
    members: dict[str, dict[str, Pending]] = {}  # selector name: the step's layers it allocated
    for name, entry in pending.items():
        selector = registry.rank_selectors.get(schedule.layers[name].rank_selection)
        if selector.scope == "model" and selector.measures_latency(params := schedule.settings.params_for(selector)):
            forms[selector.name] = selector.times_optimized(params)
            members.setdefault(selector.name, {})[name] = entry
    budgets = list(budgets)
    factorized = list(dict.fromkeys(result.name for result in state.history if result.applied))
    for selector, optimized in sorted(forms.items()):
        replacements = pending_replacements({**{name: pending[name] for name in counted.get(selector, ())},
                                             **members[selector]}, paths)
        since_run_began = _measured_so_far(budgets, selector) is None and bool(factorized)
        speedup = 1.0  # the allocation kept every layer of the selector, and the run compressed none before
        if since_run_began or replacements:
            with distributed.agreement(group, "measuring the step's speed-up"):
                profiler = profiler_for(model, context)
                began = {}  # the run's earlier layers as the run began (zero weights): dense, or an earlier run's chain
                for name in factorized if since_run_began else ():
                    module = model.get_submodule(name)
                    layouts = context.began_factorized.get(name, layer_layout(module.spec))
                    began.update(dict.fromkeys(paths[id(module)], profiler.module(Chain(module.spec, tuple(layouts),
                                                                                        ()))))
                with evaluating(model, *replacements.values(), *began.values()):
                    before, after = TimedForm(model, context.example_input, optimized).seconds(profiler,
                                                                                              [began, replacements])
            speedup = float(distributed.broadcast_json(group, before / after))
            log.info("compression step: measured whole-model speed-up of the %s layers %.3fx%s%s", selector,
                     speedup, " since the run began" if since_run_began else "",
                     " (as optimize_for_inference deploys it)" if optimized else "")
        budgets = _multiplied(budgets, selector, speedup)
    return budgets


def _measured_so_far(budgets: Sequence[BudgetRecord], selector: str) -> float | None:
    """The selector's measured speed-up so far: its latest plan's, else its previous plan's (None: not measured)."""
    return next((record.measured for record in reversed(budgets)
                 if record.selector == selector and record.measured is not None), None)


def _multiplied(budgets: Sequence[BudgetRecord], selector: str, speedup: float) -> list[BudgetRecord]:
    """``budgets`` with ``speedup`` multiplied into the measured speed-up of the selector's latest plan (which
    starts from its previous plan's, or 1)."""
    budgets = list(budgets)
    index = max(i for i, record in enumerate(budgets) if record.selector == selector)
    base = _measured_so_far(budgets, selector)
    budgets[index] = attrs.evolve(budgets[index], measured=(1.0 if base is None else base) * speedup)
    return budgets


@attrs.frozen(eq=False)
class _Job:
    """A layer of the step ready to decompose: the module, its schedule entry (with the decomposition chosen),
    ``compress_layer``'s choice arguments (``ranks`` or ``keep_note``) and its calibration statistics."""

    module: nn.Module
    layer: LayerSchedule
    chosen: Mapping[str, Any]
    input_stats: InputStats | None


def _cost(job: _Job, registry: Registry, name: str) -> float:
    """A layer's decomposition cost as a dense SVD of its ``out x F`` weight counts it, ``out * F * min(out, F)``
    (0 for a layer kept as it is), to split a step's layers across ranks."""
    if "keep_note" in job.chosen:
        return 0.0
    spec = read_layer(job.module, registry, name)[1].spec
    features = spec.in_channels // spec.groups * spec.kernel_numel
    return float(spec.out_channels * features * min(spec.out_channels, features))


def _decompose(jobs: Mapping[str, _Job], schedule: ModelSchedule, context: RunContext,
               group: distributed.Group | None, loads: list[float] | None) -> dict[str, Pending]:
    """The factorized layers of ``jobs``: each decomposed on its owner rank in a distributed job (``loads`` the
    ranks' work so far in the step), the results and factors broadcast to every rank."""
    registry = context.registry

    def compute(name: str) -> tuple[nn.Module | None, LayerResult]:
        job = jobs[name]
        stats = context.model_stats.layers.get(name)
        try:
            return compress_layer(job.module, name, job.layer, schedule.settings, registry,
                                  stats.input_shape if stats else None, input_stats=job.input_stats,
                                  calls=stats.input_calls if stats else None, **job.chosen)
        except Exception as exc:  # a plugin's bug must not leave the model half-compressed either
            reason = str(exc) if isinstance(exc, MuscoError) else f"{type(exc).__name__}: {exc}"
            named = reason if reason.startswith(f"layer {name!r}") else f"layer {name!r}: {reason}"
            raise CompressionError(f"{named}; the model was left as before this step") from exc

    if group is None:
        done = {name: compute(name) for name in jobs}
    else:
        done = distributed.share(
            group, list(jobs), {name: _cost(job, registry, name) for name, job in jobs.items()}, compute,
            encode=lambda result: plain_data(attrs.asdict(result, recurse=False)),
            decode=lambda data: LayerResult(**{**data, "ranks": None if data["ranks"] is None
                                               else tuple(data["ranks"])}),
            skeleton=lambda name, result: factorized_like(jobs[name].module, name, result.decomposition,
                                                          result.ranks, registry), loads=loads)
    return {name: Pending(jobs[name].module, new, result) for name, (new, result) in done.items()}


def _output_moments(model: nn.Module, schedule: ModelSchedule, names: Sequence[str], context: RunContext,
                    group: distributed.Group | None, mask: TokenMask | None) -> dict[str, Any]:
    """The output moments of the step's layers whose decomposition asks for them, on the model as the step found
    it (empty without calibration data, which :func:`check_calibration` refuses for such layers)."""
    layers = output_projections(model, schedule, context.registry, names)
    if not layers or context.calibration_data is None:
        return {}
    specs = layer_specs(model, layers, context.registry)
    return collect_output_moments(model, specs, context.calibration_data, projections=max(layers.values()),
                                  seed=schedule.settings.seed, progress=context.progress, group=group, mask=mask)


def _independent_run(order: Sequence[str], start: int, needing: Collection[str],
                     sources: Mapping[str, Sequence[str]]) -> list[str]:
    """The layers from ``order[start]`` on that need input statistics and whose inputs do not depend on the earlier
    ones' (``sources``, see :func:`~musco_core.calibration.layer_dataflow`): each sees the same inputs whether or
    not those ahead of it in the run are compressed, so their sequential statistics are collected together."""
    run = [order[start]]
    for name in order[start + 1:]:
        if name not in needing or name not in sources or set(sources[name]) & set(run):
            break
        run.append(name)
    return run


def _calibrated(model: nn.Module, layers: Sequence[str], sources: Mapping[str, Sequence[str]],
                input_stats_for: Callable[[Sequence[str]], Mapping[str, InputStats]], pending: dict[str, Pending],
                paths: Mapping[int, list[str]], context: RunContext, group: distributed.Group | None,
                mask: TokenMask | None) -> dict[str, InputStats]:
    """Sequential calibration of layers that need input statistics, whose inputs do not depend on one another's
    (:func:`_independent_run`): those of their inputs with the step's layers compressed so far swapped in (those
    their inputs depend on, in ``sources``), paired with their inputs at the start of the step; plain statistics of
    the first layer alone while none is swapped in. The replacements are checked in the whole model first
    (:func:`_keep_unfaithful`): one the model does not use as it uses its layer is kept, with the reason, before it
    is swapped in, so that the layers after it are calibrated as in a step without it (and the model is not run on
    a swap it cannot take)."""
    _keep_unfaithful(model, pending, paths, context, group)
    if not any(entry.new is not None for entry in pending.values()):  # collected now, unless the allocation did
        return {layers[0]: input_stats_for(layers[:1]).get(layers[0])}
    upstream = set().union(*(sources.get(name, pending) for name in layers))
    replacements = {path: entry.new for name, entry in pending.items() if entry.new is not None and name in upstream
                    for path in paths[id(entry.module)]}
    specs = layer_specs(model, layers, context.registry)
    return collect_sequential_stats(model, specs, replacements, context.calibration_data, progress=context.progress,
                                    group=group, mask=mask)


def _arity(registry: Registry, candidates: Sequence[str], decomposition: str) -> int | None:
    """How many ranks ``decomposition`` takes, or None when it is not one of the layer's ``candidates``."""
    if decomposition not in candidates:
        return None
    return len(registry.decompositions.get(decomposition).rank_names)


def check_resumable(model: nn.Module, state: RunState, registry: Registry, model_stats: ModelStats, origin: str,
                    began: nn.Module | None = None) -> None:
    """A ConfigError listing every way ``state`` does not fit its own schedule and ``model`` (the model restored
    from the same saved folder, with ``model_stats``), or what keeps its remaining compressions from running on the
    layers as they are (their ranks checked against ``began``, the model as the run began, where given: see
    :func:`schedule_problems`). Nothing else may read the state's plan before this has checked it."""
    schedule = state.initial_schedule
    problems = []
    try:
        planned = plan_steps(schedule, registry)
    except MuscoError as exc:
        planned = None
        problems.append(f"$.steps: {exc}")
    if planned is not None and planned != state.steps:
        problems.append(f"$.steps: the saved plan of {len(state.steps)} steps is not the plan of scheduler "
                        f"{schedule.settings.scheduler!r} for $.initial_schedule ({len(planned)} steps)")
    if state.next_step > len(state.steps):
        problems.append(f"$.next_step: expected at most {len(state.steps)} (the number of planned steps), got "
                        f"{state.next_step}")
        raise ConfigError("\n".join(f"{origin}: {problem}" for problem in problems))
    taken = [name for step in state.steps[:state.next_step] for name in step]
    if [result.name for result in state.history] != taken:
        problems.append(f"$.history: expected one result per layer of the {state.next_step} steps taken "
                        f"({len(taken)}, in order), got {len(state.history)}")
    stage = {name: layer.curr_compr_iter for name, layer in schedule.layers.items() if layer is not None}
    for index, result in enumerate(state.history):
        layer = schedule.layers.get(result.name)
        if layer is None:
            problems.append(f"$.history[{index}].name: {result.name!r} is not compressed by the schedule")
            continue
        arity = _arity(registry, layer.candidates, result.decomposition)
        listed = result.ranks is None and result.decomposition == "/".join(layer.candidates)  # kept, none chosen
        if arity is None and not listed or result.stage != stage[result.name] or (
                result.ranks is not None and len(result.ranks) != arity):
            problems.append(f"$.history[{index}]: {result.decomposition} stage {result.stage} ranks "
                            f"{result.ranks} does not fit the schedule ({'/'.join(layer.candidates)}, stage "
                            f"{stage[result.name]})")
        stage[result.name] += 1
    counted = next((index for index, result in enumerate(state.history) if (result.macs_before is None) != (
        getattr(model_stats.layers.get(result.name), "macs", None) is None)), None)
    if counted is not None:
        result = state.history[counted]
        problems.append(
            f"$.history[{counted}].macs_before: the run counted layer {result.name!r} at {result.macs_before} MACs "
            f"and the statistics of the resume at {getattr(model_stats.layers.get(result.name), 'macs', None)}: "
            f"the report and a budget would count MACs for some steps only; resume with the model_stats (or the "
            f"example_input) the run began with")
    for name, allocation in state.allocated.items():
        layer = schedule.layers.get(name)
        if layer is None or registry.rank_selectors.get(layer.rank_selection).scope != "model":
            problems.append(f"{key_path('$.allocated', name)}: not a layer of a whole-model rank selector")
        elif allocation is not None and _arity(registry, layer.candidates, allocation.decomposition) != len(
                allocation.ranks):
            problems.append(f"{key_path('$.allocated', name)}: {allocation.decomposition} at ranks "
                            f"{list(allocation.ranks)} is not one of the layer's decompositions with its ranks")
    for name, ranks in state.ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # schedule_problems names it
        factorized = isinstance(module, FactorizedLayer)
        if factorized != (ranks is not None) or factorized and module.ranks != ranks:
            now = f"{module.decomposition} at ranks {module.ranks}" if factorized else "not factorized"
            problems.append(f"{key_path('$.layers', name)}: the history says ranks {ranks}, the saved model has it "
                            f"{now}")
    if not problems:
        problems += schedule_problems(model, state.schedule, registry, stages_of(state.schedule, state.stages_taken()),
                                      model_stats.excluded, began)
    if problems:
        raise ConfigError("\n".join(f"{origin}: {problem}" for problem in problems))
