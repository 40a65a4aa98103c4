"""The original's config helpers: ``generate_model_compr_kwargs`` and ``validate_model_compr_kwargs``."""
from __future__ import annotations

import logging
from typing import Any

from .components import Cost, WeightSource
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
    """Why the default entry would not shrink this layer (checked from its geometry alone), or None."""
    spec = layer.spec
    if spec.groups != 1:
        return "grouped convolution"
    decomposer = registry.decompositions.get(decomposition)
    reason = decomposer.unsupported_reason(spec)
    if reason:
        return reason
    source = WeightSource(spec)
    limits = decomposer.max_ranks(source)
    if rank_selection == "vbmf" or registry.rank_selectors.get(rank_selection).scope == "model":
        if min(limits) <= decomposer.min_rank:
            return f"dimensions {limits} are not above {decomposition}'s minimum rank {decomposer.min_rank}"
        return None
    ranks = registry.rank_selectors.get(rank_selection).select(decomposer, source, 0, params)
    if any(r > m for r, m in zip(ranks, limits)):
        return f"ranks {ranks} would exceed the layer's dimensions {limits}"
    if not Cost(decomposer.count_params(spec, ranks)).smaller_than(Cost(spec.n_weights)):
        return f"ranks {ranks} would not reduce its {spec.n_weights} weights"
    return None


def generate_model_compr_kwargs(model_stats: Any, config_type: str = "none", *, registry: Registry | None = None
                                ) -> dict[str, dict[str, Any] | None]:
    """A ``{layer name: layer settings or None}`` dict in the original format.

    ``none``: nothing compressed; ``vbmf``: k x k convs get tucker2 + vbmf, Linear and 1x1 convs svd + vbmf
    (weakening 0.8); ``param_reduction``: the same decompositions with rate 2; ``budget``: the same decompositions
    with ranks from the whole-model ``budget`` selector (its target goes in ``algo_kwargs``); ``template``:
    placeholders.
    Layers the default would not shrink (grouped convs, tiny layers, ranks beyond the dimensions) get None,
    with the reason logged. Layers that must not be replaced (``model_stats.excluded``: a computation of their
    own, hooks, weights read by their owner, not reached by the example input) are left out, with the reason
    logged.
    """
    if config_type not in CONFIG_TYPES:
        raise ConfigError(f"config_type: expected one of {', '.join(CONFIG_TYPES)}, got {short_repr(config_type)}")
    registry = registry or default_registry()
    stats = model_stats if isinstance(model_stats, ModelStats) else as_model_stats(model_stats, None, registry)
    config: dict[str, dict[str, Any] | None] = {}
    if config_type != "none":
        for name, reason in stats.excluded.items():
            log.info("generate_model_compr_kwargs: layer %r left out: %s", name, reason)
    for name, layer in stats.layers.items():
        if name in stats.excluded:
            continue
        if config_type == "none":
            config[name] = None
        elif config_type == "template":
            config[name] = {**dict.fromkeys(_TEMPLATE_KEYS), "curr_compr_iter": 0}
        else:
            decomposition = _default_decomposition(layer)
            selector = registry.rank_selectors.get(config_type)
            params = selector.Params()
            reason = _why_not(layer, decomposition, config_type, params, registry)
            if reason:
                log.info("generate_model_compr_kwargs: layer %r left uncompressed: %s", name, reason)
                config[name] = None
            else:
                own = ScheduleCodec.unstructure_params(params) if selector.scope == "layer" else {}
                config[name] = {"decomposition": decomposition, "rank_selection": config_type, **own,
                                "curr_compr_iter": 0}
    return config


def validate_model_compr_kwargs(model_compr_kwargs: Any, *, registry: Registry | None = None,
                                origin: str = "model_compr_kwargs") -> ModelSchedule:
    """Checks a schedule (original dict or YAML document); raises ConfigError naming every problem.

    Returns the checked schedule. The argument is never modified.
    """
    return ScheduleCodec(registry or default_registry()).structure(model_compr_kwargs, origin)
