"""Hostile and careless input, each case bounded and answered with one clear error (see tests/hostile/cases.py).

The cases run in two subprocesses (library calls, then the command line) under an address-space limit, so a bomb
that is not defused fails its case, not the machine. Every case asserts the exact error class or exit code, that
the message names the file, key or option, that it is short (one line per problem), and that no input file
changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hostile.cases import CASES

RUNNER = Path(__file__).parent / "hostile" / "runner.py"
#: Wall-clock limit of one group's subprocess: a hang guard, far above what the cases take.
GROUP_TIMEOUT = 600
#: Longest message of a one-problem error: a path, a key and a short echo of the value.
ONE_LINE_LIMIT = 1000


def _snapshot(folder: Path) -> dict[str, str]:
    """What every entry under ``folder`` is: a regular file's SHA-256, a link's target, or its kind."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            entries[str(path)] = f"link to {os.readlink(path)}"
        elif stat.S_ISREG(mode):
            entries[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[str(path)] = "fifo" if stat.S_ISFIFO(mode) else "dir" if stat.S_ISDIR(mode) else "other"
    return entries


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's outcome, with snapshots of its inputs before and after."""
    root = tmp_path_factory.mktemp("hostile")
    before = {}
    for case in CASES:
        inputs = root / case.name / "inputs"
        inputs.mkdir(parents=True)
        case.prepare(inputs)
        before[case.name] = _snapshot(inputs)
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)  # the user's modules are found in the current directory, as `python -m` does
    for group in sorted({case.group for case in CASES}):
        results_path = root / f"{group}.json"
        done = subprocess.run([sys.executable, str(RUNNER), group, str(root), str(results_path)], env=env,
                              capture_output=True, text=True, timeout=GROUP_TIMEOUT)
        assert done.returncode == 0, done.stderr[-5000:]
        results.update(json.loads(results_path.read_text()))
    return {case.name: (results[case.name], before[case.name], _snapshot(root / case.name / "inputs"),
                        root / case.name) for case in CASES}


def test_the_corpus_has_at_least_60_cases():
    assert len(CASES) >= 60
    assert sum(case.kind == "cli" for case in CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_case(outcomes, case):
    outcome, before, after, folder = outcomes[case.name]
    assert after == before, "an input file was changed"
    mentions = [mention.format(inputs=folder / "inputs") for mention in case.mentions]
    if case.kind == "cli":
        assert outcome.get("uncaught") is None and "error" not in outcome, outcome
        assert outcome["exit_code"] == case.expect, outcome
        output = outcome["stdout"] + outcome["stderr"]
        if case.lines >= 0:
            assert len(outcome["stderr"].splitlines()) == case.lines, outcome["stderr"]
            assert "Traceback" not in output
            assert len(outcome["stderr"]) <= ONE_LINE_LIMIT * case.lines, outcome["stderr"]
        for mention in mentions:
            assert mention in outcome["stderr"], (mention, outcome["stderr"])
    elif case.kind == "raises":
        assert outcome["error"] == case.expect, outcome
        message = outcome["message"]
        if case.lines >= 0:  # PyYAML's own errors (lines=-1) span a few lines, each bounded
            assert len(message.splitlines()) == case.lines, message
        assert len(message) <= ONE_LINE_LIMIT * max(case.lines, 3), message[:2000]
        for mention in mentions:
            assert mention in message, (mention, message)
    else:
        assert outcome["error"] is None, outcome
    if case.check is not None:
        case.check(outcome["value"] if case.kind == "returns" else outcome, folder)
