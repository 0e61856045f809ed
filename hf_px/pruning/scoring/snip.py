"""SNIP (Lee et al. 2019): S = |Σ_batches ∂L/∂θ ⊙ θ|, normalised by its sum; needs labelled batches.

The loss is the task loss of the batch: cross-entropy on the labels for classifiers (plain nets get ``(x, y)``
pairs or dicts with ``x``/``labels``), next-token cross-entropy on ``input_ids`` (padding ignored) for causal LMs.
Unlike the official code the model stays in eval() (transformers have no BatchNorm; dropout would only add noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...modeling import Task, task_of
from ..targets import is_transformers_model
from .base import Scorer, ScoringContext, all_reduce_sum, grads_for, model_inputs, register_scorer
from .ntk_diag import plain_input


def _plain_labels(batch) -> torch.Tensor | None:
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, dict):
        for key in ("labels", "label", "y"):
            if key in batch:
                return batch[key]
    return None


def task_loss(model: nn.Module, batch, temperature: float = 1.0) -> torch.Tensor:
    """The supervised loss of one batch, from the logits divided by ``temperature`` (GraSP uses 200).

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> float(task_loss(net, (torch.ones(4, 3), torch.tensor([0, 1, 0, 1])))) > 0
        True
    """
    if not is_transformers_model(model):
        logits, labels = model(plain_input(batch)), _plain_labels(batch)
    else:
        out = model(**model_inputs(batch))
        logits = out.logits if getattr(out, "logits", None) is not None else out[0]
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if task_of(model) is Task.CAUSAL_LM:
            # next-token loss on the inputs themselves; the classification labels of a calibration set do not apply
            ids = batch["input_ids"]
            if "attention_mask" in batch:
                ids = ids.masked_fill(batch["attention_mask"] == 0, -100)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1) / temperature, ids[:, 1:].flatten(), ignore_index=-100)
    if labels is None:
        raise ValueError("this method needs labelled calibration batches: give (x, y) pairs or dicts with 'labels' "
                         "(hf_px.calibration_batches adds them when the dataset has a label column).")
    logits = logits / temperature
    if labels.is_floating_point():  # regression heads
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits.flatten(0, -2) if logits.dim() > 2 else logits, labels.flatten())


def unique_params(ctx: ScoringContext) -> list[torch.Tensor]:
    """The target parameters, each once (GPT-2's fused c_attn appears as three targets)."""
    return list({id(t.param): t.param for t in ctx.targets}.values())


def summed_grads(ctx: ScoringContext, params: list[torch.Tensor], temperature: float = 1.0) -> list[torch.Tensor]:
    """Σ over batches (and processes) of ∂L_batch/∂θ for ``params``."""
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with grads_for(ctx.model, params):
        for batch in ctx.batches:
            grads = torch.autograd.grad(task_loss(ctx.model, batch, temperature), params, allow_unused=True)
            for a, g in zip(acc, grads, strict=True):
                if g is not None:
                    a.add_(g.detach().double())
    return [all_reduce_sum(a) for a in acc]


@register_scorer
class SNIPScorer(Scorer):
    """SNIP: |Σ_batches g⊙θ| with the task loss (labels), normalised by its sum; one global threshold."""

    method = "snip"
    description = "|Σ g⊙θ| of the labelled task loss, normalised (SNIP, Lee et al. 2019)"

    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        params = unique_params(ctx)
        grads = summed_grads(ctx, params)
        raw = {id(p): (g * p.detach().double()).abs() for p, g in zip(params, grads, strict=True)}
        total = sum(float(s.sum()) for s in raw.values())
        scale = 1.0 / total if total > 0 else 1.0
        return {t.key: t.view(raw[id(t.param)]) * scale for t in ctx.targets}
