"""AdamW parameter groups and the linear warm-up/decay schedule of the fine-tuning loop."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, exclude: Iterable[nn.Parameter] = ()) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors).

    Parameters without ``requires_grad`` and those in ``exclude`` (e.g. :func:`freeze_embeddings`'s) are left out,
    so AdamW keeps no state for them and its decoupled weight decay never touches them.
    """
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad and id(p) not in skip:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding tables: word, position and token-type embeddings (ViT: patch projection, class token
    and position table).

    Found structurally: the model's ``get_input_embeddings()``, every ``nn.Embedding``, and parameters held
    directly by a module named ``embeddings`` (ViT keeps its class token and position table there); the registry
    names no embedding modules. An output head tied to the word embeddings (GPT-2) is the same tensor.
    """
    found: dict[int, nn.Parameter] = {}
    try:
        inputs = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        inputs = None
    modules = [(None, inputs)] if isinstance(inputs, nn.Module) else []
    for name, module in [*modules, *model.named_modules()]:
        if name is None or isinstance(module, nn.Embedding):
            params = module.parameters()
        elif name.rsplit(".", 1)[-1] == "embeddings":
            params = module.parameters(recurse=False)
        else:
            continue
        for p in params:
            found.setdefault(id(p), p)
    return list(found.values())


def freeze_embeddings(model: nn.Module) -> list[nn.Parameter]:
    """Stop gradients to :func:`embedding_parameters` (``requires_grad=False``) and return them."""
    params = embedding_parameters(model)
    if not params:
        warnings.warn(f"freeze_embeddings: found no embedding parameters in {type(model).__name__}; nothing is "
                      "frozen.", stacklevel=2)
    for p in params:
        p.requires_grad_(False)
    return params


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
