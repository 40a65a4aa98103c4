"""Per-layer model statistics: geometry, shapes, parameters and MACs of the layers musco-core can compress."""
from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .components import LayerSpec
from .surgery import FactorizedLayer


@attrs.frozen
class LayerStats:
    """One compressible layer as seen on an example input (shapes include the batch)."""

    name: str
    type: type
    spec: LayerSpec
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None

    @property
    def params(self) -> int:
        return self.spec.n_weights + (self.spec.out_channels if self.spec.has_bias else 0)

    @property
    def macs(self) -> int | None:
        """Multiply-accumulates on the example input: every output value costs one weight row."""
        if self.output_shape is None:
            return None
        channel_axis = -1 if self.spec.spatial_dims == 0 else 1
        positions = math.prod(self.output_shape) // self.output_shape[channel_axis]
        return positions * self.spec.n_weights


@attrs.frozen
class ModelStats:
    """Statistics of every layer that a registered adapter can read, in model order."""

    layers: dict[str, LayerStats]
    #: FLOPs of the whole forward pass on the example input (every op, functional calls included), counted by
    #: ``torch.utils.flop_counter.FlopCounterMode``; None without an example input.
    total_flops: int | None = None
    #: The layers whose output the model returns on the example input, as it is or as a view of it (a classifier's
    #: logits, a language model's head), in model order; None when unknown (no example input, FlopCo statistics).
    output_layers: tuple[str, ...] | None = None

    @property
    def ltypes(self) -> dict[str, dict[str, Any]]:
        """The FlopCo-style ``{name: {'type', 'kernel_size', 'groups'}}`` view the original API read."""
        return {name: {"type": s.type, "kernel_size": s.spec.kernel_size, "groups": s.spec.groups}
                for name, s in self.layers.items()}

    @property
    def total_macs(self) -> int | None:
        macs = [s.macs for s in self.layers.values()]
        return None if any(m is None for m in macs) else sum(macs)

    @property
    def total_params(self) -> int:
        return sum(s.params for s in self.layers.values())

    @classmethod
    def from_model(cls, model: nn.Module, registry, example_input: Any = None) -> ModelStats:
        """Reads every adaptable layer; with ``example_input`` also records shapes and MACs.

        ``example_input`` is called as ``model(x)``, ``model(*x)`` for a tuple or list, ``model(**x)`` for a mapping.

        A factorized layer counts as the layer it replaced (its original geometry), so statistics of a model
        that is part-way through a multi-stage run match those of the uncompressed model.
        The forward pass runs in eval mode under ``no_grad`` and restores every module's mode afterwards, so
        BatchNorm statistics and the model's own hooks are untouched.
        """
        readable = {}
        factorized: list[str] = []
        for name, module in model.named_modules():
            if not name or any(name.startswith(prefix + ".") for prefix in factorized):
                continue
            if isinstance(module, FactorizedLayer):
                factorized.append(name)
                readable[name] = (module, module.spec)
            elif (adapter := registry.adapter_for(module)) is not None:
                readable[name] = (module, adapter.read(module)[0])
        shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        total_flops = output_layers = None
        if example_input is not None:
            shapes, total_flops, returned = _run_example(model, {name: m for name, (m, _) in readable.items()},
                                                         example_input)
            readable = {name: entry for name, entry in readable.items() if name in shapes}
            output_layers = tuple(name for name in readable if name in returned)
        return cls({name: LayerStats(name, type(module), spec, *shapes.get(name, (None, None)))
                    for name, (module, spec) in readable.items()}, total_flops, output_layers)

    @classmethod
    def from_flopco(cls, flopco: Any) -> ModelStats:
        """Converts a ``flopco.FlopCo`` object (the original's statistics) for its Conv2d and Linear layers."""
        layers = {}
        for name, info in flopco.ltypes.items():
            input_shape, output_shape = tuple(flopco.input_shapes[name][0]), tuple(flopco.output_shapes[name][0])
            if issubclass(info["type"], nn.Linear):
                spec = LayerSpec("linear", output_shape[-1], input_shape[-1])
            else:
                kernel = tuple(info["kernel_size"])
                spec = LayerSpec("conv", output_shape[1], input_shape[1], kernel, (1,) * len(kernel),
                                 (0,) * len(kernel), (1,) * len(kernel), info.get("groups", 1))
            layers[name] = LayerStats(name, info["type"], spec, input_shape, output_shape)
        return cls(layers)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a model's output: a tensor, or tensors nested in tuples, lists and mappings (ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken of (the tensor itself when it is no view)."""
    return tensor if tensor._base is None else tensor._base


def _output_layers(outputs: Mapping[str, list[weakref.ref]], calls: list[tuple[str, tuple[int, ...]]],
                   returned: list[torch.Tensor]) -> set[str]:
    """The layers whose output tensor the model returned, as it is or as a view of it.

    When there is none, a model that ends in an elementwise function (``log_softmax(fc(x))``) is caught by shape:
    the last layer to run is taken when its output is ``(batch, n)`` and a returned tensor has that shape.
    """
    roots = {id(_root(t)) for t in returned}
    found = {name for name, refs in outputs.items() if any((t := ref()) is not None and id(t) in roots
                                                           for ref in refs)}
    if not found and calls:
        last, shape = calls[-1]
        if len(shape) == 2 and any(tuple(t.shape) == shape for t in returned):
            found = {last}
    return found


def _run_example(model: nn.Module, modules: Mapping[str, nn.Module], example_input: Any):
    """One forward pass recording each layer's input/output shape, the FLOPs of the whole pass and the layers whose
    output the model returns (the same tensor or a view of it: weak references, so a freed output never matches)."""
    shapes = {}
    outputs: dict[str, list[weakref.ref]] = {}
    calls: list[tuple[str, tuple[int, ...]]] = []  # (layer, output shape) in the order the layers ran
    modes = {module: module.training for module in model.modules()}

    def hook(name):
        def record(module, inputs, output):
            shapes.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))
            calls.append((name, tuple(output.shape)))
            if isinstance(output, torch.Tensor):
                outputs.setdefault(name, []).append(weakref.ref(_root(output)))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if isinstance(example_input, Mapping):  # keyword inputs, e.g. a tokenizer's output
                result = model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                result = model(*example_input)
            else:
                result = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return shapes, counter.get_total_flops(), _output_layers(outputs, calls, _tensors(result))


def as_model_stats(stats: Any, model: nn.Module, registry, example_input: Any = None) -> ModelStats:
    """Our statistics from whatever the user passed: ModelStats, a FlopCo object, or nothing."""
    if isinstance(stats, ModelStats):
        return stats
    if stats is not None and hasattr(stats, "ltypes") and hasattr(stats, "input_shapes"):
        return ModelStats.from_flopco(stats)
    if stats is not None:
        raise TypeError(f"model_stats must be a musco_core.ModelStats or a flopco.FlopCo object, "
                        f"got {type(stats).__name__}")
    return ModelStats.from_model(model, registry, example_input)

