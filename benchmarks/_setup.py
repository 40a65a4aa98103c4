"""Shared set-up for the benchmarks: the test suite's model builders, and a fixed thread count."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import make_trained_like, resnet50  # noqa: E402

__all__ = ["make_trained_like", "resnet50", "setup"]


def setup(threads: int) -> str:
    """Fixes the thread count (timings swing 10x when another process competes) and describes the machine."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return f"torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}"
