"""The original's config helpers: ``generate_model_compr_kwargs`` and ``validate_model_compr_kwargs``."""
from __future__ import annotations

import logging
import math
from typing import Any

import attrs

from .components import Cost, Decomposer, LayerSpec, WeightSource
from .engine import one_group
from .errors import ConfigError, short_repr
from .registry import Registry, default_registry
from .schedule import ModelSchedule, ScheduleCodec
from .stats import LayerStats, ModelStats, as_model_stats

log = logging.getLogger(__name__)

CONFIG_TYPES = ("none", "vbmf", "param_reduction", "budget", "template")
_TEMPLATE_KEYS = ("decomposition", "rank_selection", "manual_rank", "param_reduction_rate",
                  "vbmf_weakenen_factor")


def _default_decomposition(layer: LayerStats) -> str:
    return "svd" if layer.spec.is_pointwise else "tucker2"


def _why_not(layer: LayerStats, decomposition: str, rank_selection: str, params, registry: Registry) -> str | None:
    """Why the default entry would not shrink this layer (checked from its geometry alone), or None.

    A grouped convolution is decomposed group by group, so it is checked as one of its groups: a depthwise one
    (one input channel per group) has no channels for the default decomposition to shrink. Its kernels may still
    factorize (cp4 at rank 1 takes a 5x5 one from 25 weights to 12), so the reason names the default, not every
    decomposition."""
    spec = layer.spec
    if spec.groups != 1 and spec.in_channels == spec.groups:
        # cp4 at rank 1 keeps 1 + kh + kw + (outputs per group) weights of each group's kh x kw kernels
        separable = spec.spatial_dims == 2 and (1 + sum(spec.kernel_size) + spec.out_channels // spec.groups
                                                < spec.kernel_numel * spec.out_channels // spec.groups)
        return (f"depthwise convolution: each of its {spec.groups} groups has one input channel, which "
                f"{decomposition} cannot make smaller"
                + (" (cp4, which factorizes each kernel, may: name the layer in the schedule to try it)"
                   if separable else ""))
    reason = _group_why_not(one_group(spec), decomposition, rank_selection, params, registry)
    if reason and spec.groups != 1:
        group = one_group(spec)
        return (f"grouped convolution, decomposed group by group: for each of its {spec.groups} groups "
                f"({group.in_channels} -> {group.out_channels} channels) {reason}")
    return reason


def _group_why_not(spec: LayerSpec, decomposition: str, rank_selection: str, params, registry: Registry
                   ) -> str | None:
    """:func:`_why_not` for a layer of one group."""
    decomposer = registry.decompositions.get(decomposition)
    reason = decomposer.unsupported_reason(spec)
    if reason:
        return reason
    source = WeightSource(spec)
    limits = decomposer.max_ranks(source)
    if rank_selection == "vbmf" or registry.rank_selectors.get(rank_selection).scope == "model":
        if decomposer.min_ranks(source) == limits:  # a rank above its floor may still shrink it: the floor decides
            return f"dimensions {limits} are not above {decomposition}'s minimum rank {decomposer.min_rank}"
        return None
    ranks = registry.rank_selectors.get(rank_selection).select(decomposer, source, 0, params)
    if any(r > m for r, m in zip(ranks, limits)):
        return f"ranks {ranks} would exceed the layer's dimensions {limits}"
    if not Cost(decomposer.count_params(spec, ranks)).smaller_than(Cost(spec.n_weights)):
        return f"ranks {ranks} would not reduce its {spec.n_weights} weights"
    return None


#: A generated schedule leaves out a hidden layer whose rank would fall below this fraction of its full rank (and
#: below the decomposition's minimum rank): a truncation that keeps fewer than 1 in 16 of a trained layer's
#: directions is no longer a small perturbation that fine-tuning recovers from.
RANK_FLOOR_FRACTION = 1 / 16


def output_layers(stats: ModelStats) -> dict[str, str]:
    """The layers whose output is the model's output, each with how it was told.

    With an example input, :attr:`ModelStats.output_layers`: the layers whose output tensor the model returns (as
    it is or a view of it; or the last layer to run when the model applies an elementwise function such as
    ``log_softmax`` to its ``(batch, n)`` output). Without one (or with FlopCo statistics), the model's last layer
    in module order when it is a Linear layer, as a classifier is.
    """
    if stats.output_layers is not None:
        return {name: "the model returns its output" for name in stats.output_layers}
    last = next(reversed(stats.layers.values()), None)
    if last is not None and last.spec.spatial_dims == 0:
        return {last.name: "it is the model's last layer, a Linear one (no example input told which layer's "
                           "output the model returns)"}
    return {}


def rank_floor(decomposer: Decomposer, spec: LayerSpec, *, output_layer: bool = False,
               fraction: float = RANK_FLOOR_FRACTION) -> tuple[int, ...]:
    """The smallest ranks a generated schedule (or the ``budget`` selector) lets a layer fall to, one per rank of
    ``decomposer``.

    Each rank is at least the decomposition's minimum rank (its limit where that is smaller, see
    :meth:`~musco_core.components.Decomposer.min_ranks`) and ``fraction`` (by default
    :data:`RANK_FLOOR_FRACTION`) of the layer's full size, the uncompressed layer's; an output layer's ranks are
    at least its output count (a classifier's class count: fewer directions than classes cannot keep the classes
    apart), or their full size when that is smaller.
    """
    source = WeightSource(spec)
    limits = decomposer.max_ranks(source)
    floor = [max(low, math.ceil(limit * fraction)) for low, limit in zip(decomposer.min_ranks(source), limits)]
    if output_layer:
        floor = [max(f, min(limit, spec.out_channels)) for f, limit in zip(floor, limits)]
    return tuple(floor)


def _unsafe_reason(layer: LayerStats, decomposition: str, registry: Registry, output_reason: str | None
                   ) -> str | None:
    """Why a generated schedule leaves out a layer that the decomposition could shrink, or None.

    The output layer (``output_reason`` says how it was told) is left out, as is a layer that no rank at or above
    its :func:`rank_floor` would make smaller (the rank selectors choose ranks from the weights later).
    """
    if output_reason is not None:
        return (f"output layer ({output_reason}): truncating a classifier's logits costs the most accuracy; name "
                f"it in the schedule to compress it anyway")
    decomposer = registry.decompositions.get(decomposition)
    spec = layer.spec
    floor = rank_floor(decomposer, spec)
    if not Cost(decomposer.count_params(spec, floor)).smaller_than(Cost(spec.n_weights)):
        return f"at its rank floor {floor} {decomposition} would not reduce its {spec.n_weights} weights"
    return None


def _generate(stats: ModelStats, config_type: str, registry: Registry
              ) -> tuple[dict[str, dict[str, Any] | None], dict[str, str]]:
    """The generated ``{layer: settings or None}`` and ``{layer: why it is left out}``."""
    config: dict[str, dict[str, Any] | None] = {}
    reasons: dict[str, str] = {}
    outputs = output_layers(stats) if config_type not in ("none", "template") else {}
    for name in stats.in_model_order(dict.fromkeys([*stats.layers, *stats.excluded])):
        if name in stats.excluded:
            if config_type != "none":
                log.info("generate_model_compr_kwargs: layer %r left out: %s", name, stats.excluded[name])
                reasons[name] = stats.excluded[name]
            continue
        layer = stats.layers[name]
        if config_type == "none":
            config[name] = None
        elif config_type == "template":
            config[name] = {**dict.fromkeys(_TEMPLATE_KEYS), "curr_compr_iter": 0}
        else:
            decomposition = _default_decomposition(layer)
            selector = registry.rank_selectors.get(config_type)
            params = selector.Params()
            reason = (_why_not(layer, decomposition, config_type, params, registry)
                      or _unsafe_reason(attrs.evolve(layer, spec=one_group(layer.spec)), decomposition, registry,
                                        outputs.get(name)))  # a grouped layer's floor is its groups'
            if reason:
                log.info("generate_model_compr_kwargs: layer %r left uncompressed: %s", name, reason)
                config[name] = None
                reasons[name] = reason
            else:
                own = ScheduleCodec.unstructure_params(params) if selector.scope == "layer" else {}
                config[name] = {"decomposition": decomposition, "rank_selection": config_type, **own,
                                "curr_compr_iter": 0}
    return config, reasons


def _model_stats(model_stats: Any, config_type: str, registry: Registry | None) -> tuple[ModelStats, Registry]:
    if config_type not in CONFIG_TYPES:
        raise ConfigError(f"config_type: expected one of {', '.join(CONFIG_TYPES)}, got {short_repr(config_type)}")
    registry = registry or default_registry()
    stats = model_stats if isinstance(model_stats, ModelStats) else as_model_stats(model_stats, None, registry)
    return stats, registry


def generated_layers(model_stats: Any, config_type: str, *, registry: Registry | None = None
                     ) -> tuple[dict[str, dict[str, Any] | None], dict[str, str]]:
    """What :func:`generate_model_compr_kwargs` and :func:`generated_exclusions` return, from one generation (each
    reason logged once)."""
    stats, registry = _model_stats(model_stats, config_type, registry)
    return _generate(stats, config_type, registry)


def generated_exclusions(model_stats: Any, config_type: str, *, registry: Registry | None = None
                         ) -> dict[str, str]:
    """``{layer: reason}`` for every layer that :func:`generate_model_compr_kwargs` leaves out (sets to None) for
    ``config_type``, in model order; empty for ``none`` and ``template``, which compress nothing by design."""
    return generated_layers(model_stats, config_type, registry=registry)[1]


def generate_model_compr_kwargs(model_stats: Any, config_type: str = "none", *, registry: Registry | None = None
                                ) -> dict[str, dict[str, Any] | None]:
    """A ``{layer name: layer settings or None}`` dict in the original format.

    ``none``: nothing compressed; ``vbmf``: k x k convs get tucker2 + vbmf, Linear and 1x1 convs svd + vbmf
    (weakening 0.8); ``param_reduction``: the same decompositions with rate 2; ``budget``: the same decompositions
    with ranks from the whole-model ``budget`` selector (its target goes in ``algo_kwargs``); ``template``:
    placeholders.
    Layers the default would not shrink (depthwise convs, tiny layers, ranks beyond the dimensions; a grouped conv
    is decomposed, and so checked, group by group) get None, as do
    the output layer (see :func:`output_layers`) and layers whose rank would fall below :func:`rank_floor`; layers
    that must not be replaced (``model_stats.excluded``: a computation of their own, hooks, weights read by their
    owner, not reached by the example input) are left out. The reasons are logged and returned by
    :func:`generated_exclusions`.
    """
    return generated_layers(model_stats, config_type, registry=registry)[0]


def validate_model_compr_kwargs(model_compr_kwargs: Any, *, registry: Registry | None = None,
                                origin: str = "model_compr_kwargs") -> ModelSchedule:
    """Checks a schedule (original dict or YAML document); raises ConfigError naming every problem.

    Returns the checked schedule. The argument is never modified.
    """
    return ScheduleCodec(registry or default_registry()).structure(model_compr_kwargs, origin)
