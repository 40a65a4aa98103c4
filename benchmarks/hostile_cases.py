"""Time and peak memory of every hostile case of tests/hostile (the corpus the tests run), slowest and largest first.

    python benchmarks/hostile_cases.py [--top 5]

Runs the cases group by group through tests/hostile/runner.py, as tests/test_hostile_inputs.py does (each group in
a fresh process under an address-space limit), and prints the runner's per-case seconds and peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from hostile.cases import CASES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    outcomes = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for case in CASES:
            inputs = root / case.name / "inputs"
            inputs.mkdir(parents=True)
            case.prepare(inputs)
        for group in sorted({case.group for case in CASES}):
            results = root / f"{group}.json"
            subprocess.run([sys.executable, str(TESTS / "hostile" / "runner.py"), group, str(root), str(results)],
                           env=env, check=True)
            outcomes.update(json.loads(results.read_text()))
    limits = outcomes.pop("_limits")
    rows = [(o["seconds"], o["peak_rss_mib"], name) for name, o in outcomes.items()]
    print(f"{len(rows)} cases; address space limit {limits['address_space_mib']:.0f} MiB; lowest peak RSS "
          f"{min(r[1] for r in rows):.0f} MiB (the interpreter after the imports)")
    for title, key in (("slowest", lambda r: -r[0]), ("largest peak", lambda r: -r[1])):
        print(f"\n{title}:")
        for seconds, peak, name in sorted(rows, key=key)[:args.top]:
            print(f"  {seconds:7.3f} s  {peak:6.0f} MiB  {name}")


if __name__ == "__main__":
    main()
