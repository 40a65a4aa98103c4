"""CP (PARAFAC) decompositions of a kxk convolution into 1x1 -> depthwise -> 1x1 chains.

* ``cp3``: the kernel as a 3-way tensor ``out x in x (kh*kw)``: 1x1 ``in -> R``, depthwise ``k x k`` on R
  channels, 1x1 ``R -> out`` (bias).
* ``cp4``: the 4-way kernel: 1x1 ``in -> R``, depthwise ``kh x 1``, depthwise ``1 x kw``, 1x1 ``R -> out``.

Re-compression rebuilds the dense kernel from the factors and decomposes it again at the new rank.
"""
from __future__ import annotations

import attrs
import torch

from musco_core import hookimpl
from musco_core.components import Decomposer, FactorLayout, LayerSpec, WeightSource
from musco_core.schedule import NonNegativeFloat, PositiveInt

from . import factorize


@attrs.frozen
class CPParams:
    """ALS sweep cap and the relative error decrease per sweep below which ALS stops."""

    #: ALS sweep cap (extrapolated sweeps that were discarded count too).
    n_iter_max: PositiveInt = 200
    #: ALS stops once the relative error fell by less than this per sweep, on average over the last 5 sweeps.
    tol: NonNegativeFloat = 1e-4


class _CP(Decomposer):
    Params = CPParams
    min_rank = 2

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        if spec.spatial_dims == 0 or spec.is_pointwise:
            return f"{self.name} needs a kxk convolution (k > 1); use svd for Linear and 1x1 layers"
        return None

    def max_ranks(self, source: WeightSource) -> tuple[int, ...]:
        """The current CP rank once the layer was factorized by this decomposition (its kernel has that CP rank
        exactly, so no larger one fits it better); before, the largest rank that stores no more weights than the
        dense layer."""
        previous = source.previous_weights(self.name)
        if previous:
            return (previous[0].shape[0],)
        spec = source.spec
        return (max(1, spec.n_weights // (self.count_params(spec, (1,)))),)

    def _tensor(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decompose(self, source: WeightSource, ranks: tuple[int, ...], params, seed: int = 0) -> list[torch.Tensor]:
        (rank,) = ranks
        factors, _ = factorize.cp_als(self._tensor(source.weight), rank, n_iter_max=params.n_iter_max,
                                      tol=params.tol, seed=seed)
        out_factor, in_factor, *kernel_factors = factors
        layouts = self.layout(source.spec, ranks)
        weights = [in_factor.T, *(k.T for k in kernel_factors), out_factor]
        return [w.reshape(layout.weight_shape) for w, layout in zip(weights, layouts)]


class CP3(_CP):
    name = "cp3"

    def layout(self, spec: LayerSpec, ranks: tuple[int, ...]) -> list[FactorLayout]:
        (rank,) = ranks
        return [FactorLayout.pointwise(spec, rank, spec.in_channels),
                FactorLayout(rank, rank, spec.kernel_size, groups=rank, axes=tuple(range(spec.spatial_dims))),
                FactorLayout.pointwise(spec, spec.out_channels, rank, bias=spec.has_bias)]

    def _tensor(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], weight.shape[1], -1)


class CP4(_CP):
    name = "cp4"

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        if spec.spatial_dims != 2:
            return "cp4 needs a 2-d convolution; use cp3 or tucker2"
        if spec.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(spec.dilation, spec.kernel_size)):
            return "padding='same' with an even kernel pads asymmetrically and cannot be split over two factors"
        return super().unsupported_reason(spec)

    def layout(self, spec: LayerSpec, ranks: tuple[int, ...]) -> list[FactorLayout]:
        (rank,) = ranks
        kh, kw = spec.kernel_size
        return [FactorLayout.pointwise(spec, rank, spec.in_channels),
                FactorLayout(rank, rank, (kh, 1), groups=rank, axes=(0,)),
                FactorLayout(rank, rank, (1, kw), groups=rank, axes=(1,)),
                FactorLayout.pointwise(spec, spec.out_channels, rank, bias=spec.has_bias)]

    def _tensor(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


@hookimpl
def musco_register_decompositions() -> list[type]:
    return [CP3, CP4]
