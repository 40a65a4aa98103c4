"""Rank selectors of the original MUSCO: ``manual``, ``param_reduction`` and ``vbmf``."""
from __future__ import annotations

import attrs

from musco_core import hookimpl
from musco_core.components import Decomposer, RankSelector, WeightSource
from musco_core.errors import ConfigError
from musco_core.schedule import RankList, ReductionRate, UnitFraction

from . import factorize


def _current_weight_count(source: WeightSource) -> int:
    if source.factors:
        return sum(f.weight.numel() for f in source.factors)
    return source.spec.n_weights


@attrs.frozen
class ManualParams:
    """``manual_rank[i]`` is the rank for the layer's i-th compression (Tucker2: ``[r_out, r_in]``)."""

    manual_rank: RankList


class Manual(RankSelector):
    name = "manual"
    Params = ManualParams
    hardware_rounding = False  # the user's ranks are kept as given unless rank_multiple is an int

    def check_params(self, params: ManualParams, decomposer: Decomposer) -> str | None:
        for stage, ranks in enumerate(params.manual_rank):
            problem = self._arity_problem(stage, ranks, decomposer) or self._growth_problem(params, stage, decomposer)
            if problem:
                return problem
        return None

    @staticmethod
    def _growth_problem(params: ManualParams, stage: int, decomposer: Decomposer) -> str | None:
        """A rank larger than the stage before left it: a compression cannot grow a layer (it would be clamped to
        the smaller rank, not the one given)."""
        if stage == 0 or not any(now > before for now, before in zip(params.manual_rank[stage],
                                                                     params.manual_rank[stage - 1])):
            return None
        return (f"manual_rank[{stage}]: {list(params.manual_rank[stage])} grows the layer: stage {stage} left it at "
                f"{list(params.manual_rank[stage - 1])} ({', '.join(decomposer.rank_names)}) and a later compression "
                f"cannot grow a layer; expected each rank of stage {stage + 1} at most the one of stage {stage}")

    @staticmethod
    def _arity_problem(stage: int, ranks: tuple[int, ...], decomposer: Decomposer) -> str | None:
        if len(ranks) == len(decomposer.rank_names):
            return None
        return (f"manual_rank[{stage}]: {decomposer.name} takes {len(decomposer.rank_names)} rank(s) "
                f"({', '.join(decomposer.rank_names)}) per compression, got {list(ranks)}")

    def check_layer(self, params: ManualParams, decomposer: Decomposer, source: WeightSource, stages: range
                    ) -> str | None:
        if len(params.manual_rank) < stages.stop:
            return (f"manual_rank has {len(params.manual_rank)} entries but the layer is compressed "
                    f"{stages.stop} times; expected one rank per compression")
        limits = decomposer.max_ranks(source)
        for stage in stages:
            ranks = params.manual_rank[stage]
            if any(r > limit for r, limit in zip(ranks, limits)):
                return (f"manual_rank[{stage}]: {list(ranks)} exceeds what {decomposer.name} can use on this "
                        f"layer ({', '.join(decomposer.rank_names)} at most {list(limits)})")
        return None

    def select(self, decomposer: Decomposer, source: WeightSource, stage: int, params: ManualParams
               ) -> tuple[int, ...]:
        if stage >= len(params.manual_rank):
            raise ConfigError(f"manual_rank has {len(params.manual_rank)} entries; no rank for compression "
                              f"number {stage + 1}")
        ranks = params.manual_rank[stage]
        problem = self._arity_problem(stage, ranks, decomposer)
        if problem:
            raise ConfigError(problem)
        return tuple(ranks)


@attrs.frozen
class ParamReductionParams:
    """The factor by which the layer's weight count shrinks at each compression."""

    param_reduction_rate: ReductionRate = 2.0


class ParamReduction(RankSelector):
    """The largest ranks (along the decomposition's rank family) whose weight count is at most ``N / rate``.

    ``N`` is the layer's current weight count (its factors' count when it was compressed before), so this solves
    the original's closed-form equations (e.g. Tucker2's quadratic in ``r_in``) exactly in integers.
    """

    name = "param_reduction"
    Params = ParamReductionParams
    hardware_rounding = False  # its ranks are the largest within the rate: rounding them up would break it

    def select(self, decomposer: Decomposer, source: WeightSource, stage: int, params: ParamReductionParams
               ) -> tuple[int, ...]:
        budget = _current_weight_count(source) / params.param_reduction_rate

        def fits(r: int) -> bool:
            return decomposer.count_params(source.spec, decomposer.rank_family(source.spec, r)) <= budget

        low, high = 0, 1
        while fits(high):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        ranks = decomposer.rank_family(source.spec, max(low, decomposer.min_rank))
        if all(rank <= limit for rank, limit in zip(ranks, decomposer.max_ranks(source))):
            return ranks
        # a rank's limit is below min_rank (a 3-channel stem's r_in): its family at min_rank fits no layer
        return tuple(max(rank, floor) for rank, floor in zip(decomposer.rank_family(source.spec, low),
                                                             decomposer.min_ranks(source)))

    def shortfall(self, decomposer: Decomposer, source: WeightSource, ranks: tuple[int, ...],
                  params: ParamReductionParams) -> str | None:
        """Where even the smallest ranks the decomposition allows (its ``min_rank``, at most the layer's
        ``max_ranks``, to which the core clamps them) keep more weights than the rate allows, the reduction they give
        instead."""
        ranks = tuple(min(rank, limit) for rank, limit in zip(ranks, decomposer.max_ranks(source), strict=True))
        before, after = _current_weight_count(source), decomposer.count_params(source.spec, ranks)
        if after * params.param_reduction_rate <= before:
            return None
        return (f"param_reduction_rate {params.param_reduction_rate:g} cannot be met: the smallest ranks "
                f"{decomposer.name} allows ({', '.join(map(str, ranks))}) give {before / after:.2f}x")


@attrs.frozen
class VBMFParams:
    """Weakening factor in [0, 1]: 0 keeps the full rank, 1 takes the EVBMF rank as is."""

    vbmf_weakenen_factor: UnitFraction = 0.8


class VBMF(RankSelector):
    """Ranks from Empirical Variational Bayesian Matrix Factorization of the decomposition's unfoldings.

    For each unfolding of size ``full = min(rows, cols)`` with EVBMF rank ``r_e``:
    ``r = max(int(full - f * (full - r_e)), min_rank)``; an EVBMF rank of 0 keeps the full rank.
    ``full`` is relative to the layer as it is now: never above the decomposer's ``max_ranks`` (its current rank
    once it was factorized). A factorized layer's ``rank_matrices`` are those of its dense weight, with the shape
    the first pass saw; EVBMF gets their first ``full`` singular values (the rest are the factorization's zeros),
    so it estimates the noise from the spectrum the layer kept and every pass can shrink the layer again. (On the
    ``r x r`` core of a rank-``r`` svd, EVBMF cannot find a rank above about ``r / 2``, and found none at all on
    most planted-rank layers.)
    """

    name = "vbmf"
    Params = VBMFParams

    def unsupported_reason(self, decomposer: Decomposer) -> str | None:
        if type(decomposer).rank_matrices is Decomposer.rank_matrices:
            return "it has no matrix unfoldings to estimate a rank from; use param_reduction or manual"
        return None

    def select(self, decomposer: Decomposer, source: WeightSource, stage: int, params: VBMFParams
               ) -> tuple[int, ...]:
        ranks = []
        for matrix, limit in zip(decomposer.rank_matrices(source), decomposer.max_ranks(source), strict=True):
            full = min(*matrix.shape, limit)
            estimated = factorize.evbmf_rank(factorize.singular_values(matrix)[:full], tuple(matrix.shape))
            if estimated == 0:
                ranks.append(full)
            else:
                weakened = int(full - params.vbmf_weakenen_factor * (full - estimated))
                ranks.append(min(full, max(weakened, decomposer.min_rank)))
        return tuple(ranks)


@hookimpl
def musco_register_rank_selectors() -> list[type]:
    return [Manual, ParamReduction, VBMF]
