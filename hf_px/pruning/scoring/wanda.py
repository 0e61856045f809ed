"""Wanda (Sun et al. 2024): S_ij = |W_ij|·‖X_j‖₂, X_j the j-th input feature over every real calibration token.

One no-grad pass over the calibration batches with forward pre-hooks on the target modules collects Σ x_j²
(padded tokens excluded through the batch's ``attention_mask``). GPT-2's ``Conv1D`` stores W as (in, out), so
its feature axis is 0. Conv2d (plain networks) uses the per-input-channel norm over positions.

The paper compares weights within each output row, and so does the default here: under the loop's global
threshold each alive weight is scored by its rank inside its row divided by the row's alive count, so every row
loses about the same fraction, up to ties across rows (exact per-row sparsity is approximated, not guaranteed).
``PruneConfig(method="wanda", options={"per_row": False})`` ranks |W|·‖X‖ globally instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...registry import is_transposed
from ..targets import is_transformers_model
from .base import Options, Scorer, ScoringContext, all_reduce_sum, model_inputs, register_scorer
from .ntk_diag import plain_input


@dataclass
class WandaOptions(Options):
    """Wanda's options.

    Args:
        per_row: rank each weight within its output row, as the paper does (True), or |W|·‖X‖ over the whole
            model under the global threshold (False).
    """

    per_row: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.per_row, bool):
            raise ValueError(f"per_row must be true or false, got {self.per_row!r}.")


def input_sq_norms(ctx: ScoringContext) -> dict[int, torch.Tensor]:
    """{id(weight): Σ over real tokens of x_j², per input feature} from one pass over the batches."""
    target_ids = {id(t.param) for t in ctx.targets}
    owners = [m for m in ctx.model.modules() if id(getattr(m, "weight", None)) in target_ids]
    sums: dict[int, torch.Tensor] = {}
    token_mask: list[torch.Tensor | None] = [None]

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        if isinstance(module, nn.Conv2d):
            sq = (x ** 2).sum(dim=(0, 2, 3))
        else:
            mask = token_mask[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x * mask.to(x.dtype).unsqueeze(-1)
            sq = (x ** 2).reshape(-1, x.shape[-1]).sum(0)
        key = id(module.weight)
        sums[key] = sums[key] + sq if key in sums else sq

    handles = [m.register_forward_pre_hook(hook) for m in owners]
    try:
        with torch.no_grad():
            for batch in ctx.batches:
                if is_transformers_model(ctx.model):
                    token_mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
                    ctx.model(**model_inputs(batch))
                else:
                    ctx.model(plain_input(batch))
    finally:
        for h in handles:
            h.remove()
    for m in owners:
        if id(m.weight) not in sums:
            raise ValueError(f"wanda: the layer {type(m).__name__} with weight {tuple(m.weight.shape)} never ran "
                             "on the calibration batches; it cannot be scored from activations.")
    return {k: all_reduce_sum(v) for k, v in sums.items()}


def _feature_scale(module: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """‖X_j‖ broadcast to the weight's shape."""
    if is_transposed(module):
        return norms[:, None]
    if isinstance(module, nn.Conv2d):
        return norms[None, :, None, None]
    return norms[None, :]


def _row_ranks(scores: torch.Tensor, alive: torch.Tensor, row_dim: int) -> torch.Tensor:
    """Each alive entry's rank in its output row (1 = lowest) over the row's alive count; dead entries 0."""
    s = scores.movedim(row_dim, 0).flatten(1)
    a = alive.movedim(row_dim, 0).flatten(1)
    s = torch.where(a, s, torch.full_like(s, -torch.inf))
    ranks = torch.empty_like(s)
    ranks.scatter_(1, s.argsort(dim=1), torch.arange(s.shape[1], dtype=s.dtype).expand_as(s).contiguous())
    dead = (~a).sum(1, keepdim=True).to(s.dtype)
    alive_n = a.sum(1, keepdim=True).clamp(min=1).to(s.dtype)
    out = torch.where(a, (ranks - dead + 1) / alive_n, torch.zeros_like(s))
    shape = list(scores.movedim(row_dim, 0).shape)
    return out.view(shape).movedim(0, row_dim)


@register_scorer
class WandaScorer(Scorer):
    """Wanda: |W|·‖X_j‖₂ per input feature from one calibration pass; per output row (global as an option)."""

    method = "wanda"
    description = "|W|·‖X_j‖₂ per input feature, ranked per output row (Wanda, Sun et al. 2024); per_row=False: global"
    options_class = WandaOptions
    options: WandaOptions

    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        norms = {k: v.sqrt() for k, v in input_sq_norms(ctx).items()}
        owner = {id(m.weight): m for m in ctx.model.modules() if id(getattr(m, "weight", None)) in norms}
        per_row = self.options.per_row
        out = {}
        for t in ctx.targets:
            module = owner[id(t.param)]
            full = t.param.detach().double().abs() * _feature_scale(module, norms[id(t.param)])
            s = t.view(full)
            if per_row:
                s = _row_ranks(s, t.view(ctx.masks[t.param_name]), 1 if is_transposed(module) else 0)
            out[t.key] = s
        return out
