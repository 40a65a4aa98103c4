"""Spatial SVD of k x k convolutions and an energy-threshold rank selector, as a musco-core plugin.

It imports nothing but musco-core's public plugin API: the top-level names of ``musco_core`` and the
constrained parameter types of ``musco_core.schedule``.
"""
from __future__ import annotations

import attrs
import torch

import musco_core
from musco_core import Decomposer, FactorLayout, LayerSpec, RankSelector, WeightSource, hookimpl
from musco_core.schedule import UnitFraction

if musco_core.PLUGIN_API_VERSION < (1, 0):
    raise ImportError(f"musco-spatial-svd needs musco-core's plugin API 1.0 or newer, but the installed "
                      f"musco-core has {musco_core.PLUGIN_API_VERSION}; upgrade musco-core")


def _kernel_matrix(weight: torch.Tensor) -> torch.Tensor:
    """W (out, in, kh, kw) as M (in * kh) x (out * kw) with M[(c, i), (o, j)] = W[o, c, i, j]."""
    out_channels, in_channels, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)


class SpatialSVD(Decomposer):
    """(kh x 1) conv ``in -> r`` then (1 x kw) conv ``r -> out``: each factor convolves one spatial axis.

    With the kernel matrix M[(c, i), (o, j)] = W[o, c, i, j] ~= U S V^T truncated at rank r, the first factor's
    weight is U sqrt(S) (an ``in -> r`` conv along axis 0, with that axis' stride, padding and dilation) and the
    second's sqrt(S) V^T (an ``r -> out`` conv along axis 1, with the bias). At rank ``min(in * kh, out * kw)``
    the chain equals the layer exactly.
    """

    name = "spatial_svd"
    min_rank = 1
    exact_at_max_rank = True

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        if spec.spatial_dims != 2 or min(spec.kernel_size) < 2:
            return "spatial_svd needs a 2-d convolution with a kernel of at least 2 x 2; use svd for a 1x1 one"
        if spec.groups != 1:  # the core hands decomposers one group at a time; this is only a guard
            return "spatial_svd decomposes one group at a time"
        odd_same_padding = [d * (k - 1) % 2 for d, k in zip(spec.dilation, spec.kernel_size, strict=True)]
        if spec.padding == "same" and any(odd_same_padding):  # each factor pads its own axis symmetrically
            return "padding='same' with an even kernel cannot be split over the two factors; use tucker2 or cp3"
        return None

    def layout(self, spec: LayerSpec, ranks: tuple[int, ...]) -> list[FactorLayout]:
        (rank,) = ranks
        kh, kw = spec.kernel_size
        return [FactorLayout(rank, spec.in_channels, (kh, 1), axes=(0,)),
                FactorLayout(spec.out_channels, rank, (1, kw), axes=(1,), bias=spec.has_bias)]

    def max_ranks(self, source: WeightSource) -> tuple[int, ...]:
        spec = source.spec
        kh, kw = spec.kernel_size
        full = min(spec.in_channels * kh, spec.out_channels * kw)
        previous = source.previous_weights(self.name)
        if previous:  # compressed before by spatial_svd: the kernel matrix has at most that rank
            return (min(full, previous[0].shape[0]),)
        return (full,)

    def rank_matrices(self, source: WeightSource) -> list[torch.Tensor]:
        return [_kernel_matrix(source.weight)]

    def decompose(self, source: WeightSource, ranks: tuple[int, ...], params, seed: int = 0) -> list[torch.Tensor]:
        (rank,) = ranks
        weight = source.weight.detach()
        weight = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        out_channels, in_channels, kh, kw = weight.shape
        u, s, vh = torch.linalg.svd(_kernel_matrix(weight), full_matrices=False)  # deterministic: seed unused
        root = s[:rank].sqrt()
        first = (u[:, :rank] * root).reshape(in_channels, kh, rank).permute(2, 0, 1)  # (r, in, kh)
        second = (root[:, None] * vh[:rank]).reshape(rank, out_channels, kw).permute(1, 0, 2)  # (out, r, kw)
        return [first.reshape(rank, in_channels, kh, 1), second.reshape(out_channels, rank, 1, kw)]


@attrs.frozen
class EnergyParams:
    """Share of the squared singular values (the energy) the kept rank must hold, in [0, 1]."""

    energy_threshold: UnitFraction = 0.9


class Energy(RankSelector):
    """The smallest rank whose squared singular values hold ``energy_threshold`` of the total."""

    name = "energy"
    Params = EnergyParams

    def unsupported_reason(self, decomposer: Decomposer) -> str | None:
        if type(decomposer).rank_matrices is Decomposer.rank_matrices:
            return "it has no matrix unfoldings to measure energy in; use param_reduction or manual"
        return None

    def select(self, decomposer: Decomposer, source: WeightSource, stage: int, params: EnergyParams
               ) -> tuple[int, ...]:
        ranks = []
        for matrix in decomposer.rank_matrices(source):
            energy = torch.linalg.svdvals(matrix.detach().to(torch.float64)).square()
            total = energy.sum()
            if total <= 0:  # a zero matrix: any rank holds all of its (no) energy
                ranks.append(decomposer.min_rank)
                continue
            held = energy.cumsum(0) / total  # held[k - 1]: the share rank k holds, nondecreasing
            # a share within rounding of the threshold counts as reaching it, and rounding can leave held[-1] < 1
            rank = int((held < params.energy_threshold - 1e-12).sum()) + 1
            ranks.append(max(min(rank, energy.numel()), decomposer.min_rank))
        return tuple(ranks)


@hookimpl
def musco_register_decompositions() -> list[type]:
    return [SpatialSVD]


@hookimpl
def musco_register_rank_selectors() -> list[type]:
    return [Energy]
