"""Two-process CPU DDP training with SpectralControl; run by tests/test_distributed.py.

Usage: ``python tests/ddp_worker.py OUT_DIR``. Each rank trains on its own data, the
control helper runs every 5 steps on every rank, and rank r writes OUT_DIR/rank{r}.pt with
its flattened parameters and per-layer spectral norms.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
import ttconv  # noqa: E402

TARGET = 0.9


def model():
    return nn.Sequential(
        ttconv.SVDConv(3, 8, 3, padding=1, rank=4), nn.ReLU(),
        ttconv.SVDConv(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        ttconv.SVDConv(8, 8, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def run(rank, world_size, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    net = nn.parallel.DistributedDataParallel(model())
    control = ttconv.SpectralControl(net, TARGET, every=5, mode="scale", example_input=torch.zeros(1, 3, 8, 8))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(40):
        x = torch.randn(8, 3, 8, 8, generator=data)
        y = torch.randint(0, 4, (8,), generator=data)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        control.step()
    norms = control.apply()
    params = torch.cat([p.detach().flatten() for p in net.module.parameters()])
    torch.save({"params": params, "norms": norms}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(2, sys.argv[1]), nprocs=2, join=True)
