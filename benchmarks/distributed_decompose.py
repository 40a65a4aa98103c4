"""The decomposition phase of a vbmf pass over a ResNet-50-shaped model (tucker2 for k x k convs, svd for 1x1 convs
and the classifier, trained-like weights, one compression step for all 53 layers) on 1 process against a 2-process
gloo job (each process 1 thread), alternating, with the load average before each run.

    python benchmarks/distributed_decompose.py [--repeats 3]

Each run is fresh processes launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Timed on every
rank, after a barrier: the wall time of ``compression_step()`` (what a user waits for: replica check, the
decompositions, broadcast of the factors; there is no calibration) and the CPU time the rank spent in it. The step of
the 2-process job is the slower rank's.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker() -> None:
    """One rank (or the single process): prints its timings as one JSON line."""
    import torch
    import torch.distributed as dist

    from _setup import make_trained_like, resnet50, setup
    from musco_core import Compressor, distributed

    setup(1)
    with distributed.process_group_from_env() as group:
        model = make_trained_like(resnet50()).eval()
        compressor = Compressor(model, config_type="vbmf", example_input=torch.randn(1, 3, 224, 224),
                                ft_every=1000, progress=False, inplace=True)
        if group is not None:
            dist.barrier()
        started, cpu = time.perf_counter(), time.process_time()
        compressor.compression_step()
        step, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(json.dumps({"rank": group.rank if group else 0, "step": step, "cpu": cpu,
                          "fingerprint": distributed.fingerprint(compressor.compressed_model)}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(world_size: int) -> list[dict]:
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        processes.append(subprocess.Popen([sys.executable, __file__, "--worker"], env=env, text=True,
                                          stdout=subprocess.PIPE, cwd=Path(__file__).parent))
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit(f"a run failed: {[process.returncode for process in processes]}")
    return [json.loads(output.strip().splitlines()[-1]) for output in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    rows = {1: [], 2: []}
    fingerprints = set()
    print(f"{'run':>4} {'processes':>9} {'load avg':>9} {'step s':>7} {'CPU s per rank':>16}")
    for repeat in range(args.repeats):
        for world_size in (1, 2):
            load = os.getloadavg()[0]
            ranks = launch(world_size)
            step = max(r["step"] for r in ranks)
            rows[world_size].append(step)
            fingerprints.add(ranks[0]["fingerprint"])
            cpu = " / ".join(f"{r['cpu']:.2f}" for r in ranks)
            print(f"{repeat + 1:>4} {world_size:>9} {load:>9.2f} {step:>7.2f} {cpu:>16}", flush=True)
    one, two = statistics.median(rows[1]), statistics.median(rows[2])
    print(f"median step: 1 process {one:.2f} s, 2 processes {two:.2f} s ({one / two:.2f}x); "
          f"the same model in every run: {len(fingerprints) == 1}")


if __name__ == "__main__":
    main()
