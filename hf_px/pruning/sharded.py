"""Pruning a model whose weights are FSDP2 shards (``fully_shard``, DTensor parameters).

Every scorer reads whole weights (PX runs whole blocks through its two passes), so each process gathers the
weights into an unsharded copy of the model (its "twin"), prunes the twin with its own share of the calibration
batches (the scorers sum their data terms over processes, so every process derives the same masks), then cuts
each mask like its weight and zeroes its local shard. The whole model must fit in every process's memory while
it prunes; the sharded model, the optimizer and training keep the memory savings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 (DTensor) parameters."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _unsharded_class(model: nn.Module) -> type:
    """The model's own class: ``fully_shard`` swaps it for a subclass that also derives from ``FSDPModule``."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def unsharded_twin(model: nn.Module) -> nn.Module:
    """A plain copy of an FSDP2-sharded ``transformers`` model, with every weight gathered whole.

    A collective: every process must call it. The twin is built on the meta device (no random initialisation)
    and takes the gathered tensors; buffers are not sharded by FSDP2 and are copied as they are.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            "hf_px.prune can prune an FSDP2-sharded model only when it is a transformers model (it rebuilds an "
            "unsharded copy from model.config to score). Prune this model before fully_shard: load it whole on "
            "every process, call hf_px.prune there, then shard it."
        )
    from torch.distributed.tensor import DTensor

    state = {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
             for name, t in model.state_dict().items()}
    with torch.device("meta"):
        twin = _unsharded_class(model)(config)
    twin.load_state_dict(state, strict=False, assign=True)
    for name, buf in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        twin.get_submodule(owner)._buffers[attr] = buf.detach().clone()
    if hasattr(twin, "tie_weights"):
        twin.tie_weights()  # assign=True gave tied names separate tensors
    left = [n for n, t in list(twin.named_parameters()) + list(twin.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"could not gather {len(left)} tensors of the sharded model (e.g. {left[0]!r}); prune "
                           "before fully_shard instead.")
    return twin.train(model.training)


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
