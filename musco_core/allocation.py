"""Whole-model rank allocation: a rank selector of scope ``"model"`` chooses the ranks of every layer of a pass at once.

A pass holds every layer that uses the selector at the same compression of the run (its first, second...,
whatever stage the schedule started the layer at). When a step reaches the first of them, the
selector sees them all together, on the model as it is then (with the step's earlier replacements counted), and
fixes their ranks until each is compressed. With an ``evaluate`` function a sensitivity pass first measures how
much each layer's compression alone hurts the model.
"""
from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from torch import nn
from tqdm.auto import tqdm

from .calibration import forms_features
from .components import Decomposer, InputStats, LayerChoice, ModelTotals, RankRounding, RankSelector
from .engine import (LayerResult, checked_ranks, compress_layer, given_copy, read_layer, refuse_changed,
                     refuse_non_finite, split_groups, usable_decompositions)
from . import distributed
from .errors import CompressionError, ConfigError, MuscoError, short_repr
from .factors import chain_cost, layer_layout, widen
from .latency import Chain, LatencyProfiler, profiler_for, timed_totals
from .report import BudgetRecord
from .schedule import LayerSchedule, ModelSchedule, RunSettings
from .state import Allocated, RunContext, RunState
from .stats import ModelStats
from .surgery import evaluating, held_elsewhere, module_paths, swapped, tied_by_config, tied_parameters

log = logging.getLogger(__name__)

Ranks = tuple[int, ...]


@attrs.frozen(eq=False)
class Pending:
    """A layer compressed earlier in the current step, not swapped in yet: the module, its replacement (None when
    kept) and the result."""

    module: nn.Module
    new: nn.Module | None
    result: LayerResult

    @property
    def current(self) -> nn.Module:
        return self.module if self.new is None else self.new


def layer_choices(name: str, module: nn.Module, layer: LayerSchedule, context: RunContext,
                  input_stats: InputStats | None, profiler: LatencyProfiler | None = None, tied_params: int = 0
                  ) -> list[LayerChoice]:
    """The layer as a whole-model selector sees it, once per candidate decomposition that can factorize it, priced
    with the report's own arithmetic (and, given a ``profiler``, with measured times); ``tied_params`` of its
    weights stay in the model when it is factorized (tied to other modules')."""
    _, source, _ = read_layer(module, context.registry, name)
    refuse_non_finite(source, name)
    source.input_stats = input_stats
    group_spec, group_sources = split_groups(source)
    current = tuple(f.layout for f in source.factors) if source.factors else tuple(layer_layout(source.spec))
    stats = context.model_stats.layers.get(name)
    input_shape = stats.input_shape if stats else None
    calls = stats.input_calls if stats else None
    output_layer = name in (context.model_stats.output_layers or ())  # known with an example input
    choices = []
    for decomposer in usable_decompositions(context.registry, layer, group_spec):
        def price(ranks: Ranks | None, decomposer=decomposer):
            layouts = current if ranks is None else [widen(layout, source.spec.groups)
                                                     for layout in decomposer.layout(group_spec, ranks)]
            return chain_cost(source.spec, layouts, calls)

        def measure(ranks_list: Sequence[Ranks | None], decomposer=decomposer) -> list[float]:
            """The chains' seconds at every call of the layer on the example input (a module that two blocks share
            runs, and costs, twice), each input shape timed."""
            layouts = [current if ranks is None else tuple(widen(layout, source.spec.groups)
                                                           for layout in decomposer.layout(group_spec, ranks))
                       for ranks in ranks_list]
            per_shape = profiler.seconds([[Chain(source.spec, chain, tuple(shape)) for chain in layouts]
                                          for shape, _ in calls])
            return [sum(count * seconds[i] for (_, count), seconds in zip(calls, per_shape))
                    for i in range(len(ranks_list))]

        choices.append(LayerChoice(name, decomposer, source.spec, tuple(group_sources), current, price, input_shape,
                                   measure=None if profiler is None or not calls else measure,
                                   output_layer=output_layer, tied_params=tied_params))
    return choices


def check_model_inputs(schedule: ModelSchedule, registry: Any, example_input: Any, stats: ModelStats | None = None
                       ) -> None:
    """A ConfigError when a whole-model selector of the schedule needs what the compressor was not given: an
    example input to time the model on (metric latency), or MAC counts, which only an example input or
    ``stats`` with MACs give (metric flops); so that such a target fails when the compressor is built, not at its
    first step."""
    for layer in schedule.layers.values():
        selector = None if layer is None else registry.rank_selectors.get(layer.rank_selection)
        if selector is None or selector.scope != "model":
            continue
        params, where = schedule.settings.params_for(selector), f"{schedule.origin}: $.settings.algo_kwargs."
        if example_input is None and selector.measures_latency(params):
            raise ConfigError(f"{where}{selector.name}: metric latency times the model and its layers on the "
                              f"example input: give the compressor an example_input (--input-shape on the command "
                              f"line)")
        if stats is not None and stats.total_macs is None and selector.counts_macs(params):
            raise ConfigError(f"{where}{selector.name}: with these settings (a budget's default metric: flops) it "
                              f"counts the layers' MACs, and there is no example input to count them on: give the "
                              f"compressor an example_input (--input-shape on the command line) or model_stats with "
                              f"MACs, or a target that counts none (metric: params)")


def pending_replacements(pending: Mapping[str, Pending], paths: Mapping[int, list[str]]) -> dict[str, nn.Module]:
    """Every path at which a replacement of the step is to be swapped in."""
    return {path: entry.new for entry in pending.values() if entry.new is not None for path in paths[id(entry.module)]}


def _loss(context: RunContext, model: nn.Module, what: str, without_data: bool | None = None) -> float | None:
    """``evaluate(model)`` checked: a finite loss, or None on a rank whose evaluation data is empty, which it must
    then be for every model (``without_data``: whether it returned None for the model as it is). It runs in eval
    mode, each module's own mode put back after: in train mode its forward passes updated BatchNorm statistics, with
    probes swapped in, and an ``evaluate`` that calls ``model.eval()`` left the model in eval mode for fine-tuning."""
    with evaluating(model):
        value = context.evaluate(model)
    if value is not None:
        try:
            loss = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            loss = None
        if loss is None or not math.isfinite(loss):
            raise ConfigError(f"evaluate(model) returned {short_repr(value)} {what}; expected a finite loss (a "
                              f"float), or None on a rank whose evaluation data is empty")
        value = loss
    if without_data is not None and without_data != (value is None):
        raise ConfigError(f"evaluate(model) returned {short_repr(value)} {what}, and "
                          f"{'None' if without_data else 'a loss'} for the model as it is; return None exactly when "
                          f"this rank's evaluation data is empty")
    return value


def sensitivities(model: nn.Module, choices: Sequence[LayerChoice], schedule: ModelSchedule, context: RunContext,
                  input_stats: Mapping[str, InputStats], group: distributed.Group | None = None) -> dict[str, float]:
    """Loss growth per unit of relative squared weight error of each layer, compressed alone at half its ranks,
    relative to the mean over the layers (floored at 1% of it; 1.0 where nothing was measured).

    Each probe is swapped in and back out, also on error, so the model is as it was afterwards. With a distributed
    ``group`` each rank's ``evaluate`` measures the loss on its own shard (None where the shard is empty) and the
    losses are averaged over the ranks that have one (the loss of all the data when those shards are the same size).
    """
    paths = module_paths(model)
    with distributed.agreement(group, "sensitivity pass: evaluate"):
        mine = _loss(context, model, "for the model as it is")
    base = distributed.mean(group, mine)
    if base is None:
        raise ConfigError("evaluate(model) returned None (no evaluation data) on every rank: the sensitivity pass "
                          "needs a loss; give evaluate some data, or leave it out")
    measured: dict[str, float] = {}
    first = list({choice.name: choice for choice in reversed(choices)}.values())[::-1]  # a layer's first candidate
    for choice in tqdm(first, desc="sensitivity pass", unit="layer", leave=False, file=sys.stderr,
                       disable=not (context.progress and sys.stderr.isatty())):
        module = model.get_submodule(choice.name)
        source = choice.sources[0]
        probe = tuple(max(floor, limit // 2) for floor, limit in zip(choice.decomposer.min_ranks(source),
                                                                       choice.decomposer.max_ranks(source)))
        layer = attrs.evolve(schedule.layers[choice.name], decomposition=choice.decomposer.name, force=True)
        with distributed.agreement(group, f"sensitivity pass of layer {choice.name!r}"):
            try:
                new, result = compress_layer(module, choice.name, layer, schedule.settings, context.registry,
                                             choice.input_shape, ranks=probe, input_stats=input_stats.get(choice.name))
            except MuscoError as exc:
                raise CompressionError(f"layer {choice.name!r}: sensitivity pass: {exc}; the model was left as "
                                       f"before this step") from exc
            loss = None
            if new is not None and result.relative_error:
                with swapped(model, {path: new for path in paths[id(module)]}):
                    loss = _loss(context, model, f"with layer {choice.name!r} compressed at ranks {result.ranks}",
                                 without_data=mine is None)
        # whether a probe ran depends on its ranks and weights alone, the same on every rank
        if new is None or not result.relative_error:
            continue
        loss = distributed.mean(group, loss)
        measured[choice.name] = max(loss - base, 0.0) / result.relative_error ** 2
        log.debug("sensitivity of %r: loss %.4g -> %.4g at ranks %s", choice.name, base, loss, result.ranks)
    mean = sum(measured.values()) / len(measured) if measured else 0.0
    if mean <= 0:
        return {choice.name: 1.0 for choice in choices}
    return {choice.name: max(measured.get(choice.name, mean) / mean, 0.01) for choice in choices}


def allocate_pass(model: nn.Module, name: str, state: RunState, context: RunContext,
                  pending: Mapping[str, Pending], totals: ModelTotals,
                  input_stats_for: Callable[[Sequence[str]], Mapping[str, InputStats]],
                  group: distributed.Group | None = None) -> tuple[dict[str, Allocated | None], BudgetRecord]:
    """Runs the whole-model selector of ``name``'s pass: the decomposition and ranks of every layer in that pass
    (None keeps a layer as it is), and the plan.

    ``pending`` holds the layers the current step compressed before ``name``; ``totals`` are the model's counts
    with them; ``input_stats_for(names)`` gives calibration statistics of layers on the model as it is now (none
    without calibration data). With calibration data every member of the pass gets its statistics, whether its
    decomposition fits to the data or not, so that the selector can price ranks by the layers' output errors; a
    member whose input features calibration cannot form (a 3-D convolution) is priced by its weights instead.
    In a distributed job every rank runs the selector and rank 0's plan is broadcast, so all ranks follow one plan
    even where floating-point results differ in the last bit between processes.
    """
    schedule = state.schedule
    layer = schedule.layers[name]
    registry, settings = context.registry, schedule.settings
    selector = registry.rank_selectors.get(layer.rank_selection)

    taken = state.stages_taken()

    def pass_of(other: str) -> int:
        """The layer's compressions in this run so far (one more when the step compressed it already): a pass holds
        the layers at the same count, whatever stage (``curr_compr_iter``) the schedule started each at."""
        return taken[other] + (other in pending)

    pass_index = pass_of(name)
    members = [other for other in state.layer_names if schedule.layers[other].rank_selection == selector.name
               and pass_of(other) == pass_index]
    # the step keeps a layer whose weights are tied to another module's (unless forced, and even then one that a
    # transformers 4 model ties by its config, see run_step): counted as it is, not planned
    tied_to = tied_parameters(model, members)
    tied = [other for other in tied_to if not schedule.layers[other].force
            or tied_by_config(model, model.get_submodule(other))]
    members = [other for other in members if other not in tied]
    input_stats = input_stats_for([other for other in members if forms_features(
        read_layer(model.get_submodule(other), registry, other)[1].spec)])
    unpriced = [other for other in members if other not in input_stats]
    if unpriced and context.calibration_data is not None:
        log.info("%s: layer(s) %s priced by their weights: calibration forms the input features of Linear layers "
                 "and 1-D or 2-D convolutions only", selector.name, ", ".join(map(repr, unpriced)))
    profiler = None
    if selector.measures_latency(settings.params_for(selector)):
        check_model_inputs(schedule, registry, context.example_input)
        profiler = profiler_for(model, context)
    choices = [choice for other in members
               for choice in layer_choices(other, pending[other].current if other in pending else
                                           model.get_submodule(other), schedule.layers[other], context,
                                           input_stats.get(other), profiler, held_elsewhere(
                                               model, model.get_submodule(other), tied_to.get(other, ())))]
    if context.evaluate is not None:
        sensitivity = sensitivities(model, choices, schedule, context, input_stats, group)
        choices = [attrs.evolve(choice, sensitivity=sensitivity[choice.name]) for choice in choices]
    with distributed.agreement(group, f"rank selection {selector.name!r}"):
        try:
            if profiler is not None:
                factorized = {result.name for result in state.history if result.applied} | {
                    name for name, entry in pending.items() if entry.new is not None}
                totals = timed_totals(model, context, profiler, totals, state.layer_names,
                                      {name: entry.current for name, entry in pending.items()},
                                      pending_replacements(pending, module_paths(model)), factorized,
                                      optimized=selector.times_optimized(settings.params_for(selector)))
            chosen, record = _run_selector(selector, registry.rank_selectors.describe(selector.name),
                                           choices, members, totals, pass_index, settings,
                                           uncounted_outside(state, selector.name, pass_index, pending))
        finally:
            if profiler is not None:
                profiler.close()
    chosen.update(dict.fromkeys(tied))
    if group is None:
        return chosen, record
    plan = distributed.broadcast_json(group, {
        "chosen": {member: None if value is None else [value.decomposition, list(value.ranks)]
                   for member, value in chosen.items()},
        "record": attrs.asdict(record)})
    return ({member: None if value is None else Allocated(value[0], tuple(value[1]))
             for member, value in plan["chosen"].items()}, BudgetRecord(**plan["record"]))


def uncounted_outside(state: RunState, selector: str, pass_index: int, pending: Mapping[str, Any]) -> list[str]:
    """The layers outside ``selector`` that the run compresses after its allocation of pass ``pass_index`` and
    before its next pass (later in the current step, where the step has not reached them, and in the steps after
    it): the allocation counts them as they are now."""
    schedule, taken = state.schedule, state.stages_taken()
    current = state.steps[state.next_step]
    uncounted = [name for name in current if name not in pending and schedule.layers[name].rank_selection != selector]
    from_now = dict.fromkeys(current, 1)  # compressions of each layer from the current step on
    for step in state.steps[state.next_step + 1:]:
        if any(schedule.layers[name].rank_selection == selector
               and taken[name] + from_now.get(name, 0) > pass_index for name in step):
            break  # the selector's next pass, whose allocation counts them
        uncounted += [name for name in step if schedule.layers[name].rank_selection != selector
                      and name not in uncounted]
        for name in step:
            from_now[name] = from_now.get(name, 0) + 1
    return uncounted


def _run_selector(selector: RankSelector, who: str, choices: Sequence[LayerChoice], members: Sequence[str],
                  totals: ModelTotals, pass_index: int, settings: RunSettings, uncounted: Sequence[str] = ()
                  ) -> tuple[dict[str, Allocated | None], BudgetRecord]:
    """The selector's allocation for a pass, checked: a decomposition and ranks (or None) for every member, the
    ranks plain ints (a numpy int from the selector would reach the plan's broadcast and the run state); ``who``
    names the selector and its plugin; ``uncounted`` the layers outside it that the plan counts as they are now
    although the run compresses them before the selector's next pass (its note names them)."""
    params = settings.params_for(selector)
    device = choices[0].sources[0].stored_weight.device if choices else "cpu"
    rounding = RankRounding.of(settings.rank_multiple, device, selector.hardware_rounding, whole_model=True)
    given = [[given_copy(source, settings.params_for(choice.decomposer)) for source in choice.sources]
             for choice in choices]
    try:
        allocation = selector.allocate([attrs.evolve(choice, sources=tuple(copy for copy, _ in copies))
                                        for choice, copies in zip(choices, given)],
                                       totals, pass_index, settings.nglobal_compress_iters, params, rounding)
        for choice, copies in zip(choices, given):
            for _, changed in copies:
                refuse_changed(changed, choice.name, who, "rank selector")
    except Exception as exc:  # a plugin's bug (blamed on it, as engine.blamed does) or a refusal: model untouched
        reason = (f"rank selection {selector.name!r}: {exc}" if isinstance(exc, MuscoError)
                  else f"{who} failed: {type(exc).__name__}: {exc}")
        raise CompressionError(f"{reason}; the model was left as before this step") from exc
    offered: dict[str, dict[str, Decomposer]] = {}
    for choice in choices:
        offered.setdefault(choice.name, {})[choice.decomposer.name] = choice.decomposer
    chosen: dict[str, Allocated | None] = {}
    for member in members:
        candidates = offered.get(member, {})
        ranks = allocation.ranks.get(member, ())
        decomposition = allocation.decompositions.get(member) or next(iter(sorted(candidates)), None)
        if member not in allocation.ranks or ranks is not None and (decomposition not in candidates or len(
                candidates) > 1 and member not in allocation.decompositions):
            raise CompressionError(f"rank selection {selector.name!r} allocated no decomposition and ranks among "
                                   f"{sorted(candidates)} for {member!r}; the model was left as before this step")
        if ranks is None:
            chosen[member] = None
            continue
        try:
            chosen[member] = Allocated(decomposition, checked_ranks(ranks, candidates[decomposition], member, who))
        except CompressionError as exc:
            raise CompressionError(f"{exc}; the model was left as before this step") from None
    note = "; ".join(filter(None, [allocation.note, uncounted and (
        f"layer(s) {', '.join(map(repr, uncounted))} outside it are compressed after this plan and counted as they "
        f"are now: the model can end more reduced than planned (compress them in an earlier step, or under the "
        f"same selector)")])) or None
    if note:
        log.warning("%s: %s", selector.name, note)
    record = BudgetRecord(selector.name, pass_index, settings.nglobal_compress_iters, allocation.metric,
                          allocation.target, allocation.planned, note)
    return chosen, record
