"""Truncated SVD of a Linear or 1x1 conv: ``in -> r`` (sqrt(S) V^T) then ``r -> out`` (U sqrt(S), bias).

The first factor applies the stride and padding (it is pointwise, so subsampling first is exact and cheap).
Re-compression truncates the product of the two factors without forming it.
"""
from __future__ import annotations

import torch

from musco_core import hookimpl
from musco_core.components import Decomposer, FactorLayout, LayerSpec, WeightSource

from . import factorize


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


class SVD(Decomposer):
    name = "svd"
    exact_at_max_rank = True
    min_rank = 2

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        if not spec.is_pointwise:
            return "svd needs a Linear or a 1x1 convolution; use tucker2, cp3 or cp4 for a kxk convolution"
        return None

    def layout(self, spec: LayerSpec, ranks: tuple[int, ...]) -> list[FactorLayout]:
        (rank,) = ranks
        return [FactorLayout.pointwise(spec, rank, spec.in_channels, owns_geometry=True),
                FactorLayout.pointwise(spec, spec.out_channels, rank, bias=spec.has_bias)]

    def max_ranks(self, source: WeightSource) -> tuple[int, ...]:
        previous = source.previous_weights(self.name)
        if previous:
            return (previous[0].shape[0],)
        return (min(source.spec.out_channels, source.spec.in_channels),)

    def rank_matrices(self, source: WeightSource) -> list[torch.Tensor]:
        """The ``out x in`` weight matrix, once factorized the product of the factors (rank ``r``): EVBMF's estimate
        depends on the shape, and only this one means in a later pass what it meant in the first."""
        return [_matrix(source.weight)]

    def output_errors(self, source: WeightSource) -> list[torch.Tensor] | None:
        """Exact, from the SVD of the weight (once factorized, of the product of the factors, which re-compression
        truncates) and the second moment of the layer's inputs."""
        if source.input_stats is None:
            return None
        previous = source.previous_weights(self.name)
        matrix = _matrix(previous[1]) @ _matrix(previous[0]) if previous else _matrix(source.weight)
        return [factorize.svd_output_error(matrix, source.input_stats.second_moment)]

    def decompose(self, source: WeightSource, ranks: tuple[int, ...], params, seed: int = 0) -> list[torch.Tensor]:
        (rank,) = ranks
        previous = source.previous_weights(self.name)
        if previous:
            left, right = factorize.svd_of_product(_matrix(previous[1]), _matrix(previous[0]), rank)
        else:
            left, right = factorize.truncated_svd(_matrix(source.weight), rank)
        ones = (1,) * source.spec.spatial_dims
        return [right.reshape(*right.shape, *ones), left.reshape(*left.shape, *ones)]


@hookimpl
def musco_register_decompositions() -> list[type]:
    return [SVD]
