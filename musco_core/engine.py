"""Compressing one layer: read it, choose ranks, refuse a 'compression' that grows it, factorize, rebuild."""
from __future__ import annotations

import functools
import logging
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from .components import Cost, Decomposer, Factor, FactorLayout, InputStats, LayerSpec, RankRounding, WeightSource
from .errors import CompressionError, MuscoError, UnsupportedLayerError, short_repr
from .factors import chain_cost, compose_factors, dense_weight, fewer_macs_at_any_input, layer_layout, widen
from .registry import Registry
from .schedule import LayerSchedule, NonNegativeFloat, NonNegativeInt, RunSettings
from .surgery import FactorizedLayer, carry_training_state, factor_mismatch, why_not_recompressible
from .verify import check_factorized

log = logging.getLogger(__name__)


@attrs.frozen
class LayerResult:
    """What happened to one layer at one compression: the figures before and after, or why it was kept.

    ``relative_error`` is that of the new weights against the layer as this compression found it (at a later
    stage, the earlier stage's factors), not against the original layer."""

    name: str
    decomposition: str
    rank_selection: str
    stage: NonNegativeInt
    ranks: tuple[int, ...] | None
    applied: bool
    params_before: NonNegativeInt
    params_after: NonNegativeInt
    macs_before: NonNegativeInt | None = None
    macs_after: NonNegativeInt | None = None
    relative_error: NonNegativeFloat | None = None
    seconds: NonNegativeFloat = 0.0
    note: str | None = None

    def kept(self, why: str) -> LayerResult:
        """This result for the layer left as it is after all, ``why`` added to the note: no ranks (those refused
        are not the layer's) and its counts as they were."""
        return attrs.evolve(self, ranks=None, applied=False, params_after=self.params_before,
                            macs_after=self.macs_before, relative_error=None,
                            note="; ".join(filter(None, [self.note, f"kept as is: {why}"])))


def read_layer(module: nn.Module, registry: Registry, name: str):
    """The adapter, weight source and bias of a plain or already factorized layer."""
    if isinstance(module, FactorizedLayer):
        if (reason := why_not_recompressible(module)) is not None:
            raise UnsupportedLayerError(f"layer {name!r}: {reason}")
        adapter = registry.adapters.get(module.spec.adapter)
        if (reason := factor_mismatch(module, adapter)) is not None:
            raise UnsupportedLayerError(f"layer {name!r}: {reason}")
        factors = [adapter.read_factor(child, layout) for child, layout in zip(module, module.layouts, strict=True)]
        if (index := next((i for i, f in enumerate(factors) if f.weight.shape != f.layout.weight_shape), None)
                ) is not None:  # else a decomposer gets it, and the error blames the decomposer
            source = registry.adapters.entries[adapter.name].source
            raise CompressionError(
                f"layer {name!r}: layer adapter {adapter.name!r} of plugin {source.name!r} ({source.distribution}) "
                f"read factor {index} back with a weight of shape {tuple(factors[index].weight.shape)}, its layout "
                f"says {factors[index].layout.weight_shape}: its read_factor() must give the weight in conv layout "
                f"(out, in // groups, *kernel), as build() takes it")
        bias = next((f.bias for f in factors if f.layout.bias), None)
        dense = functools.partial(compose_factors, module.spec, factors)
        return adapter, WeightSource(module.spec, factors, module.decomposition, dense=dense), bias
    adapter = registry.adapter_for(module)
    if adapter is None:
        hint = ("; a plain Sequential stands where the run left a factorized layer: was standardize_model called "
                "already? Call it after the last step only (the layers it makes plain cannot be compressed again)"
                if type(module) is nn.Sequential else "")
        raise UnsupportedLayerError(f"layer {name!r}: {registry.unsupported_reason(module)}{hint}")
    spec, weight, bias = adapter.read(module)
    return adapter, WeightSource(spec, dense=weight), bias


def layer_specs(model: nn.Module, names: Iterable[str], registry: Registry) -> dict[str, LayerSpec]:
    """The :class:`LayerSpec` of each named layer of ``model``, as its adapter reads it (:func:`read_layer`)."""
    return {name: read_layer(model.get_submodule(name), registry, name)[1].spec for name in names}


def refuse_non_finite(source: WeightSource, name: str) -> None:
    """One error naming the layer where its weights hold a NaN or Inf, before any rank selector or decomposition
    reads them (their linear algebra fails with messages that name neither)."""
    current = [f.weight for f in source.factors] if source.factors else [source.weight]
    if not all(torch.isfinite(w).all() for w in current):
        raise CompressionError(f"layer {name!r} has non-finite weights (NaN or Inf); fix the model or leave the "
                               f"layer out of the schedule")


def one_group(spec: LayerSpec) -> LayerSpec:
    """The geometry of one group of a grouped layer (the layer's own with one group)."""
    if spec.groups == 1:
        return spec
    return attrs.evolve(spec, out_channels=spec.out_channels // spec.groups,
                        in_channels=spec.in_channels // spec.groups, groups=1)


def split_groups(source: WeightSource) -> tuple[LayerSpec, list[WeightSource]]:
    """A grouped layer as independent per-group layers: their spec and one source per group.

    A layer with one group is returned as it is. Each group of a factorized layer keeps its slice of the earlier
    factors, as a layer with one group keeps its factors: a decomposer re-compresses them and its ``max_ranks`` is
    the group's current rank (dense, the limit was the group's size, and vbmf's later ranks could exceed the
    current ones, so the layer was kept at its first ranks).
    """
    spec, groups = source.spec, source.spec.groups
    if groups == 1:
        return spec, [source]
    group_spec = one_group(spec)
    out_size, in_size = group_spec.out_channels, group_spec.in_channels
    weight = source.weight  # (out, in // groups, *k) when dense; the block-diagonal (out, in, *k) when composed
    blocks = [weight[g * out_size:(g + 1) * out_size] if not source.factors else
              weight[g * out_size:(g + 1) * out_size, g * in_size:(g + 1) * in_size] for g in range(groups)]
    stats = source.input_stats

    def group_factors(g: int) -> list[Factor] | None:
        """Group ``g``'s slice of each factor (the core widened every per-group layout over the groups)."""
        if not source.factors:
            return None
        sliced = []
        for factor in source.factors:
            layout = factor.layout
            rows = slice(g * layout.out_channels // groups, (g + 1) * layout.out_channels // groups)
            sliced.append(Factor(attrs.evolve(layout, out_channels=layout.out_channels // groups,
                                              in_channels=layout.in_channels // groups, groups=layout.groups // groups),
                                 factor.weight[rows], None if factor.bias is None else factor.bias[rows]))
        return sliced

    return group_spec, [WeightSource(group_spec, group_factors(g), source.previous, dense=block,
                                     input_stats=None if stats is None else stats.group(g, groups))
                        for g, block in enumerate(blocks)]


def blamed(call: Callable[[], object], name: str, component: str) -> Any:
    """``call()``; an exception other than musco-core's own becomes a CompressionError naming the layer and the
    ``component`` (with its plugin) that raised it, which the exception alone does not tell among several plugins."""
    try:
        return call()
    except MuscoError:
        raise
    except Exception as exc:
        raise CompressionError(f"layer {name!r}: {component} failed: {type(exc).__name__}: {exc}") from exc


def checked_ranks(ranks: object, decomposer: Decomposer, name: str, selector: str) -> tuple[int, ...]:
    """``ranks`` from the rank selector described by ``selector`` as ints, once they are one positive int (numpy's
    too, never a bool) per rank of the decomposition; a CompressionError naming the layer and selector otherwise."""
    expected = len(decomposer.rank_names)

    def as_rank(rank: object) -> int | None:
        if isinstance(rank, bool) or isinstance(rank, torch.Tensor) and rank.dtype == torch.bool:
            return None
        try:
            value = operator.index(rank)
        except TypeError:  # a float, a numpy bool, a string...
            return None
        return value if value > 0 else None

    values = [as_rank(rank) for rank in ranks] if isinstance(ranks, (tuple, list)) else None
    if values is None or len(values) != expected or None in values:
        raise CompressionError(
            f"layer {name!r}: {selector} chose ranks {short_repr(ranks)}; {decomposer.name} takes {expected} "
            f"rank(s) ({', '.join(decomposer.rank_names)}), each a positive int")
    return tuple(values)


def _checked_factors(weights: object, layouts: Sequence[FactorLayout], name: str, decomposer: str
                    ) -> list[torch.Tensor]:
    """The factor weights of one group from the decomposer described by ``decomposer``, once they are what its
    layouts say: one finite, real floating-point tensor of each layout's shape; a CompressionError otherwise."""
    if not isinstance(weights, (tuple, list)) or len(weights) != len(layouts):
        got = f"{len(weights)} factor(s)" if isinstance(weights, (tuple, list)) else short_repr(weights)
        raise CompressionError(f"layer {name!r}: {decomposer} returned {got}; its layout has {len(layouts)}")
    for index, (weight, layout) in enumerate(zip(weights, layouts)):
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            what = f"of dtype {weight.dtype}" if isinstance(weight, torch.Tensor) else f"as a {type(weight).__name__}"
            raise CompressionError(f"layer {name!r}: {decomposer} returned factor {index} {what}; expected a "
                                   f"real floating-point tensor")
        if tuple(weight.shape) != layout.weight_shape:
            raise CompressionError(f"layer {name!r}: {decomposer} returned factor {index} of shape "
                                   f"{tuple(weight.shape)}, its layout says {layout.weight_shape}")
        if not torch.isfinite(weight).all():
            raise CompressionError(f"layer {name!r}: {decomposer} produced non-finite weights")
    return list(weights)


def given_copy(source: WeightSource, params: object) -> tuple[WeightSource, Callable[[], str | None]]:
    """A copy of ``source`` for a plugin (a decomposer or a rank selector), with the ``params`` the run decomposes
    it with, sharing no storage with the layer (its dense weight copied when first asked), and a function that
    names the first of the copy's tensors that differs from ``source``'s, or None: a plugin that writes to its
    input changes neither the model nor what is decomposed after it nor the reference of the reported error, and
    is caught (see :func:`refuse_changed`)."""
    factors = None if source.factors is None else [
        attrs.evolve(f, weight=f.weight.clone(), bias=None if f.bias is None else f.bias.clone())
        for f in source.factors]
    dense: list[torch.Tensor] = []

    def weight() -> torch.Tensor:
        dense.append(source.weight.clone())
        return dense[0]

    moments = _moments_fingerprint(source.input_stats)

    def changed() -> str | None:
        pairs = [("source.weight", source.weight, copy) for copy in dense]
        for index, (original, copy) in enumerate(zip(source.factors or (), factors or ())):
            pairs.append((f"source.factors[{index}].weight", original.weight, copy.weight))
            if original.bias is not None:
                pairs.append((f"source.factors[{index}].bias", original.bias, copy.bias))
        weights = next((what for what, original, copy in pairs
                        if (original.shape, original.dtype) != (copy.shape, copy.dtype)
                        or not torch.allclose(original, copy, rtol=0.0, atol=0.0, equal_nan=True)), None)
        now = _moments_fingerprint(source.input_stats)
        return weights or next((f"source.input_stats.{field}" for field in moments
                                if now.get(field) != moments[field]), None)

    return WeightSource(source.spec, factors, source.previous, dense=weight, input_stats=source.input_stats,
                        params=params), changed


def _moments_fingerprint(stats: InputStats | None) -> dict[str, tuple]:
    """A fingerprint of each moment in ``stats``: the statistics are not copied for plugins (each is ``F x F`` and
    shared by every plugin that reads the layer), so a plugin that writes to them is caught by these reductions,
    computed without a copy: shape, sum, norm and two strided sums (a write that keeps all five is contrived)."""
    if stats is None:
        return {}
    moments = {field: getattr(stats, field) for field in ("second_moment", "cross_moment", "output_moment")}

    def reductions(moment: torch.Tensor) -> tuple:  # hex: exact, and NaN equals NaN
        flat = moment.reshape(-1)
        values = (moment.sum(), torch.linalg.vector_norm(moment), flat[::3].sum(), flat[1::7].sum())
        return (tuple(moment.shape), *(float(value).hex() for value in values))

    return {field: reductions(moment) for field, moment in moments.items() if moment is not None}


def refuse_changed(changed: Callable[[], str | None], name: str, who: str, role: str) -> None:
    """A CompressionError naming the layer and the plugin ``who`` (a ``role``) when ``changed`` (from
    :func:`given_copy`) finds that it wrote to its copy of the layer's weights, or to their statistics."""
    if (what := changed()) is not None:
        raise CompressionError(f"layer {name!r}: {who} changed {what} in place; a {role} must leave its input as it "
                               f"is (the layer's weights and their statistics, which the decomposition fits and the "
                               f"error is measured on)")


def usable_decompositions(registry: Registry, layer: LayerSchedule, group_spec: LayerSpec) -> list[Decomposer]:
    """The layer's candidate decompositions that can factorize a group of its geometry, in the schedule's order."""
    decomposers = [registry.decompositions.get(name) for name in layer.candidates]
    return [decomposer for decomposer in decomposers if decomposer.unsupported_reason(group_spec) is None]


def factorized_like(module: nn.Module, name: str, decomposition: str, ranks: tuple[int, ...], registry: Registry
                    ) -> FactorizedLayer:
    """The layer :func:`compress_layer` builds for ``module`` with ``decomposition`` at ``ranks``, with zero weights
    (filled afterwards, e.g. by the rank that decomposed it in a distributed run)."""
    adapter, source, bias = read_layer(module, registry, name)
    layouts = [widen(layout, source.spec.groups)
               for layout in registry.decompositions.get(decomposition).layout(one_group(source.spec), ranks)]
    like = source.stored_weight
    factors = [Factor(layout, like.new_zeros(layout.weight_shape), bias if layout.bias else None)
               for layout in layouts]
    new = FactorizedLayer(source.spec, decomposition, ranks, layouts, adapter.build(source.spec, factors, like))
    carry_training_state(module, new)
    return new


def compress_layer(module: nn.Module, name: str, schedule: LayerSchedule, settings: RunSettings,
                   registry: Registry, input_shape: Sequence[int] | None = None, *,
                   ranks: tuple[int, ...] | None = None, keep_note: str | None = None,
                   input_stats: InputStats | None = None, calls: Sequence[tuple[Sequence[int], int]] | None = None
                   ) -> tuple[FactorizedLayer | None, LayerResult]:
    """Factorizes ``module`` per ``schedule``; returns the new layer (None when it is kept) and the result.

    ``input_shape`` is the layer's input on the example input (the new layer is checked on it); ``calls`` every
    input shape it runs at with its number of calls (:attr:`~musco_core.stats.LayerStats.input_calls`), which the
    result's MACs count, by default one call at ``input_shape``.

    ``ranks`` chosen by a whole-model rank selector replace the schedule's per-layer selection; ``keep_note``
    keeps the layer as it is, with that note. ``input_stats`` (the layer's calibration statistics) reach the
    decomposer as ``source.input_stats``, split per group. The model is not touched: the caller swaps the new
    layer in, so a failing step changes nothing.
    """
    started = time.perf_counter()
    adapter, source, bias = read_layer(module, registry, name)
    source.input_stats = input_stats
    spec: LayerSpec = source.spec
    refuse_non_finite(source, name)
    stage = schedule.curr_compr_iter
    current_layouts = [f.layout for f in source.factors] if source.factors else layer_layout(spec)
    if calls is None and input_shape is not None:
        calls = ((input_shape, 1),)
    params_before, macs_before = before = chain_cost(spec, current_layouts, calls)
    if keep_note is not None:  # labelled with the decompositions it lists: none of them was applied
        log.info("layer %r: %s", name, keep_note)
        return None, LayerResult(name, "/".join(schedule.candidates), schedule.rank_selection, stage, None, False,
                                 params_before, params_before, macs_before, macs_before, note=keep_note,
                                 seconds=time.perf_counter() - started)
    decomposer = registry.decompositions.get(schedule.decomposition)
    group_spec, group_sources = split_groups(source)
    decomposer.check(group_spec)
    selector = registry.rank_selectors.get(schedule.rank_selection)
    chooser = registry.rank_selectors.describe(selector.name)
    shortfall = None
    params = settings.params_for(decomposer)
    if ranks is None:
        given = [given_copy(s, params) for s in group_sources]
        ranks = tuple(max(per_group) for per_group in zip(*(
            checked_ranks(blamed(lambda s=s: selector.select(decomposer, s, stage, schedule.rank_params), name,
                                 chooser), decomposer, name, chooser)
            for s, _ in given)))
        shortfall = next(filter(None, (selector.shortfall(decomposer, s, ranks, schedule.rank_params)
                                       for s, _ in given)), None)
        for _, changed in given:
            refuse_changed(changed, name, chooser, "rank selector")
        if shortfall is not None and not isinstance(shortfall, str):
            raise CompressionError(f"layer {name!r}: {chooser} gave the shortfall {short_repr(shortfall)}; "
                                   f"expected None or a string")
        if shortfall:
            log.warning("layer %r: %s", name, shortfall)
    else:
        ranks = checked_ranks(ranks, decomposer, name, chooser)
    like = source.stored_weight
    rounding = RankRounding.of(settings.rank_multiple, like.device, selector.hardware_rounding)
    limits = decomposer.max_ranks(group_sources[0])
    chosen, rounded = ranks, rounding(ranks)
    ranks = rounding(rounded, limits)

    def priced(ranks: tuple[int, ...]) -> tuple[list[FactorLayout], list[FactorLayout], Cost, bool | None]:
        group_layouts = decomposer.layout(group_spec, ranks)
        layouts = [widen(layout, spec.groups) for layout in group_layouts]
        after = chain_cost(spec, layouts, calls)
        # without an input shape the MACs are compared at every input size where that is bounded, else not at all
        fewer_macs = True if after.macs is not None else fewer_macs_at_any_input(spec, layouts, current_layouts)
        return group_layouts, layouts, after, fewer_macs

    def shrinks(after: Cost, fewer_macs: bool | None) -> bool:
        return after.smaller_than(before) and fewer_macs is not False

    group_layouts, layouts, after, fewer_macs = priced(ranks)
    unrounded = RankRounding()(chosen, limits)
    # auto rounds up for speed where that is cheap, never where it costs the layer its compression (a 68 x 68
    # Linear at rank 33 keeps 4488 of 4624 weights; auto's 40 keeps 5440, and the layer was left dense)
    not_rounded = False
    if rounding.max_growth is not None and ranks != unrounded and not shrinks(after, fewer_macs):
        fallback = priced(unrounded)
        if not_rounded := shrinks(*fallback[2:]):
            group_layouts, layouts, after, fewer_macs = fallback
            ranks, rounded = unrounded, chosen
    notes = [shortfall,
             f"ranks {chosen} rounded up to {rounded} (rank_multiple {settings.rank_multiple})"
             if rounded != chosen and ranks != chosen else None,
             f"ranks {rounded} clamped to {ranks} (the layer's limits)" if ranks != rounded else None,
             f"ranks {chosen} not rounded up to {rounding(chosen, limits)} (rank_multiple {settings.rank_multiple}): "
             f"that would not make the layer smaller" if not_rounded else None]
    note = "; ".join(filter(None, notes)) or None

    params_after, macs_after = after
    if fewer_macs is None:
        note = "; ".join(filter(None, [note, "only its weights were compared, not its MACs: with no example input "
                                             "to count them on, a small input can make a factor ahead of a "
                                             "convolution with less padding than its kernel reaches cost more"]))
    result = LayerResult(name, schedule.decomposition, schedule.rank_selection, stage, ranks, False,
                         params_before, params_before, macs_before, macs_before, note=note)

    if not shrinks(after, fewer_macs) and not schedule.force:
        reason = (f"{schedule.decomposition} at ranks {ranks} would not be smaller "
                  f"({params_after} vs {params_before} weights"
                  + (f", {macs_after} vs {macs_before} MACs)" if macs_after is not None else
                     ", and more MACs at some input sizes)" if fewer_macs is False else ")"))
        log.info("layer %r: kept as is: %s", name, reason)
        return None, attrs.evolve(result.kept(reason), seconds=time.perf_counter() - started)

    maker = registry.decompositions.describe(decomposer.name)
    with torch.no_grad():
        per_group = []
        for group_source in group_sources:
            given, changed = given_copy(group_source, params)
            weights = blamed(lambda given=given: decomposer.decompose(given, ranks, params, seed=settings.seed), name,
                             maker)
            refuse_changed(changed, name, maker, "decomposer")
            per_group.append(_checked_factors(weights, group_layouts, name, maker))
        factors = [Factor(layout, torch.cat(group_weights).to(like.dtype), bias if layout.bias else None)
                   for layout, group_weights in zip(layouts, zip(*per_group), strict=True)]
        reference = source.weight if source.factors else dense_weight(source.weight, spec.groups)
        reference = reference.to(torch.float64)  # float64: norms of 1e20 or 1e-30 weights stay finite
        approximation = compose_factors(spec, factors).to(torch.float64)
        error = float(torch.linalg.vector_norm(approximation - reference)
                      / torch.linalg.vector_norm(reference).clamp_min(torch.finfo(torch.float64).tiny))
        new = FactorizedLayer(spec, decomposer.name, ranks, layouts, adapter.build(spec, factors, like))
        read = source.factors or [Factor(layer_layout(spec)[0], source.weight, bias)]
        check_factorized(name, module, new, read, decomposer, registry, input_shape, params)
    carry_training_state(module, new)
    result = attrs.evolve(result, applied=True, params_after=params_after, macs_after=macs_after,
                          relative_error=error, seconds=time.perf_counter() - started)
    log.info("layer %r: %s ranks %s, weights %d -> %d, relative error %.4f", name, decomposer.name, ranks,
             params_before, params_after, error)
    return new, result
