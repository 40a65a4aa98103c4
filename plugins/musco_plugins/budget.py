"""Whole-model budgets: one target ("half the FLOPs") for the model, ranks allocated across layers to meet it.

The ``budget`` rank selector prices every rank of every layer along the decomposition's rank family (weights
and MACs, the compression report's own counts) and estimates the damage of each rank. With calibration data it is
the layer's relative output error on that data, from the second moment of its inputs (exact for a truncated SVD,
per mode exact for Tucker2's HOSVD, whose two modes' errors are added); without, the share of squared singular
values of the decomposition's unfoldings a rank drops (the exact relative squared weight error of a truncated
SVD, an upper bound for Tucker2's HOSVD). It then minimizes the summed damage (weighted by the
layers' measured sensitivities when a sensitivity pass ran) subject to the budget, by a Lagrangian search over
the error-per-cost trade-off followed by a greedy fill of what is left of the budget. A layer offered several
candidate decompositions has the options of all of them in one list, so the same search chooses its decomposition.

With ``metric: latency`` the cost of a rank is the measured time of the layer's factor chain on this machine (the
core times and caches it, see :mod:`musco_core.latency`): :data:`LATENCY_POINTS` ranks spread evenly along the rank
family, the extremes included, are timed, and the others interpolated piecewise linearly in MACs between them.

A multi-stage run splits the target geometrically: after pass ``p`` of ``N`` the model is ``reduction ** (p / N)``
times smaller, so each pass removes the same share.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import attrs
import numpy as np
import torch

from musco_core import Allocation, Decomposer, LayerChoice, ModelTotals, RankSelector, hookimpl
from musco_core.components import RankRounding, WeightSource
from musco_core.config import RANK_FLOOR_FRACTION, rank_floor
from musco_core.errors import ConfigError
from musco_core.schedule import ReductionRate, UnitFraction, ValueProblem

from . import factorize

log = logging.getLogger(__name__)


@attrs.frozen
class BudgetParams:
    """Shrink the whole model's ``metric`` (``flops``: MACs of the compressible layers on the example input, as
    the report counts them; ``params``: every parameter; ``latency``: the forward pass's time measured here) by the
    factor ``reduction``, split over the passes; with ``scope: compressed`` count only the layers the schedule
    compresses."""

    #: The factor by which the whole model's ``metric`` shrinks over the run (after all passes).
    reduction: ReductionRate = 2.0
    #: ``flops``: MACs of the compressible layers on the example input; ``params``: every parameter of the model;
    #: ``latency``: the time of the forward pass on the example input, measured on this machine.
    metric: Literal["flops", "params", "latency"] = "flops"
    #: ``model``: the target counts the whole model (every parameter; the MACs of every compressible layer);
    #: ``compressed``: only the layers the schedule compresses ("30% fewer weights in the layers I named").
    scope: Literal["model", "compressed"] = "model"
    #: No rank falls below this fraction of the uncompressed layer's full rank (nor the decomposition's minimum
    #: rank): a target out of reach stops there, and says so, instead of cutting every layer to rank 2. 0 lets the
    #: ranks go down to the decomposition's minimum.
    min_rank_fraction: UnitFraction = RANK_FLOOR_FRACTION
    #: ``metric: latency`` only: time the model ``as_compressed`` (as the run leaves it), or ``optimized`` (as
    #: ``optimize_for_inference`` deploys it: BatchNorm folded, chains merged where that saves MACs, the faster
    #: memory format), so that the target holds for the model you deploy, against the original deployed alike.
    form: Literal["as_compressed", "optimized"] = attrs.field(default="as_compressed")

    @form.validator
    def _timed_forms_need_timing(self, attribute: attrs.Attribute, value: str) -> None:
        if value != "as_compressed" and self.metric != "latency":
            raise ValueProblem(f"form: {value} is the form in which the model is timed; it needs metric: latency, "
                               f"not {self.metric}")


@attrs.frozen
class LayerOptions:
    """A layer's affordable ranks along its rank family, cheapest first; the last is the layer as it is.

    Options of several candidate decompositions of one layer merge into one list (see :func:`merge_options`);
    ``candidate`` then tells whose each option is (-1 for the layer as it is).
    """

    ranks: list[tuple[int, ...] | None]  # None: the layer as it is
    cost: np.ndarray  # by the budget's metric
    damage: np.ndarray  # estimated relative squared error, times the layer's sensitivity
    spectra: list[list[np.ndarray]] = attrs.field(factory=list)  # per group, per rank: ``_tails``
    sensitivity: float = 1.0
    candidate: list[int] = attrs.field(factory=list)
    #: per group, the energy its ``spectra`` are relative to (see :func:`group_energy`); None: groups alike
    energies: np.ndarray | None = None

    def damage_of(self, ranks: tuple[int, ...] | None) -> float:
        """The damage of the layer at ``ranks`` (0 for None, the layer as it is): its groups' relative errors
        averaged by their energies, the relative error of the whole layer."""
        if ranks is None:
            return 0.0
        weights = None if self.energies is None or self.energies.sum() <= 0 else self.energies
        return self.sensitivity * float(np.average([sum(tails[min(rank, tails.size - 1)] for rank, tails in
                                                        zip(ranks, group)) for group in self.spectra],
                                                   weights=weights))


_METRIC_INDEX = {"params": 0, "flops": 1}  # in LayerChoice.cost's (weights, MACs)
#: Ranks timed per layer and candidate decomposition for ``metric: latency``, spread evenly along the rank family
#: (the smallest and the largest included); the times of the ranks between them are interpolated in MACs.
LATENCY_POINTS = 10

Pricer = Callable[[tuple[int, ...] | None], float]


def metric_pricer(choice: LayerChoice, metric: str, scope: str = "model") -> Pricer:
    """The cost of the layer at some ranks (None: as it is) by ``flops`` or ``params``, the core's own counts; for
    the whole model's ``params``, a factorization's weights plus the layer's tied weights, which stay in the model
    (a forced tied layer priced by its factors alone was planned at 1.69x where the model ended 1.09x smaller)."""
    index = _METRIC_INDEX[metric]
    staying = choice.tied_params if metric == "params" and scope == "model" else 0
    return lambda ranks: float(choice.cost(ranks)[index]) + (0 if ranks is None else staying)


def despiked(values: np.ndarray) -> np.ndarray:
    """Each inner value replaced by the median of itself and its two neighbours: a single timing that a busy
    machine inflated (or a lucky one) is dropped, while a monotone sequence stays as it is."""
    if values.size < 3:
        return values
    inner = np.median(np.stack([values[:-2], values[1:-1], values[2:]]), axis=0)
    return np.concatenate([values[:1], inner, values[-1:]])


def monotone(values: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators): along a rank
    family, a chain with more MACs is not faster."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (mean_a, count_a), (mean_b, count_b) = blocks.pop(-2), blocks.pop()
            blocks.append([(mean_a * count_a + mean_b * count_b) / (count_a + count_b), count_a + count_b])
    return np.concatenate([np.full(int(count), mean) for mean, count in blocks]) if blocks else values


def latency_pricer(choice: LayerChoice, family: Sequence[tuple[int, ...]]) -> Pricer:
    """The measured seconds of the layer at some ranks: ``LATENCY_POINTS`` ranks of ``family`` (its ranks along the
    rank family, smallest first) are timed, with the layer as it is; their times, in the order of their MACs, are
    despiked and made non-decreasing, and the time of any other ranks is interpolated piecewise linearly in MACs
    between them (clamped at the ends)."""
    spread = np.linspace(0, len(family) - 1, min(LATENCY_POINTS, len(family))).round().astype(int)
    timed = [family[i] for i in sorted(set(spread.tolist()))]
    seconds = choice.seconds([None, *timed])
    now = seconds[0]
    points = sorted((float(choice.cost(ranks).macs), t) for ranks, t in zip(timed, seconds[1:]))
    macs = np.array([m for m, _ in points])
    times = monotone(despiked(np.array([t for _, t in points])))

    def price(ranks: tuple[int, ...] | None) -> float:
        return now if ranks is None else float(np.interp(float(choice.cost(ranks).macs), macs, times))
    return price


def _tails(matrix: torch.Tensor) -> np.ndarray:
    """``tails[k]``: the share of the squared singular values beyond the first ``k`` (what rank ``k`` drops)."""
    energy = factorize.singular_values(matrix).to(torch.float64).square().cpu().numpy()
    total = energy.sum()
    if total <= 0:
        return np.zeros(energy.size + 1)
    return np.clip(1.0 - np.concatenate([[0.0], np.cumsum(energy)]) / total, 0.0, None)


def damage_tails(decomposer: Decomposer, source: WeightSource) -> list[np.ndarray]:
    """Per rank, the damage of keeping ``k``: the relative output error on the calibration data (the
    decomposition's :meth:`~musco_core.components.Decomposer.output_errors`) when the source has input statistics
    and the decomposition can tell it, else the share of the squared singular values of its ``rank_matrices`` that
    rank ``k`` drops (weight-space energy; for ``whitened_svd``, whose matrices are whitened, that is the output
    error already)."""
    if source.input_stats is not None:
        tails = decomposer.output_errors(source)
        if tails is not None:
            return [t.to(torch.float64).cpu().numpy() for t in tails]
    return [_tails(m) for m in decomposer.rank_matrices(source)]


def group_energy(decomposer: Decomposer, source: WeightSource) -> float:
    """What the damage of a group of a grouped layer is relative to (see :func:`damage_tails`): its output energy
    ``trace(W C W^T)`` on its input statistics where the decomposition prices by them, else its weights'
    ``||W||^2``. Weighing the groups alike priced a rank that loses nothing of one group's output and 37% of the
    other's, whose inputs are 100x smaller, at 19% where the layer's output error is 1e-7."""
    weight = source.weight.reshape(source.weight.shape[0], -1).to(torch.float64)
    if source.input_stats is None or type(decomposer).output_errors is Decomposer.output_errors:
        return float(weight.square().sum())
    moment = source.input_stats.second_moment.to(device=weight.device, dtype=torch.float64)
    return float(torch.einsum("of,fg,og->", weight, moment, weight))


def layer_options(choice: LayerChoice, metric: str, rounding: RankRounding = RankRounding(),
                  min_rank_fraction: float = 0.0, scope: str = "model") -> tuple[LayerOptions, Pricer]:
    """Every distinct rank of the layer along its rank family, each rank raised to its
    :func:`~musco_core.config.rank_floor` at ``min_rank_fraction`` (for an output layer, its output count too),
    that would shrink it (and, for ``latency``, run faster than it does now), and the layer as it is; with the
    function that prices any ranks of the layer by ``metric`` (over ``scope``, see :func:`metric_pricer`)."""
    decomposer = choice.decomposer
    spectra = [damage_tails(decomposer, source) for source in choice.sources]
    limits = decomposer.max_ranks(choice.sources[0])
    floor = rank_floor(decomposer, choice.sources[0].spec, output_layer=choice.output_layer,
                       fraction=min_rank_fraction)
    ranks_list, seen = [], set()
    for r in range(1, max(limits) + 1):
        # each rank raised to its floor: the family's smallest member can sit far above it (tucker2's r_out is
        # 0.8 * out / in times r_in), and a target out of reach is to get the smallest ranks allowed
        family = decomposer.rank_family(choice.sources[0].spec, r)
        ranks = rounding(tuple(max(rank, lowest) for rank, lowest in zip(family, floor)), limits)
        if ranks in seen or any(rank < lowest for rank, lowest in zip(ranks, floor)):
            continue
        seen.add(ranks)
        if not choice.shrinks(ranks):
            break  # from here on the layer would not shrink: the engine would keep it as it is
        ranks_list.append(ranks)
    price = latency_pricer(choice, ranks_list) if metric == "latency" else metric_pricer(choice, metric, scope)
    now = price(None)
    costs = [price(ranks) for ranks in ranks_list]
    kept = [i for i, cost in enumerate(costs) if cost < now]  # a slower factorization is never worth its damage
    ranks_list = [ranks_list[i] for i in kept] + [None]
    costs = [costs[i] for i in kept] + [now]
    order = np.argsort(costs, kind="stable")
    ranks_list = [ranks_list[i] for i in order]
    grouped = len(choice.sources) > 1
    energies = np.array([group_energy(decomposer, source) for source in choice.sources]) if grouped else None
    priced = LayerOptions(ranks_list, np.asarray(costs, dtype=np.float64)[order], np.zeros(0), spectra,
                          choice.sensitivity, energies=energies)
    return attrs.evolve(priced, damage=np.array([priced.damage_of(ranks) for ranks in ranks_list])), price


def merge_options(candidates: Sequence[LayerOptions]) -> LayerOptions:
    """The options of a layer's candidate decompositions as one list, cheapest first, the layer as it is last."""
    entries = [(float(options.cost[i]), float(options.damage[i]), index, options.ranks[i])
               for index, options in enumerate(candidates) for i in range(len(options.ranks) - 1)]
    entries.sort(key=lambda entry: entry[0])
    as_is = candidates[0]
    return LayerOptions([ranks for *_, ranks in entries] + [None],
                        np.array([cost for cost, *_ in entries] + [float(as_is.cost[-1])]),
                        np.array([damage for _, damage, *_ in entries] + [0.0]),
                        candidate=[index for _, _, index, _ in entries] + [-1])


def _pick(layers: Sequence[LayerOptions], price: float) -> list[int]:
    return [int(np.argmin(layer.damage + price * layer.cost)) for layer in layers]


def _spent(layers: Sequence[LayerOptions], picks: Sequence[int]) -> float:
    return float(sum(layer.cost[i] for layer, i in zip(layers, picks)))


def allocate_ranks(layers: Sequence[LayerOptions], allowed: float) -> list[int]:
    """Option indices minimizing the summed damage with the summed cost at most ``allowed`` (else the cheapest).

    A bisection on the price of a unit of cost finds the cheapest-damage Lagrangian solution that fits; a greedy
    pass then spends what is left on the upgrades that save the most damage per unit of cost.
    """
    cheapest = [0] * len(layers)
    if _spent(layers, cheapest) > allowed:
        return cheapest
    scale = max((float(layer.cost[-1]) for layer in layers), default=0.0) or 1.0
    low, high = 0.0, 1.0 / scale
    while _spent(layers, _pick(layers, high)) > allowed:  # ends: a high enough price picks the cheapest options
        low, high = high, high * 4.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _spent(layers, _pick(layers, middle)) > allowed else (low, middle)
    picks = _pick(layers, high)
    left = allowed - _spent(layers, picks)
    while True:
        best = None
        for index, (layer, pick) in enumerate(zip(layers, picks)):
            end = int(np.searchsorted(layer.cost, layer.cost[pick] + left, side="right"))
            extra = layer.cost[pick + 1:end] - layer.cost[pick]
            saved = layer.damage[pick] - layer.damage[pick + 1:end]
            useful = (extra > 0) & (saved > 0)
            if not useful.any():
                continue
            gain = np.where(useful, saved / np.where(extra > 0, extra, 1.0), -1.0)
            candidate = int(np.argmax(gain))
            if best is None or gain[candidate] > best[0]:
                best = (gain[candidate], index, pick + 1 + candidate)
        if best is None:
            return picks
        _, index, option = best
        left -= layers[index].cost[option] - layers[index].cost[picks[index]]
        picks[index] = option


def refine_off_family(choices: Sequence[LayerChoice], layers: Sequence[LayerOptions], prices: Sequence[Pricer],
                      ranks: list, left: float, rounding: RankRounding) -> list:
    """Spends what the rank family's steps leave of the budget by raising single ranks of multi-rank layers
    (e.g. Tucker2's ``r_out`` alone), best damage saved per unit of cost first, while the layer still shrinks."""
    ranks = list(ranks)
    while True:
        best = None
        for position, (choice, layer, price, current) in enumerate(zip(choices, layers, prices, ranks)):
            if current is None or len(current) < 2:
                continue
            limits = choice.decomposer.max_ranks(choice.sources[0])
            cost_current = price(current)
            for axis in range(len(current)):
                raised = rounding(tuple(r + 1 if i == axis else r for i, r in enumerate(current)), limits)
                extra = price(raised) - cost_current
                saved = layer.damage_of(current) - layer.damage_of(raised)
                if raised != current and choice.shrinks(raised) and 0 < extra <= left and saved > 0 and (
                        best is None or saved / extra > best[0]):
                    best = (saved / extra, position, raised, extra)
        if best is None:
            return ranks
        _, position, ranks[position], extra = best
        left -= extra


class Budget(RankSelector):
    """Ranks of all its layers together, so the whole model meets one target; see the module docstring."""

    name = "budget"
    Params = BudgetParams
    scope = "model"

    def unsupported_reason(self, decomposer: Decomposer) -> str | None:
        if type(decomposer).rank_matrices is Decomposer.rank_matrices:
            return "it has no matrix unfoldings to estimate the error of a rank from; use tucker2, svd or manual"
        return None

    def measures_latency(self, params: BudgetParams) -> bool:
        return params.metric == "latency"

    def counts_macs(self, params: BudgetParams) -> bool:
        return params.metric == "flops"

    def times_optimized(self, params: BudgetParams) -> bool:
        return params.metric == "latency" and params.form == "optimized"

    def allocate(self, layers: Sequence[LayerChoice], totals: ModelTotals, pass_index: int, n_passes: int,
                 params: BudgetParams, rounding: RankRounding = RankRounding()) -> Allocation:
        if params.scope == "compressed":
            totals = totals.scheduled
        original, now = {"flops": (totals.macs_original, totals.macs_now),
                         "params": (totals.params_original, totals.params_now),
                         "latency": (totals.seconds_original, totals.seconds_now)}[params.metric]
        if original is None or now is None:
            raise ConfigError(f"a budget on {params.metric} needs the layers' input shapes: give the compressor an "
                              f"example_input (or use metric: params)")
        target = params.reduction ** ((pass_index + 1) / n_passes)
        by_layer: dict[str, list[LayerChoice]] = {}
        for choice in layers:  # a layer with several candidate decompositions comes once per candidate
            by_layer.setdefault(choice.name, []).append(choice)
        priced = {name: [layer_options(choice, params.metric, rounding, params.min_rank_fraction, params.scope)
                         for choice in group] for name, group in by_layer.items()}
        candidates = {name: [options for options, _ in group] for name, group in priced.items()}
        merged = [merge_options(options) for options in candidates.values()]
        # what the layers outside the budget hold (a measured model time can fall short of its layers' summed times)
        fixed = max(0.0, now - sum(float(layer.cost[-1]) for layer in merged))

        def plan(aim: float) -> tuple[list[LayerChoice], list, float]:
            """The layers' decompositions and ranks for the reduction ``aim`` by the cost model, and its estimate."""
            allowed = original / aim - fixed
            picks = allocate_ranks(merged, allowed)
            spent = sum(float(layer.cost[i]) for layer, i in zip(merged, picks))
            chosen = [max(0, layer.candidate[i]) for layer, i in zip(merged, picks)]
            choices = [by_layer[name][index] for name, index in zip(by_layer, chosen)]
            prices = [priced[name][index][1] for name, index in zip(by_layer, chosen)]
            ranks = refine_off_family(choices, [candidates[name][index] for name, index in zip(by_layer, chosen)],
                                      prices, [layer.ranks[i] for layer, i in zip(merged, picks)], allowed - spent,
                                      rounding)
            return choices, ranks, original / (fixed + sum(price(r) for price, r in zip(prices, ranks)))

        choices, ranks, planned = plan(target)
        note = None
        if params.metric == "latency" and params.scope == "model" and totals.speedup_of is not None:
            choices, ranks, planned, note = _calibrated(plan, totals, target, original / now)
        elif planned < target * (1 - 1e-9):  # the cost model is exact: a plan short by any share misses it
            note = (f"the target {target:.3f}x cannot be met: these layers at their smallest ranks (none below "
                    f"{params.min_rank_fraction:.3g} of its full rank: min_rank_fraction) leave {planned:.3f}x "
                    f"(the layers outside the budget hold {fixed / original:.1%} of the {params.metric})")
        elif planned > target * 1.02 and all(r is None for r in ranks):
            note = (f"overshoots the target {target:.3f}x: the model is {original / now:.3f}x smaller already (the "
                    f"layers outside the budget, earlier passes), so every layer is kept as it is")
        elif planned > target * 1.02:
            note = (f"overshoots the target {target:.3f}x: the next larger rank of every layer would exceed it "
                    f"(too few or too coarse layers to land closer)")
        floored = [name for name, group in by_layer.items()
                   if any(_output_floor_binds(choice, params.min_rank_fraction) for choice in group)]
        if floored:
            note = "; ".join(filter(None, [note, (
                f"output layer(s) {', '.join(map(repr, floored))} kept at ranks no lower than their output count "
                f"(fewer directions than classes cannot keep them apart), or as they are where no such rank makes "
                f"them smaller; a manual rank compresses one further")]))
        # the record says what it counts: next to the whole model's totals, a scoped plan reads as the model's
        qualifiers = [*(["optimized"] if self.times_optimized(params) else []),
                      *(["compressed layers"] if params.scope == "compressed" else [])]
        metric = params.metric + (f" ({', '.join(qualifiers)})" if qualifiers else "")
        log.info("budget pass %d/%d: target %.3fx %s, planned %.3fx over %d layers", pass_index + 1, n_passes,
                 target, metric, planned, len(by_layer))
        return Allocation({choice.name: r for choice, r in zip(choices, ranks)}, metric, target, planned,
                          note, {choice.name: choice.decomposer.name for choice in choices})


def _output_floor_binds(choice: LayerChoice, fraction: float) -> bool:
    """Whether the layer is an output layer whose output count raises its rank floor."""
    spec = choice.sources[0].spec
    return choice.output_layer and (rank_floor(choice.decomposer, spec, output_layer=True, fraction=fraction)
                                    != rank_floor(choice.decomposer, spec, fraction=fraction))


#: Plans timed in place per pass of a latency budget, at most (see :func:`_calibrated`).
CALIBRATION_ROUNDS = 6
#: A plan measured within this share of the target ends the calibration.
LANDED = 0.01


def _calibrated(plan: Callable[[float], tuple[list[LayerChoice], list, float]], totals: ModelTotals, target: float,
                done: float) -> tuple[list[LayerChoice], list, float, str | None]:
    """A plan whose whole-model speed-up, measured in place, meets ``target`` where it can, with a note when the
    measurements say it does not (within 2%).

    Layers timed alone do not add up to the model: in place their inputs come cold from the layer before and the
    rest of the model runs between them. So plans are timed in place (chains with zero weights swapped into the
    model, in alternation with it as it is), until one measures within :data:`LANDED` of the target or
    :data:`CALIBRATION_ROUNDS` were, each at the aim :func:`_next_aim` gives from the measurements so far: first
    the target, then where a straight line (log speed-up against log aim) meets it until two plans bracket the
    target, then the interpolation between the closest pair that does. The speed-up need not be a straight line
    in the aim: timed as ``optimize_for_inference`` deploys them, ResNet-50's plans at 2 threads measured 1.18x at
    an aim of 1.13x and 2.02x at 1.45x. When no plan landed, the search's next plan is timed too; the plan kept is
    the one measured closest to the target, and ``planned`` its measurement (the mean of its measurements; times
    ``done``, what earlier passes achieved, as every measurement here)."""
    aims: list[float] = []
    measured: list[float] = []
    by_plan: dict[tuple, list[float]] = {}  # log speed-ups measured, per plan
    plans: dict[tuple, tuple[list[LayerChoice], list]] = {}
    aim, saturated = target, False

    def timed(choices: list[LayerChoice], ranks: list) -> float:
        key = _plan_key(choices, ranks)
        speedup = done * totals.speedup_of({choice.name: None if r is None else (choice.decomposer.name, tuple(r))
                                            for choice, r in zip(choices, ranks)})
        log.info("latency budget: aiming at %.3fx by the layer timings measured %.3fx in place", aim, speedup)
        by_plan.setdefault(key, []).append(math.log(speedup))
        plans[key] = choices, ranks
        return speedup

    for _ in range(CALIBRATION_ROUNDS):
        choices, ranks, _estimate = plan(aim)
        if aims and _plan_key(choices, ranks) in by_plan and aim > math.exp(max(aims)):
            saturated = True  # a higher aim gives the same plan: the layers are at their smallest ranks
            break
        speedup = timed(choices, ranks)
        aims.append(math.log(aim))
        measured.append(math.log(speedup))
        if abs(speedup / target - 1) <= LANDED:
            break
        aim = math.exp(_next_aim(aims, measured, math.log(target)))
    else:  # the search's next plan, untimed: timed too, so that the plan kept is one measured
        choices, ranks, _estimate = plan(aim)
        if _plan_key(choices, ranks) not in by_plan:
            timed(choices, ranks)
    # the plan measured closest to the target (the mean of its measurements)
    key = min(by_plan, key=lambda k: abs(float(np.mean(by_plan[k])) - math.log(target)))
    choices, ranks = plans[key]
    planned = math.exp(float(np.mean(by_plan[key])))
    if abs(planned / target - 1) <= 0.02:
        return choices, ranks, planned, None
    if planned < target and all(r is None for r in ranks):
        return choices, ranks, planned, (
            f"the target {target:.3f}x cannot be met: no factorization of these layers (at the ranks they may take) "
            f"was measured faster than the layer as it is, so every layer is kept (measured {planned:.3f}x in place)")
    if saturated and planned < target:
        return choices, ranks, planned, (
            f"the target {target:.3f}x cannot be met: the fastest plan the layers allow (none below "
            f"min_rank_fraction of its full rank) measured {planned:.3f}x in place")
    return choices, ranks, planned, (f"the plan timed in place gives {planned:.3f}x (one measurement on this "
                                     f"machine moves by several percent; too few or too coarse layers to land closer)")


def _next_aim(aims: Sequence[float], measured: Sequence[float], target: float) -> float:
    """The log aim to time next, given the log aims timed and their log speed-ups: interpolated linearly between
    the two measurements closest in aim that bracket the log ``target`` (the one below it at the lower aim);
    without such a pair, where the least-squares line through all of them meets the target."""
    brackets = [(high_aim - low_aim, low_aim, low, high_aim, high)
                for low_aim, low in zip(aims, measured) if low < target
                for high_aim, high in zip(aims, measured) if high >= target and high_aim > low_aim]
    if brackets:
        _, low_aim, low, high_aim, high = min(brackets)
        return low_aim + (target - low) / (high - low) * (high_aim - low_aim)
    intercept, slope = _line(aims, measured)
    return (target - intercept) / slope


def _plan_key(choices: Sequence[LayerChoice], ranks: Sequence) -> tuple:
    return tuple((choice.name, choice.decomposer.name, r) for choice, r in zip(choices, ranks))


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through the points; with one point (or all at one x), the line
    of slope 1 through their mean. The slope is kept within [0.25, 4]: a faster plan never measures slower."""
    x, y = np.asarray(xs), np.asarray(ys)
    spread = float(np.sum((x - x.mean()) ** 2))
    slope = 1.0 if spread < 1e-12 else float(np.clip(np.sum((x - x.mean()) * (y - y.mean())) / spread, 0.25, 4.0))
    return float(y.mean() - slope * x.mean()), slope


@hookimpl
def musco_register_rank_selectors() -> list[type]:
    return [Budget]
