"""The MUSCO schedule: compress ``ft_every`` layers per step, cycling, until each layer is compressed
``nglobal_compress_iters`` times."""
from __future__ import annotations

from collections.abc import Sequence

from musco_core import hookimpl
from musco_core.components import Scheduler
from musco_core.schedule import RunSettings


class MuscoScheduler(Scheduler):
    """Steps of ``min(ft_every, n_layers)`` layers over the cyclic sequence of layers, repeated
    ``nglobal_compress_iters`` times, so every layer is compressed exactly that many times."""

    name = "musco"

    def plan(self, layer_names: Sequence[str], settings: RunSettings, params) -> list[list[str]]:
        if not layer_names:
            return []
        per_step = min(settings.ft_every, len(layer_names))
        sequence = list(layer_names) * settings.nglobal_compress_iters
        return [sequence[i:i + per_step] for i in range(0, len(sequence), per_step)]


@hookimpl
def musco_register_schedulers() -> list[type]:
    return [MuscoScheduler]
