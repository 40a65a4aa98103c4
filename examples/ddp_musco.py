"""MUSCO with DistributedDataParallel fine-tuning between compression steps, on CPU:

    torchrun --nproc_per_node=2 examples/ddp_musco.py

Every rank holds a replica and its own shard of the data (DistributedSampler). Each compression step runs on every
rank (calibration statistics all-reduced, layers decomposed across ranks, factors broadcast), leaves the same model
on all of them, and is followed by a few DDP epochs over the new parameters; rank 0 saves the run state and the
result. A tiny synthetic task, done in well under a minute. Runs as a single process too (``python ddp_musco.py``).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from musco_core import Compressor, distributed
from musco_core.io import save_compressed

SCHEDULE = {
    "version": 1,
    "settings": {"ft_every": 1, "nglobal_compress_iters": 2},
    "layers": {
        "features.2": {"decomposition": "whitened_svd", "rank_selection": "param_reduction",
                       "param_reduction_rate": 2},
        "classifier.1": {"decomposition": "svd", "rank_selection": "param_reduction", "param_reduction_rate": 2},
    },
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, 3, 16, 16, generator=generator)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    return TensorDataset(x, y)


def fine_tune(model: nn.Module, loader: DataLoader, sampler: DistributedSampler | None, epochs: int = 2) -> float:
    wrapped, optimizer = distributed.rewrap(model, lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))
    wrapped.train()
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(wrapped(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return float(loss.detach())


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_num_threads(1)
    with distributed.process_group_from_env() as group:
        rank, world_size = (group.rank, group.world_size) if group else (0, 1)
        dataset = data()
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=0) if group else None
        loader = DataLoader(dataset, batch_size=32, sampler=sampler, shuffle=sampler is None)
        # this rank's shard of a few calibration batches (whitened_svd fits to the layers' inputs)
        calibration = [dataset.tensors[0][i:i + 32] for i in range(0, 256, 32)][rank::world_size]

        torch.manual_seed(0)  # the same initial weights on every rank
        model = Net()
        fine_tune(model, loader, sampler)  # "pre-training"
        compressor = Compressor(model, model_compr_kwargs=SCHEDULE, calibration_data=calibration, progress=False)
        out = Path(tempfile.mkdtemp(prefix="ddp-musco-")) if rank == 0 else None
        out = Path(distributed.broadcast_json(group, str(out) if out else None))
        while not compressor.done:
            compressor.compression_step()
            loss = fine_tune(compressor.compressed_model, loader, sampler)
            compressor.save_state(out / "checkpoints")  # rank 0 writes, the others wait
            if rank == 0:
                print(f"step {compressor.curr_iter}/{compressor.niters}: loss {loss:.3f}, "
                      f"fingerprint {distributed.fingerprint(compressor.compressed_model)[:12]}")
        if rank == 0:
            save_compressed(compressor, out / "model")
            print(compressor.report().to_table())
            print(f"saved to {out}")
        else:
            print(f"rank {rank} fingerprint {distributed.fingerprint(compressor.compressed_model)[:12]}")


if __name__ == "__main__":
    main()
