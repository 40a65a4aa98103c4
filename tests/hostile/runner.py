"""Runs a group of hostile cases in this process, under an address-space limit, and writes their outcomes as JSON.

    python tests/hostile/runner.py GROUP ROOT RESULTS_JSON

Each case runs in ROOT/<case name>/inputs (its current directory), one after another. The address space is capped
at the interpreter's size after the imports plus ``ADDRESS_SPACE_HEADROOM``, so a bomb that is not defused ends
as a MemoryError in its own outcome; each case also gets ``CASE_SECONDS`` before SIGALRM stops it. Every outcome
records the case's time and peak resident memory (the kernel's high-water mark, reset before each case).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

sys.dont_write_bytecode = True  # importing the user's modules must not add __pycache__ to their folders
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `hostile`

from hostile.cases import CASES  # noqa: E402

#: Address space allowed above the interpreter's own after importing torch and musco-core (about 0.6 GiB).
ADDRESS_SPACE_HEADROOM = 2 * 2**30
#: Time allowed to one case before it counts as hanging.
CASE_SECONDS = 60
USER_MODULES = ("hostile_factories", "hostile_broken_module", "hostile_exiting_module")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_memory() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size


class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout(f"still running after {CASE_SECONDS} s")


@contextlib.contextmanager
def _file_size_limit(limit: int | None):
    """A soft RLIMIT_FSIZE, with SIGXFSZ ignored so that a write past it fails with EFBIG (a full disk)."""
    if limit is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _invoke_cli(args: list[str]) -> dict:
    from click.testing import CliRunner

    from musco_core.cli import main

    logging.root.handlers.clear()  # `compress` binds a handler to the stderr of the invocation that set it up
    result = CliRunner().invoke(main, args)
    uncaught = None if isinstance(result.exception, SystemExit) or result.exception is None else (
        "".join(traceback.format_exception(result.exception)))
    return {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr, "uncaught": uncaught}


def run_case(case, inputs: Path) -> dict:
    saved_path, saved_cwd = list(sys.path), os.getcwd()
    for module in USER_MODULES:
        sys.modules.pop(module, None)
    os.chdir(inputs)
    _reset_peak_memory()
    outcome: dict = {}
    started = time.perf_counter()
    signal.alarm(CASE_SECONDS)
    try:
        with (case.around(inputs) if case.around else contextlib.nullcontext()), \
                _file_size_limit(case.file_size_limit):
            value = case.act(inputs)
            if case.kind == "cli":
                outcome.update(_invoke_cli(value))
            else:
                outcome["value"] = value if case.kind == "returns" else repr(value)[:200]
                outcome["error"] = None
    except BaseException as exc:  # noqa: BLE001 - the outcome of a hostile case is whatever it raised
        outcome["error"] = type(exc).__name__
        outcome["message"] = str(exc)[:100_000]
        if not isinstance(exc, Exception) or type(exc).__name__ in ("AssertionError", "CaseTimeout"):
            outcome["traceback"] = traceback.format_exc()[-5000:]
    finally:
        signal.alarm(0)
        outcome["seconds"] = time.perf_counter() - started
        outcome["peak_rss_mib"] = _status_kib("VmHWM") / 1024
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
    return outcome


def main(group: str, root: Path, results_path: Path) -> None:
    import musco_core.cli  # noqa: F401 - torch, click and the registry loaded before the limit is measured
    from musco_core import default_registry

    default_registry()
    baseline = _status_kib("VmSize") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (baseline + ADDRESS_SPACE_HEADROOM, hard))
    signal.signal(signal.SIGALRM, _on_alarm)
    outcomes = {"_limits": {"address_space_mib": (baseline + ADDRESS_SPACE_HEADROOM) / 2**20,
                            "baseline_vm_mib": baseline / 2**20}}
    for case in CASES:
        if case.group == group:
            outcomes[case.name] = run_case(case, root / case.name / "inputs")
    results_path.write_text(json.dumps(outcomes))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
