"""Runs a multi-stage compression with fine-tuning between steps, saving state after each step.

    python resume_worker.py STATE_DIR OUT_FILE [--kill-after N] [--resume]

With --kill-after N the process SIGKILLs itself right after saving the state of step N; with --resume it
continues from STATE_DIR. OUT_FILE receives the final weights (safetensors) and ranks (JSON beside it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal

import torch
from safetensors.torch import save_file
from torch import nn

from models import make_trained_like, resnet18
from musco_core import Compressor, standardize_model

SCHEDULE = {
    "version": 1,
    "settings": {"ft_every": 2, "nglobal_compress_iters": 2, "seed": 7},
    "layers": {
        "layer1.0.conv1": {"decomposition": "tucker2", "rank_selection": "vbmf", "vbmf_weakenen_factor": 0.5},
        "layer2.0.conv2": {"decomposition": "cp3", "rank_selection": "param_reduction", "param_reduction_rate": 2},
        "layer3.0.conv1": {"decomposition": "cp4", "rank_selection": "manual", "manual_rank": [24, 12]},
        "fc": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [6, 3]},
    },
}


def model() -> nn.Module:
    torch.manual_seed(0)  # biases keep torch's random init
    return make_trained_like(resnet18(num_classes=10, width=16), seed=5)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir")
    parser.add_argument("out_file")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    example = torch.zeros(1, 3, 32, 32)
    if args.resume:
        compressor = Compressor.resume(model(), args.state_dir, example_input=example)
    else:
        compressor = Compressor(model(), model_compr_kwargs=SCHEDULE, example_input=example)
    while not compressor.done:
        compressor.compression_step()
        fine_tune(compressor.compressed_model, compressor.curr_iter)
        compressor.save_state(args.state_dir)
        if args.kill_after == compressor.curr_iter:
            os.kill(os.getpid(), signal.SIGKILL)
    final = standardize_model(compressor.compressed_model)
    save_file({k: v.contiguous() for k, v in final.state_dict().items()}, args.out_file)
    with open(args.out_file + ".json", "w") as f:
        json.dump({name: list(r) if r else None for name, r in compressor.ranks.items()}, f)


if __name__ == "__main__":
    main()
