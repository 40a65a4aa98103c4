"""Arithmetic on factor chains: the dense weight they represent, and their parameter and MAC counts."""
from __future__ import annotations

import itertools
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


def _size_ratios(spec: LayerSpec, axis: int) -> tuple[float, float] | None:
    """The least and the greatest input size over output size along ``axis`` of a layer of ``spec``, over all
    input sizes; None where it has no bound: with less padding than the kernel reaches, a small input makes the
    input arbitrarily larger than the output (a 3x3 'valid' convolution of a 3x3 input: 9 to 1)."""
    if spec.padding == "same":
        return 1.0, 1.0
    stride, reach = spec.stride[axis], spec.dilation[axis] * (spec.kernel_size[axis] - 1)
    padding = 0 if spec.padding == "valid" else spec.padding[axis]
    if 2 * padding < reach:
        return None
    return stride / (2 * padding - reach + stride), float(stride)  # at an input of 1, and at most ``stride``


def _macs_per_output(spec: LayerSpec, layouts: Sequence[FactorLayout], ratios: Sequence[float]) -> float:
    """A chain's MACs per output position, for the input size over output size ``ratios`` per spatial axis: a
    factor ahead of the one that convolves an axis runs at the input's size along it."""
    ahead, total = set(range(spec.spatial_dims)), 0.0
    for layout in layouts:
        ahead -= set(layout.axes)
        total += layout.n_params * math.prod(ratios[axis] for axis in ahead)
    return total


def fewer_macs_at_any_input(spec: LayerSpec, layouts: Sequence[FactorLayout], than: Sequence[FactorLayout]
                            ) -> bool | None:
    """Whether the chain ``layouts`` runs fewer MACs than the chain ``than`` (both standing for a layer of ``spec``)
    at every input size, for a layer whose input shape is unknown; None where no bound tells (an axis a factor
    runs ahead of, see :func:`_size_ratios`). Fewer weights do not say it: a factor ahead of a stride-2 3x3
    convolution runs at 4 times the output's positions (tucker2 at (56, 56) of a 64-channel one: 35,392 weights
    for 36,864, 2.95M MACs for 2.36M at 16x16)."""
    axes = range(spec.spatial_dims)
    leading = {axis for chain in (layouts, than) for axis in axes if axis not in chain[0].axes}
    ranges = [_size_ratios(spec, axis) if axis in leading else (1.0, 1.0) for axis in axes]
    if any(bounds is None for bounds in ranges):
        return None
    # MACs per output position are linear in each axis's ratio: compared at every corner of their ranges
    return all(_macs_per_output(spec, layouts, ratios) < _macs_per_output(spec, than, ratios)
               for ratios in itertools.product(*ranges))


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
