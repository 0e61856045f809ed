"""Pruning a model whose weights are FSDP2 shards (``fully_shard``, DTensor parameters).

Every scorer reads whole weights (PX runs whole blocks through its two passes), so each process gathers the
weights into an unsharded copy of the model (its "twin", built like the copy the final save writes), prunes the
twin with its own share of the calibration batches (the scorers sum their data terms over processes, so every
process derives the same masks), then cuts each mask like its weight and zeroes its local shard. The whole model
must fit in every process's memory while it prunes; the sharded model, the optimizer and training keep the
memory savings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..finetuning.outputs import gathered_copy
from ..finetuning.outputs import is_sharded as is_sharded


def unsharded_twin(model: nn.Module) -> nn.Module:
    """A plain copy of an FSDP2-sharded ``transformers`` model, every weight gathered whole, on the model's device.

    A collective: every process must call it, and every process keeps its copy.
    """
    if getattr(model, "config", None) is None:  # every process raises, before any gather
        raise ValueError(
            "hf_px.prune can prune an FSDP2-sharded model only when it is a transformers model (it rebuilds an "
            "unsharded copy from model.config to score). Prune this model before fully_shard: load it whole on "
            "every process, call hf_px.prune there, then shard it."
        )
    twin = gathered_copy(model, keep=True)  # gathered on the CPU; score where the shards (and batches) live
    return twin.to(next(model.parameters()).device)


def prune_sharded(model: nn.Module, batches: list, config: Any, *, tokenizer: Any = None,
                  progress: bool = True) -> Any:
    """:func:`hf_px.prune` for an FSDP2-sharded model: score an unsharded twin, mask the live shards."""
    from ..finetuning import fixed_masks
    from .loop import PruneResult, prune

    if config.pcn is not None:
        raise ValueError("PCN changes layer widths, which a sharded model cannot take in place: apply PCN (and "
                         "prune) before fully_shard, or prune the sharded model with pcn=None.")
    twin = unsharded_twin(model)
    result = prune(twin, batches, config, tokenizer=tokenizer, progress=progress)
    with torch.no_grad():
        fixed_masks.reapply_masks(fixed_masks.bind_masks(model, result.masks))
    del twin
    return PruneResult(model=model, masks=result.masks, report=result.report, config=result.config,
                       tokenizer=result.tokenizer, extras={**result.extras, "sharded": True})
