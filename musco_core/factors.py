"""Arithmetic on factor chains: the dense weight they represent, and their parameter and MAC counts."""
from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch

from .components import Cost, Factor, FactorLayout, LayerSpec


def padding_per_axis(padding: str | Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
                     ) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial axis of a convolution, as torch computes it: ``'same'`` puts an
    even kernel's odd unit after."""
    if padding == "valid":
        return [(0, 0)] * len(kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in padding]


def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight (out, in // groups, *k) expanded to its block-diagonal dense form (out, in, *k)."""
    if groups == 1:
        return weight
    out_channels, in_per_group = weight.shape[:2]
    out_per_group = out_channels // groups
    dense = weight.new_zeros(out_channels, in_per_group * groups, *weight.shape[2:])
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group:(g + 1) * in_per_group] = weight[rows]
    return dense


def compose_factors(spec: LayerSpec, factors: Sequence[Factor]) -> torch.Tensor:
    """The dense weight (out, in, *kernel) of the layer a chain of factors computes.

    Every spatial axis is convolved by at most one factor, so the chain's kernel is the per-position product
    of the factors' channel maps: one batched matmul per factor over the kernel positions.
    """
    kernel = spec.kernel_size
    positions = math.prod(kernel)
    composite = None  # (positions, channels, in_channels)
    for factor in factors:
        dense = dense_weight(factor.weight, factor.layout.groups)
        for axis, size in enumerate(dense.shape[2:]):
            if size != 1 and size != kernel[axis]:
                raise ValueError(f"factor kernel {tuple(dense.shape[2:])} does not fit the layer kernel {kernel}")
        full = dense.expand(*dense.shape[:2], *kernel).reshape(*dense.shape[:2], positions).permute(2, 0, 1)
        if composite is not None and composite.shape[1] != full.shape[2]:
            raise ValueError(f"factor with {full.shape[2]} inputs follows one with {composite.shape[1]} outputs")
        composite = full if composite is None else torch.bmm(full, composite)
    if composite is None:
        raise ValueError("an empty factor chain has no weight")
    return composite.permute(1, 2, 0).reshape(composite.shape[1], composite.shape[2], *kernel)


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def chain_macs(spec: LayerSpec, layouts: Sequence[FactorLayout], input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of a chain of factors on an input of ``input_shape`` (batch included; a convolution's
    input may also be unbatched, ``(C, H, W)``, as torch accepts it: then the batch is 1)."""
    if spec.spatial_dims == 0:
        positions = math.prod(input_shape[:-1])
        return positions * sum(f.n_params for f in layouts)
    batch = math.prod(input_shape[:-(spec.spatial_dims + 1)])  # () for an unbatched input
    spatial = list(input_shape[-spec.spatial_dims:])
    total = 0
    for factor in layouts:
        for axis in factor.axes:
            if spec.padding == "same":
                continue  # stride is 1 with "same" padding: the size is kept
            padding = 0 if spec.padding == "valid" else spec.padding[axis]
            spatial[axis] = _out_size(spatial[axis], factor.kernel_size[axis], spec.stride[axis], padding,
                                      spec.dilation[axis])
        total += batch * math.prod(spatial) * factor.n_params
    return total


def layer_layout(spec: LayerSpec) -> list[FactorLayout]:
    """The original layer seen as a chain of one factor, so it is counted by the same arithmetic."""
    return [FactorLayout(spec.out_channels, spec.in_channels, spec.kernel_size, spec.groups,
                         tuple(range(spec.spatial_dims)), spec.has_bias)]


def widen(layout: FactorLayout, groups: int) -> FactorLayout:
    """A per-group factor layout repeated over ``groups`` groups side by side (one grouped conv)."""
    if groups == 1:
        return layout
    return attrs.evolve(layout, out_channels=layout.out_channels * groups, in_channels=layout.in_channels * groups,
                        groups=layout.groups * groups)


def chain_cost(spec: LayerSpec, layouts: Sequence[FactorLayout],
               calls: Sequence[tuple[Sequence[int], int]] | None) -> Cost:
    """Weights and MACs of a chain of factors standing for a layer of ``spec``, the MACs summed over ``calls``: each
    input shape (batch included) the layer runs at with its number of calls (see
    :attr:`~musco_core.stats.LayerStats.input_calls`); None when unknown, and then the MACs are too."""
    macs = None if calls is None else sum(count * chain_macs(spec, layouts, shape) for shape, count in calls)
    return Cost(sum(layout.n_params for layout in layouts), macs)
