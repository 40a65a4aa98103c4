"""What idle OpenMP threads do in a benchmark, chosen before torch loads OpenMP (this module imports no torch)."""
from __future__ import annotations

import os

WAIT_POLICIES = ("passive", "active", "default")


def choose_wait_policy(argv: list[str]) -> None:
    """Sets ``OMP_WAIT_POLICY`` from ``--omp-wait-policy`` before torch loads OpenMP, which reads it only then.

    ``passive`` (the default, unless the environment sets a policy): idle threads sleep. On cores shared with
    other processes spinning threads made 2-thread runs 5x slower (ResNet-50, batch 1: 1277 ms against 240 ms),
    but waking a sleeping thread costs each parallel operation tens of microseconds here, which a model of many
    small layers pays more often. ``default``: OpenMP's own behaviour (libgomp spins a while, then sleeps), what
    a deployment gets unless it sets a policy; ``active``: idle threads spin.
    """
    chosen = None
    for i, arg in enumerate(argv):
        if arg.startswith("--omp-wait-policy="):
            chosen = arg.partition("=")[2]
        elif arg == "--omp-wait-policy" and i + 1 < len(argv):
            chosen = argv[i + 1]
    if chosen == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    elif chosen in ("passive", "active"):
        os.environ["OMP_WAIT_POLICY"] = chosen.upper()
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # argparse reports a wrong value
