"""Worker for test_distributed: prune a tiny model on this rank's shard of the calibration set."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import tiny, tiny_batches  # noqa: E402

import hf_px  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny("bert")
    batches = tiny_batches(model, n_batches=4)
    shard = batches[rank::world]
    config = hf_px.PruneConfig(sparsity=0.9, rounds=4, options={"qk_score": "magnitude"})
    result = hf_px.prune(model, shard, config, progress=False)
    if rank == 0:
        torch.save({"world": world, "masks": result.masks}, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo teardown in torch 2.13 sometimes aborts after a clean finish


if __name__ == "__main__":
    main()
