"""Masks held fixed during fine-tuning: bound to parameters, gradients zeroed, weights re-masked, checked after."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def resolve_masks(model: nn.Module, result_masks: Any, masks: dict[str, torch.Tensor] | None) -> dict:
    """Masks given explicitly, else those of a PruneResult, else read from the model's zeros."""
    from ..pruning.masks import masks_from_model

    chosen = masks if masks is not None else result_masks
    if chosen is None:
        chosen = masks_from_model(model)
    params = dict(model.named_parameters())
    out = {}
    for name, mask in chosen.items():
        if name not in params:
            raise ValueError(f"mask for {name!r} matches no parameter of the model; masks must be keyed by "
                             "model.named_parameters() names (as hf_px.prune returns them).")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                             f"{tuple(params[name].shape)}.")
        out[name] = mask.detach().to(torch.bool).cpu()
    return out


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def bind_masks(model: nn.Module, masks_by_name: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask on its device) pairs of a prepared model; works through DDP and FSDP2 (DTensor)."""
    pairs = []
    found = set()
    for name, param in model.named_parameters():
        key = _clean(name)
        if key not in masks_by_name:
            continue
        mask = masks_by_name[key]
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            from torch.distributed.tensor import distribute_tensor

            mask = distribute_tensor(mask.to(param.device_mesh.device_type), param.device_mesh, param.placements)
        elif tuple(param.shape) != tuple(mask.shape):
            raise ValueError(f"parameter {key!r} has shape {tuple(param.shape)} after accelerator.prepare but its "
                             f"mask {tuple(mask.shape)}: flattened FSDP parameters cannot hold masks. Use FSDP2 "
                             "(fsdp_version: 2, as in scripts/configs/accelerate_fsdp2.yaml) or DDP.")
        else:
            mask = mask.to(param.device)
        pairs.append((param, mask))
        found.add(key)
    missing = set(masks_by_name) - found
    if missing:
        raise ValueError(f"{len(missing)} masked parameters were not found in the prepared model (e.g. "
                         f"{sorted(missing)[0]!r}); masks must name parameters of the model being trained.")
    return pairs


@torch.no_grad()
def zero_masked_grads(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, mask in pairs:
        if param.grad is not None:
            param.grad.mul_(mask.to(param.grad.dtype))


@torch.no_grad()
def reapply_masks(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, mask in pairs:
        param.mul_(mask.to(param.dtype))


def _full(param: torch.Tensor) -> torch.Tensor:
    param = param.detach()
    # FSDP2 leaves DTensor shards; the check needs whole tensors (a collective: every rank runs it)
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def check_sparsity(model: nn.Module, masks: dict[str, torch.Tensor], kept_before: int, total: int) -> dict:
    """Counts before/after; raises if any pruned weight became non-zero (a bug, never expected).

    Under FSDP2 the counts are taken on whole tensors (a shard's own zeros would under-count), gathered one
    parameter at a time in ``named_parameters`` order, the same on every process, so no process ever holds more
    than one whole weight for the check.
    """
    info = {"masked_params": total, "kept_before": kept_before, "density_before": kept_before / max(total, 1)}
    if not masks:
        return info
    leaked = kept_after = 0
    seen = set()
    for name, param in model.named_parameters():
        key = _clean(name)  # activation checkpointing renames parameters, and the check must not skip them
        if key not in masks:
            continue
        seen.add(key)
        whole = _full(param)
        mask = masks[key].to(whole.device)
        leaked += int((whole[~mask] != 0).sum())
        kept_after += int((whole != 0).sum())
    if len(seen) != len(masks):  # a count over fewer tensors would read as lost sparsity, or none at all
        missing = sorted(set(masks) - seen)
        raise ValueError(f"{len(missing)} masked parameters are not in the fine-tuned model (e.g. {missing[0]!r}).")
    if leaked:
        raise RuntimeError(f"{leaked} pruned weights are non-zero after fine-tuning; masks were not held fixed.")
    info.update({"nonzero_after": kept_after, "density_after": kept_after / max(total, 1), "pruned_all_zero": True})
    return info
