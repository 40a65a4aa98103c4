"""Shared set-up for the benchmarks: the test suite's model builders, and a fixed thread count."""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import make_trained_like, resnet50  # noqa: E402

__all__ = ["flops", "fresh_latency_cache", "keep_freed_memory", "make_trained_like", "resnet50", "setup", "thinner_dense_control"]


def setup(threads: int) -> str:
    """Fixes the thread count (timings swing 10x when another process competes) and describes the machine."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return f"torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}"


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory instead of returning it to the system; True if it could.

    glibc serves allocations above 32 MB (a batch-32 ResNet activation is 100 MB) with a fresh mmap and unmaps
    them when freed, so every such tensor page-faults its memory in again: at batch 32 that was a third of the
    eager forward time here. This is the in-process form of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``;
    jemalloc or tcmalloc through ``LD_PRELOAD`` do the same for a deployment.
    """
    name = ctypes.util.find_library("c")
    if name is None or platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


@contextmanager
def fresh_latency_cache() -> Iterator[Path]:
    """Points the latency cache at an empty file in a temporary folder (so every layer is timed afresh) and
    restores ``$MUSCO_LATENCY_CACHE`` as it was when the folder is deleted."""
    from musco_core.latency import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    with tempfile.TemporaryDirectory() as folder:
        os.environ[CACHE_ENV] = str(Path(folder) / "latency.json")
        try:
            yield Path(os.environ[CACHE_ENV])
        finally:
            if before is None:
                del os.environ[CACHE_ENV]
            else:
                os.environ[CACHE_ENV] = before


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of the model's whole forward pass on ``x`` (``FlopCounterMode``, through ``ModelStats``)."""
    from musco_core import ModelStats, default_registry

    return ModelStats.from_model(model, default_registry(), x, count_flops=True).total_flops


def thinner_dense_control(flops_x: float) -> tuple[torch.nn.Module, int, float]:
    """The control of the latency benchmarks: a dense ResNet-50 with fewer channels in every layer (``width``
    instead of 64), the width whose FLOPs reduction is closest to ``flops_x``; (model on the CPU, width, its
    FLOPs reduction). Nothing is factorized, so its speed-up is what removing that many FLOPs buys on a machine
    without adding a single layer."""
    x = torch.zeros(1, 3, 224, 224)
    original_flops = flops(resnet50().eval(), x)
    reductions = {}
    for width in range(64, 7, -1):
        reductions[width] = original_flops / flops(resnet50(width=width).eval(), x)
        if reductions[width] >= flops_x:
            break
    width = min(reductions, key=lambda w: abs(math.log(reductions[w] / flops_x)))
    torch.manual_seed(0)
    return make_trained_like(resnet50(width=width)).eval(), width, reductions[width]
