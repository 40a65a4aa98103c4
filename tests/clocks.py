"""A deterministic clock for latency budgets in tests: time from the geometry alone, never from the machine."""
from __future__ import annotations

import torch
from torch.nn.modules.module import register_module_forward_hook

from musco_core.latency import Timer


class GeometryClock(Timer):
    """Every leaf module that runs costs 1e-9 s per weight plus ``overhead`` per call (so a chain pays per factor),
    the same for layers timed alone and in whole-model calls; a module of a type in ``extra`` costs that much more,
    and a convolution on a ``channels_last`` input ``channels_last_discount`` times its cost. Counts the layer
    modules it was asked to time, and records the type of every leaf run in whole-model calls and whether its input
    was ``channels_last`` (``ran``)."""

    def __init__(self, overhead: float = 1e-6, extra: dict[type, float] | None = None,
                 channels_last_discount: float = 1.0) -> None:
        self.overhead = overhead
        self.extra = extra or {}
        self.channels_last_discount = channels_last_discount
        self.layer_modules = 0
        self.ran: list[tuple[type, bool]] = []

    def layers(self, modules, input_shape, dtype, device):
        self.layer_modules += len(modules)
        x = torch.zeros(tuple(input_shape), dtype=dtype, device=device)
        return self._times([lambda module=module: module(x) for module in modules])

    def calls(self, calls, device, prepare=lambda index: None):
        return self._times(calls, record=True, prepare=prepare)

    def _times(self, calls, record=False, prepare=lambda index: None):
        times = []
        for index, call in enumerate(calls):
            prepare(index)
            total = [0.0]

            def count(module, args, output):
                if not list(module.children()):
                    channels_last = bool(args) and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and \
                        args[0].is_contiguous(memory_format=torch.channels_last)
                    seconds = sum(p.numel() for p in module.parameters(recurse=False)) * 1e-9 + self.overhead
                    if channels_last and isinstance(module, torch.nn.Conv2d):
                        seconds *= self.channels_last_discount
                    total[0] += seconds + sum(cost for kind, cost in self.extra.items() if isinstance(module, kind))
                    if record:
                        self.ran.append((type(module), channels_last))

            handle = register_module_forward_hook(count)
            try:
                call()
            finally:
                handle.remove()
            times.append(total[0])
        return times
