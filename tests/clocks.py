"""A deterministic clock for latency budgets in tests: time from the geometry alone, never from the machine."""
from __future__ import annotations

import torch
from torch.nn.modules.module import register_module_forward_hook

from musco_core.latency import Timer


class GeometryClock(Timer):
    """Every leaf module that runs costs 1e-9 s per weight plus ``overhead`` per call (so a chain pays per factor),
    the same for layers timed alone and in whole-model calls. Counts the layer modules it was asked to time."""

    def __init__(self, overhead: float = 1e-6) -> None:
        self.overhead = overhead
        self.layer_modules = 0

    def layers(self, modules, input_shape, dtype, device):
        self.layer_modules += len(modules)
        x = torch.zeros(tuple(input_shape), dtype=dtype, device=device)
        return self.calls([lambda module=module: module(x) for module in modules], device)

    def calls(self, calls, device):
        times = []
        for call in calls:
            total = [0.0]

            def count(module, args, output):
                if not list(module.children()):
                    total[0] += sum(p.numel() for p in module.parameters(recurse=False)) * 1e-9 + self.overhead

            handle = register_module_forward_hook(count)
            try:
                call()
            finally:
                handle.remove()
            times.append(total[0])
        return times
