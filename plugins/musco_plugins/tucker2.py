"""Tucker2 of a convolution on its two channel modes: 1x1 ``in -> r_in``, core ``r_in -> r_out`` (kernel,
stride, padding, dilation), 1x1 ``r_out -> out`` (bias). Ranks are ``(r_out, r_in)``.

Re-compression decomposes only the core and folds the new channel factors into the outer 1x1 layers.
"""
from __future__ import annotations

import torch

from musco_core import hookimpl
from musco_core.components import Decomposer, FactorLayout, LayerSpec, WeightSource
from musco_core.schedule import NonNegativeFloat, PositiveInt

import attrs

from . import factorize


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


@attrs.frozen
class Tucker2Params:
    """HOOI sweeps after the HOSVD initialisation, and the relative fit change that ends them early."""

    n_iter: PositiveInt = 4
    tol: NonNegativeFloat = 1e-5


class Tucker2(Decomposer):
    name = "tucker2"
    Params = Tucker2Params
    rank_names = ("r_out", "r_in")
    min_rank = 8
    exact_at_max_rank = True

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        if spec.spatial_dims == 0:
            return "tucker2 needs a convolution; use svd for a Linear layer"
        return None

    def layout(self, spec: LayerSpec, ranks: tuple[int, ...]) -> list[FactorLayout]:
        r_out, r_in = ranks
        return [FactorLayout.pointwise(spec, r_in, spec.in_channels),
                FactorLayout(r_out, r_in, spec.kernel_size, axes=tuple(range(spec.spatial_dims))),
                FactorLayout.pointwise(spec, spec.out_channels, r_out, bias=spec.has_bias)]

    def max_ranks(self, source: WeightSource) -> tuple[int, ...]:
        previous = source.previous_weights(self.name)
        if previous:
            return tuple(previous[1].shape[:2])
        return source.spec.out_channels, source.spec.in_channels

    def rank_family(self, spec: LayerSpec, r: int) -> tuple[int, ...]:
        beta = max(0.8 * spec.out_channels / spec.in_channels, 1.0)
        return int(beta * r), r

    def rank_matrices(self, source: WeightSource) -> list[torch.Tensor]:
        """The two channel unfoldings of the weight (once factorized, of the dense weight the factors compose, not of
        the core: EVBMF on a core's unfolding cannot see much above half its rows, and cut planted ranks of 40 to
        24 and 17)."""
        return [factorize.unfold(source.weight, 0), factorize.unfold(source.weight, 1)]

    def output_errors(self, source: WeightSource) -> list[torch.Tensor] | None:
        """Per channel mode, the output error of the HOSVD truncated on that mode alone (exact; see
        :func:`factorize.tucker2_output_error` for what adding the two means). Once factorized, of the core, on
        the statistics behind the first 1x1 factor and through the last."""
        if source.input_stats is None:
            return None
        moment = source.input_stats.second_moment
        previous = source.previous_weights(self.name)
        if not previous:
            return list(factorize.tucker2_output_error(source.weight, moment))
        first, core, last = previous
        inner = factorize.moment_through(_matrix(first), moment, block=core[0, 0].numel())
        return list(factorize.tucker2_output_error(core, inner, outer=_matrix(last)))

    def decompose(self, source: WeightSource, ranks: tuple[int, ...], params, seed: int = 0) -> list[torch.Tensor]:
        previous = source.previous_weights(self.name)
        tensor = previous[1] if previous else source.weight
        core, u_out, u_in = factorize.tucker2(tensor, ranks, n_iter=params.n_iter, tol=params.tol)
        first, last = u_in.T, u_out
        if previous:
            first = first @ previous[0].reshape(previous[0].shape[0], -1).to(first.dtype)
            last = previous[2].reshape(previous[2].shape[0], -1).to(last.dtype) @ last
        ones = (1,) * source.spec.spatial_dims
        return [first.reshape(*first.shape, *ones), core, last.reshape(*last.shape, *ones)]


@hookimpl
def musco_register_decompositions() -> list[type]:
    return [Tucker2]
