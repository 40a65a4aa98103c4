"""A two-pass MUSCO run with fine-tuning between steps, saving its state after each step: tucker2 (vbmf), cp3
(param_reduction), cp4 and svd (manual), whitened_svd on calibration data, and three layers under a whole-model
``budget`` (one choosing between svd and tucker2) whose second-pass allocation spans two steps. Used in-process by the resume tests and as a script:

    python resume_worker.py STATE_DIR OUT_FILE [--kill-after N] [--announce] [--resume]

With --kill-after N the process SIGKILLs itself right after saving the state of step N; with --announce it prints
"started" once the run is about to take its first step (so a test can kill it at a random moment after); with
--resume it continues from STATE_DIR. OUT_FILE receives the final weights (safetensors) and ranks (JSON beside it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

import torch
from models import make_trained_like, resnet18
from safetensors.torch import save_file
from torch import nn

from musco_core import Compressor, standardize_model

SCHEDULE = {
    "version": 1,
    "settings": {"ft_every": 3, "nglobal_compress_iters": 2, "seed": 7,
                 "algo_kwargs": {"budget": {"reduction": 1.2, "metric": "flops"}}},
    "layers": {
        "layer1.0.conv1": {"decomposition": "tucker2", "rank_selection": "vbmf", "vbmf_weakenen_factor": 0.5},
        "layer2.0.conv2": {"decomposition": "cp3", "rank_selection": "param_reduction", "param_reduction_rate": 2},
        "layer3.0.conv1": {"decomposition": "cp4", "rank_selection": "manual", "manual_rank": [24, 12]},
        "layer2.0.downsample.0": {"decomposition": "whitened_svd", "rank_selection": "manual", "manual_rank": [8, 4]},
        "layer3.0.downsample.0": {"decomposition": ["svd", "tucker2"], "rank_selection": "budget"},
        "layer3.1.conv1": {"decomposition": "tucker2", "rank_selection": "budget"},
        "layer3.1.conv2": {"decomposition": "tucker2", "rank_selection": "budget"},
        "fc": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [6, 3]},
    },
}
EXAMPLE = torch.zeros(1, 3, 32, 32)


def model() -> nn.Module:
    torch.manual_seed(0)  # biases keep torch's random init
    return make_trained_like(resnet18(num_classes=10, width=16), seed=5)


def calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(2, 3, 32, 32, generator=generator) for _ in range(3)]


def fine_tune(net: nn.Module, step: int) -> None:
    """One deterministic SGD step on data seeded by the step number."""
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    net.eval()


def start() -> Compressor:
    return Compressor(model(), model_compr_kwargs=SCHEDULE, example_input=EXAMPLE, calibration_data=calibration(),
                      progress=False)


def resume(state_dir) -> Compressor:
    return Compressor.resume(model(), state_dir, example_input=EXAMPLE, calibration_data=calibration(),
                             progress=False)


def finish(compressor: Compressor, state_dir, kill_after: int | None = None) -> None:
    """Takes the remaining steps, fine-tuning and saving the state after each."""
    while not compressor.done:
        compressor.compression_step()
        fine_tune(compressor.compressed_model, compressor.curr_iter)
        compressor.save_state(state_dir)
        if kill_after == compressor.curr_iter:
            os.kill(os.getpid(), signal.SIGKILL)


def final_weights(compressor: Compressor) -> dict[str, torch.Tensor]:
    plain = standardize_model(compressor.compressed_model)
    return {key: value.contiguous() for key, value in plain.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir")
    parser.add_argument("out_file")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--announce", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    compressor = resume(args.state_dir) if args.resume else start()
    if args.announce:
        print("started", flush=True)
    finish(compressor, args.state_dir, args.kill_after)
    save_file(final_weights(compressor), args.out_file)
    with open(args.out_file + ".json", "w", encoding="utf-8") as handle:
        json.dump({name: list(r) if r else None for name, r in compressor.ranks.items()}, handle)
    sys.exit(0)


if __name__ == "__main__":
    main()
