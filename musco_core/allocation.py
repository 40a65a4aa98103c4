"""Whole-model rank allocation: a rank selector of scope ``"model"`` chooses the ranks of every layer of a pass at once.

A pass holds every layer that uses the selector at the same stage. When a step reaches the first of them, the
selector sees them all together, on the model as it is then (with the step's earlier replacements counted), and
fixes their ranks until each is compressed. With an ``evaluate`` function a sensitivity pass first measures how
much each layer's compression alone hurts the model.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from .components import InputStats, LayerChoice, ModelTotals, RankSelector
from .engine import LayerResult, compress_layer, factorized_like, read_layer, split_groups, usable_decompositions
from . import distributed
from .errors import CompressionError, ConfigError, MuscoError
from .factors import chain_cost, layer_layout, widen
from .latency import Chain, LatencyProfiler
from .report import BudgetRecord
from .schedule import LayerSchedule, ModelSchedule, RunSettings
from .state import Allocated, RunContext, RunState
from .surgery import FactorizedLayer, module_paths, replace_module
from .timing import call_model

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
                  input_stats: InputStats | None, profiler: LatencyProfiler | None = None) -> list[LayerChoice]:
    """The layer as a whole-model selector sees it, once per candidate decomposition that can factorize it, priced
    with the report's own arithmetic (and, given a ``profiler``, with measured times)."""
    _, source, _ = read_layer(module, context.registry, name)
    source.input_stats = input_stats
    group_spec, group_sources = split_groups(source)
    current = tuple(f.layout for f in source.factors) if source.factors else tuple(layer_layout(source.spec))
    stats = context.model_stats.layers.get(name)
    input_shape = stats.input_shape if stats else None
    choices = []
    for decomposer in usable_decompositions(context.registry, layer, group_spec):
        def price(ranks: Ranks | None, decomposer=decomposer):
            layouts = current if ranks is None else [widen(layout, source.spec.groups)
                                                     for layout in decomposer.layout(group_spec, ranks)]
            return chain_cost(source.spec, layouts, input_shape)

        def measure(ranks_list: Sequence[Ranks | None], decomposer=decomposer) -> list[float]:
            chains = [Chain(source.spec, current if ranks is None else tuple(
                widen(layout, source.spec.groups) for layout in decomposer.layout(group_spec, ranks)), input_shape)
                for ranks in ranks_list]
            return profiler.seconds([chains])[0]

        choices.append(LayerChoice(name, decomposer, source.spec, tuple(group_sources), current, price, input_shape,
                                   measure=None if profiler is None or input_shape is None else measure))
    return choices


def selector_params(selector: RankSelector, settings: RunSettings) -> Any:
    """A whole-model selector's run parameters: ``settings.algo_kwargs[name]``, or its defaults."""
    return settings.algo_kwargs.get(selector.name) or selector.Params()


def check_latency_input(schedule: ModelSchedule, registry: Any, example_input: Any) -> None:
    """A ConfigError when a whole-model selector of the schedule measures latency but there is no example input to
    time the model on."""
    if example_input is not None:
        return
    for layer in schedule.layers.values():
        selector = None if layer is None else registry.rank_selectors.get(layer.rank_selection)
        if selector is not None and selector.scope == "model" and selector.measures_latency(
                selector_params(selector, schedule.settings)):
            raise ConfigError(f"{schedule.origin}: $.settings.algo_kwargs.{selector.name}: metric latency times the "
                              f"model and its layers on the example input: give the compressor an example_input "
                              f"(--input-shape on the command line)")


@contextmanager
def swapped(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """The model with the modules at these paths replaced, put back afterwards (also on error)."""
    originals = {path: model.get_submodule(path) for path in replacements}
    try:
        for path, new in replacements.items():
            replace_module(model, path, new)
        yield model
    finally:
        for path, module in originals.items():
            replace_module(model, path, module)


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """The modules in eval mode (timing must not update BatchNorm statistics), each one's own mode put back after."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def profiler_for(model: nn.Module, context: RunContext) -> LatencyProfiler:
    """The latency profiler of a step: on the device and dtype of the model's first weight, the context's timer."""
    like = next((p for p in model.parameters() if p.is_floating_point()), None)
    if like is None:
        raise ConfigError(f"{type(model).__name__} has no floating-point weights to time the layers on")
    return LatencyProfiler(context.registry, like.detach(), timer=context.latency_timer, progress=context.progress)


def pending_replacements(pending: Mapping[str, Pending], paths: Mapping[int, list[str]]) -> dict[str, nn.Module]:
    """Every path at which a replacement of the step is to be swapped in."""
    return {path: entry.new for entry in pending.values() if entry.new is not None for path in paths[id(entry.module)]}


class _FixedOutput(nn.Module):
    """Stands in for a layer when the rest of the model is timed: returns the layer's output, computing nothing."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.output


def _timed_totals(model: nn.Module, state: RunState, context: RunContext, pending: Mapping[str, Pending],
                  totals: ModelTotals, profiler: LatencyProfiler) -> ModelTotals:
    """``totals`` with measured seconds, in the units of the layers' chain times (timed alone, cached).

    The model as the step leaves it so far is timed in alternation with its *rest*: the same model with every
    compressible layer returning a fixed output. Their difference is the layers' time in place; dividing it by the
    layers' summed times alone gives the scale between a long forward pass and short layer calls (on a shared
    machine, preemption inflates the first more than the medians of the second), and the model's time in layer
    units. Its time before compression adds, for every layer factorized so far, its dense time minus its chain's;
    the scheduled layers' seconds are their summed times."""
    paths = module_paths(model)
    replacements = pending_replacements(pending, paths)
    current = {name: pending[name].current if name in pending else model.get_submodule(name)
               for name in context.model_stats.layers}
    reached = {name: stats for name, stats in context.model_stats.layers.items()
               if stats.input_shape is not None and stats.output_shape is not None}
    layers = []
    for name, stats in reached.items():
        layouts = current[name].layouts if isinstance(current[name], FactorizedLayer) else layer_layout(stats.spec)
        layers.append([Chain.dense(stats.spec, stats.input_shape), Chain(stats.spec, tuple(layouts),
                                                                          stats.input_shape)])
    times = dict(zip(reached, profiler.seconds(layers)))
    stubs = {path: _FixedOutput(torch.zeros(stats.output_shape, device=profiler.device, dtype=profiler.dtype))
             for name, stats in reached.items() for path in paths[id(model.get_submodule(name))]}

    def whole() -> Any:
        return call_model(model, context.example_input)

    def rest() -> Any:
        with swapped(model, stubs):
            return call_model(model, context.example_input)

    with swapped(model, replacements), evaluating(model):
        model_seconds, rest_seconds = profiler.calls([whole, rest])
    alone = sum(chain for _, chain in times.values())
    in_place = model_seconds - rest_seconds
    scale = in_place / alone if in_place > 0 and alone > 0 else 1.0
    now = model_seconds / scale
    log.info("latency: the model takes %.2f ms, of which its compressible layers %.2f ms in place and %.2f ms "
             "timed alone; the rest %.1f%%", 1e3 * model_seconds, 1e3 * in_place, 1e3 * alone,
             100 * rest_seconds / model_seconds)
    original = now + sum(dense - chain for dense, chain in times.values())
    scheduled = [times[name] for name in state.layer_names if name in times]

    def speedup_of(plan: Mapping[str, tuple[str, Ranks] | None]) -> float:
        planned = {path: new for name, chosen in plan.items() if chosen is not None
                   for new in [factorized_like(current[name], name, chosen[0], chosen[1], context.registry)]
                   for path in paths[id(model.get_submodule(name))]}

        def with_plan() -> Any:
            with swapped(model, planned):
                return call_model(model, context.example_input)

        with swapped(model, replacements), evaluating(model, *planned.values()):
            as_is, planned_seconds = profiler.calls([whole, with_plan])
        return as_is / planned_seconds

    return attrs.evolve(totals, seconds_original=original, seconds_now=now, speedup_of=speedup_of,
                        scheduled=attrs.evolve(totals.scheduled, seconds_original=sum(dense for dense, _ in scheduled),
                                               seconds_now=sum(chain for _, chain in scheduled)))


def sensitivities(model: nn.Module, choices: Sequence[LayerChoice], schedule: ModelSchedule, context: RunContext,
                  input_stats: Mapping[str, InputStats], group: distributed.Group | None = None) -> dict[str, float]:
    """Loss growth per unit of relative squared weight error of each layer, compressed alone at half its ranks,
    relative to the mean over the layers (floored at 1% of it; 1.0 where nothing was measured).

    Each probe is swapped in and back out, also on error, so the model is as it was afterwards. With a distributed
    ``group`` each rank's ``evaluate`` measures the loss on its own shard and the losses are averaged over the
    ranks (the loss of all the data when the shards are the same size).
    """
    paths = module_paths(model)
    with distributed.agreement(group, "sensitivity pass: evaluate"):
        base = float(context.evaluate(model))
    base = distributed.mean(group, base)
    measured: dict[str, float] = {}
    first = list({choice.name: choice for choice in reversed(choices)}.values())[::-1]  # a layer's first candidate
    for choice in tqdm(first, desc="sensitivity pass", unit="layer", leave=False, file=sys.stderr,
                       disable=not (context.progress and sys.stderr.isatty())):
        module = model.get_submodule(choice.name)
        probe = tuple(max(choice.decomposer.min_rank, limit // 2)
                      for limit in choice.decomposer.max_ranks(choice.sources[0]))
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
                try:
                    for path in paths[id(module)]:
                        replace_module(model, path, new)
                    loss = float(context.evaluate(model))
                finally:
                    for path in paths[id(module)]:
                        replace_module(model, path, module)
        # whether a probe ran depends on its ranks and weights alone, the same on every rank
        if loss is None:
            continue
        measured[choice.name] = max(distributed.mean(group, loss) - base, 0.0) / result.relative_error ** 2
        log.debug("sensitivity of %r: loss %.4g -> %.4g at ranks %s", choice.name, base, loss, probe)
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
    with them; ``input_stats_for(names)`` gives calibration statistics of layers on the model as it is now.
    In a distributed job every rank runs the selector and rank 0's plan is broadcast, so all ranks follow one plan
    even where floating-point results differ in the last bit between processes.
    """
    schedule = state.schedule
    layer = schedule.layers[name]
    registry, settings = context.registry, schedule.settings
    selector = registry.rank_selectors.get(layer.rank_selection)

    def stage(other: str) -> int:  # a layer compressed earlier in this step is one stage on
        return schedule.layers[other].curr_compr_iter + (other in pending)

    members = [other for other in state.layer_names if schedule.layers[other].rank_selection == selector.name
               and stage(other) == layer.curr_compr_iter]
    input_stats = input_stats_for(members)
    profiler = None
    if selector.measures_latency(selector_params(selector, settings)):
        check_latency_input(schedule, registry, context.example_input)
        profiler = profiler_for(model, context)
    choices = [choice for other in members
               for choice in layer_choices(other, pending[other].current if other in pending else
                                           model.get_submodule(other), schedule.layers[other], context,
                                           input_stats.get(other), profiler)]
    if context.evaluate is not None:
        sensitivity = sensitivities(model, choices, schedule, context, input_stats, group)
        choices = [attrs.evolve(choice, sensitivity=sensitivity[choice.name]) for choice in choices]
    pass_index = layer.curr_compr_iter - state.initial_schedule.layers[name].curr_compr_iter
    with distributed.agreement(group, f"rank selection {selector.name!r}"):
        try:
            if profiler is not None:
                totals = _timed_totals(model, state, context, pending, totals, profiler)
            chosen, record = _run_selector(selector, choices, members, totals, pass_index, settings)
        finally:
            if profiler is not None:
                profiler.close()
    if group is None:
        return chosen, record
    plan = distributed.broadcast_json(group, {
        "chosen": {member: None if value is None else [value.decomposition, list(value.ranks)]
                   for member, value in chosen.items()},
        "record": attrs.asdict(record)})
    return ({member: None if value is None else Allocated(value[0], tuple(value[1]))
             for member, value in plan["chosen"].items()}, BudgetRecord(**plan["record"]))


def _run_selector(selector: RankSelector, choices: Sequence[LayerChoice], members: Sequence[str],
                  totals: ModelTotals, pass_index: int, settings: RunSettings
                  ) -> tuple[dict[str, Allocated | None], BudgetRecord]:
    """The selector's allocation for a pass, checked: a decomposition and ranks (or None) for every member."""
    params = selector_params(selector, settings)
    try:
        allocation = selector.allocate(choices, totals, pass_index, settings.nglobal_compress_iters, params,
                                       settings.rank_multiple)
    except Exception as exc:  # a plugin's bug as well as a refusal: the model was not touched
        reason = str(exc) if isinstance(exc, MuscoError) else f"{type(exc).__name__}: {exc}"
        raise CompressionError(f"rank selection {selector.name!r}: {reason}; the model was left as before "
                               f"this step") from exc
    offered: dict[str, set[str]] = {}
    for choice in choices:
        offered.setdefault(choice.name, set()).add(choice.decomposer.name)
    chosen: dict[str, Allocated | None] = {}
    for member in members:
        ranks = allocation.ranks.get(member, ())
        decomposition = allocation.decompositions.get(member) or next(iter(sorted(offered.get(member, ()))), None)
        if ranks == () or ranks is not None and (decomposition not in offered.get(member, ()) or len(
                offered[member]) > 1 and member not in allocation.decompositions):
            raise CompressionError(f"rank selection {selector.name!r} allocated no decomposition and ranks among "
                                   f"{sorted(offered.get(member, ()))} for {member!r}; the model was left as before "
                                   f"this step")
        chosen[member] = None if ranks is None else Allocated(decomposition, tuple(ranks))
    if allocation.note:
        log.warning("%s: %s", selector.name, allocation.note)
    record = BudgetRecord(selector.name, pass_index, settings.nglobal_compress_iters, allocation.metric,
                          allocation.target, allocation.planned, allocation.note)
    return chosen, record
