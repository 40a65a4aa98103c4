"""Calibration data: the input statistics of layers, for decompositions fitted to a layer's outputs.

A layer computes ``W x`` on the features ``x`` of its input (a Linear layer's input rows, a convolution's
unfolded patches). A data-aware decomposition needs the second moment ``E[x x^T]`` of those features over the
user's calibration batches: :func:`collect_input_stats` accumulates it with forward pre-hooks, keeping one
``F x F`` running sum per layer and never the activations.
"""
from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn
from tqdm.auto import tqdm

from .components import InputStats, LayerSpec
from .errors import ConfigError, MuscoError, UnsupportedLayerError

log = logging.getLogger(__name__)

#: Feature rows turned into float64 at once: bounds the transient copy to about 128 MiB per layer call.
CHUNK_ELEMENTS = 1 << 24


def _explicit_padding(spec: LayerSpec) -> list[tuple[int, int]]:
    """(before, after) padding per spatial axis, as torch's conv modules compute it (``same``: extra after)."""
    if spec.padding == "valid":
        return [(0, 0)] * spec.spatial_dims
    if spec.padding == "same":
        totals = [d * (k - 1) for d, k in zip(spec.dilation, spec.kernel_size)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in spec.padding]


def check_geometry(spec: LayerSpec) -> None:
    """An UnsupportedLayerError unless input features of this geometry can be formed (Linear, 1-D or 2-D conv)."""
    if spec.spatial_dims > 2:
        raise UnsupportedLayerError(f"input features of a {spec.describe()}: only Linear layers and 1-D or 2-D "
                                    f"convolutions are supported (torch.nn.functional.unfold is 2-D)")


def input_features(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """The features ``(rows, F)`` a layer of geometry ``spec`` multiplies its weight with.

    For a Linear layer the rows of ``x`` (any rank, last axis the features); for a 1-D or 2-D convolution its
    unfolded patches after padding (``padding_mode`` honoured), channel-major as ``weight.reshape(out, -1)``
    orders them, so ``weight.reshape(out, -1) @ features.T`` is the convolution's output without bias.
    ``F = in_channels * kernel_numel``, all groups together.
    """
    check_geometry(spec)
    if spec.spatial_dims == 0:
        return x.reshape(-1, spec.in_channels)
    if x.dim() == spec.spatial_dims + 1:  # an unbatched input
        x = x.unsqueeze(0)
    pads = _explicit_padding(spec)
    if any(before or after for before, after in pads):
        flat = [size for pair in reversed(pads) for size in pair]  # F.pad lists the last axis first
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        x = F.pad(x, flat, mode=mode)
    kernel, dilation, stride = spec.kernel_size, spec.dilation, spec.stride
    if spec.spatial_dims == 1:  # a unit height axis turns it into a 2-D convolution
        x, kernel, dilation, stride = x.unsqueeze(-2), (1, *kernel), (1, *dilation), (1, *stride)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (batch, F, positions)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class InputStatsAccumulator:
    """Running float64 sum of ``features^T features`` of one layer: all it keeps is ``F x F`` and a row count."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Adds the features of one input ``x`` of the layer, in chunks of about :data:`CHUNK_ELEMENTS` values."""
        n_features = self.spec.in_channels * self.spec.kernel_numel
        # Chunks along the first axis keep the float64 features bounded whatever the batch size; a conv item
        # gives at most about one row per input position (fewer with stride).
        if self.spec.spatial_dims == 0:
            outer, rows_per_item = x.reshape(-1, self.spec.in_channels), 1
        else:
            outer = x if x.dim() == self.spec.spatial_dims + 2 else x.unsqueeze(0)
            rows_per_item = math.prod(outer.shape[2:])
        step = max(1, CHUNK_ELEMENTS // (n_features * max(1, rows_per_item)))
        for chunk in outer.split(step):
            features = input_features(self.spec, chunk).to(torch.float64)
            if self.total is None:
                self.total = torch.zeros(n_features, n_features, dtype=torch.float64, device=features.device)
            self.total.addmm_(features.T, features)
            self.count += features.shape[0]

    def result(self) -> InputStats:
        if self.total is None or self.count == 0:
            raise ValueError("no input was seen")
        return InputStats(self.total / self.count, self.count)


def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def check_reiterable(batches: Any, what: str = "calibration data") -> None:
    """A ConfigError unless ``batches`` can be iterated again (a list or DataLoader, not an iterator)."""
    if not isinstance(batches, Iterable) or isinstance(batches, (torch.Tensor, str, bytes, Mapping)):
        raise ConfigError(f"{what}: expected an iterable of input batches (a list or a DataLoader), "
                          f"got {type(batches).__name__}")
    if iter(batches) is batches:
        raise ConfigError(f"{what}: got an iterator ({type(batches).__name__}), which is used up after one pass; "
                          f"pass a list or a DataLoader, which can be iterated at every compression step")


def collect_input_stats(model: nn.Module, layers: Mapping[str, LayerSpec], batches: Iterable[Any], *,
                        progress: bool = True) -> dict[str, InputStats]:
    """The input statistics of the named layers over ``batches``, from one pass of ``model`` over them.

    A batch is called as ``model(batch)``, ``model(*batch)`` for a tuple or list, ``model(**batch)`` for a
    mapping. The pass runs in eval mode under ``no_grad``; every module's training flag is restored and the
    hooks are removed afterwards, also on error. Memory is one ``F x F`` float64 sum per layer, on its device.
    """
    check_reiterable(batches)
    modules = {}
    for name, spec in layers.items():
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"calibration: no layer {name!r} in {type(model).__name__}") from None
        try:
            check_geometry(spec)
        except UnsupportedLayerError as exc:
            raise UnsupportedLayerError(f"calibration: layer {name!r}: {exc}") from None
    accumulators = {name: InputStatsAccumulator(spec) for name, spec in layers.items()}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple) -> None:
            accumulators[name].update(inputs[0].detach())
        return record

    modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    n_batches = 0
    try:
        model.eval()
        bar = tqdm(batches, desc="calibration", unit="batch", leave=False, file=sys.stderr,
                   disable=not (progress and sys.stderr.isatty()))
        with torch.no_grad():
            for batch in bar:
                try:
                    _run_batch(model, batch)
                except MuscoError:
                    raise
                except Exception as exc:  # the user's batch or model: one clear line, the cause chained
                    raise ConfigError(f"calibration: the model failed on batch {n_batches}: "
                                      f"{type(exc).__name__}: {exc}") from exc
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if n_batches == 0:
        raise ConfigError(f"calibration data is empty: no batch to collect the input statistics of "
                          f"{', '.join(map(repr, layers))}")
    silent = [name for name, acc in accumulators.items() if acc.count == 0]
    if silent:
        raise ConfigError(f"calibration: layer(s) {', '.join(map(repr, silent))} never ran on the {n_batches} "
                          f"calibration batch(es); check that the batches reach them")
    stats = {name: acc.result() for name, acc in accumulators.items()}
    broken = [name for name, s in stats.items() if not torch.isfinite(s.second_moment).all()]
    if broken:
        raise ConfigError(f"calibration: the inputs of layer(s) {', '.join(map(repr, broken))} contain NaN or Inf")
    log.info("calibration: input statistics of %d layer(s) from %d batch(es)", len(stats), n_batches)
    return stats
