"""Spatial SVD of k x k convolutions and an energy-threshold rank selector, as a musco-core plugin."""
from __future__ import annotations

import attrs
import torch

import musco_core
from musco_core import Decomposer, FactorLayout, LayerSpec, RankSelector, WeightSource, hookimpl
from musco_core.schedule import UnitFraction

if musco_core.PLUGIN_API_VERSION < (1, 0):
    raise ImportError(f"musco-spatial-svd needs musco-core's plugin API 1.0 or newer, "
                      f"found {musco_core.PLUGIN_API_VERSION}")


def _kernel_matrix(weight: torch.Tensor) -> torch.Tensor:
    """W (out, in, kh, kw) as M (in * kh) x (out * kw) with M[(c, i), (o, j)] = W[o, c, i, j]."""
    out_channels, in_channels, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)


class SpatialSVD(Decomposer):
    """(kh x 1) conv ``in -> r`` then (1 x kw) conv ``r -> out``: each factor convolves one spatial axis."""

    name = "spatial_svd"
    min_rank = 1

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        if spec.spatial_dims != 2 or min(spec.kernel_size) < 2:
            return "spatial_svd needs a 2-d convolution with a kernel of at least 2 x 2"
        return None

    def layout(self, spec: LayerSpec, ranks: tuple[int, ...]) -> list[FactorLayout]:
        (rank,) = ranks
        kh, kw = spec.kernel_size
        return [FactorLayout(rank, spec.in_channels, (kh, 1), axes=(0,)),
                FactorLayout(spec.out_channels, rank, (1, kw), axes=(1,), bias=spec.has_bias)]

    def max_ranks(self, source: WeightSource) -> tuple[int, ...]:
        spec = source.spec
        kh, kw = spec.kernel_size
        return (min(spec.in_channels * kh, spec.out_channels * kw),)

    def rank_matrices(self, source: WeightSource) -> list[torch.Tensor]:
        return [_kernel_matrix(source.weight)]

    def decompose(self, source: WeightSource, ranks: tuple[int, ...], params, seed: int = 0) -> list[torch.Tensor]:
        (rank,) = ranks
        weight = source.weight.detach()
        weight = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        out_channels, in_channels, kh, kw = weight.shape
        u, s, vh = torch.linalg.svd(_kernel_matrix(weight), full_matrices=False)
        root = s[:rank].sqrt()
        first = (u[:, :rank] * root).reshape(in_channels, kh, rank).permute(2, 0, 1)   # (r, in, kh)
        second = (root[:, None] * vh[:rank]).reshape(rank, out_channels, kw).permute(1, 0, 2)  # (out, r, kw)
        return [first.reshape(rank, in_channels, kh, 1), second.reshape(out_channels, rank, 1, kw)]


@attrs.frozen
class EnergyParams:
    """Share of the squared singular values the kept rank must hold."""

    energy_threshold: UnitFraction = 0.9


class Energy(RankSelector):
    """The smallest rank whose squared singular values hold ``energy_threshold`` of the total."""

    name = "energy"
    Params = EnergyParams

    def unsupported_reason(self, decomposer: Decomposer) -> str | None:
        if type(decomposer).rank_matrices is Decomposer.rank_matrices:
            return "it has no matrix unfoldings to measure energy in"
        return None

    def select(self, decomposer: Decomposer, source: WeightSource, stage: int, params: EnergyParams
               ) -> tuple[int, ...]:
        ranks = []
        for matrix in decomposer.rank_matrices(source):
            energy = torch.linalg.svdvals(matrix.detach().double()).square()
            share = energy.cumsum(0) / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
            ranks.append(max(int((share < params.energy_threshold).sum()) + 1, decomposer.min_rank))
        return tuple(ranks)


@hookimpl
def musco_register_decompositions() -> list[type]:
    return [SpatialSVD]


@hookimpl
def musco_register_rank_selectors() -> list[type]:
    return [Energy]
