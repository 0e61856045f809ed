"""Exact NTK diagonal (docs/px.md §7): S_j = θ_j² Σ_n Σ_k (∂f_k(x_n)/∂θ_j)², estimated with Hutchinson probes.

For Rademacher probes u drawn independently per sample and position, E[(∂(uᵀf)/∂θ_j)²] equals the sum over
outputs and samples of the squared derivatives: one backward per batch and probe, no per-sample gradients.
Exact for every operation (softmax, LayerNorm, GELU, Q/K), so it also serves architectures outside the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..targets import is_transformers_model
from .base import (
    Options,
    Scorer,
    ScoringContext,
    all_reduce_sum,
    check_int,
    grads_for,
    model_inputs,
    register_scorer,
)


@dataclass
class NTKDiagOptions(Options):
    """Options of the exact NTK diagonal.

    Args:
        hutchinson_probes: Rademacher probes per batch (more: less variance, one backward each).
    """

    hutchinson_probes: int = 1

    def __post_init__(self) -> None:
        check_int("hutchinson_probes", self.hutchinson_probes, 1, 1000)


def plain_input(batch) -> torch.Tensor:
    """The input tensor of a calibration batch for a plain (non-transformers) network."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0]
    for key in ("x", "input", "inputs", "pixel_values"):
        if key in batch:
            return batch[key]
    raise ValueError("a plain network's calibration batch must be a tensor, an (x, y) pair or a dict with key 'x'.")


def output_mask(model: nn.Module, batch, output: torch.Tensor) -> torch.Tensor | None:
    """Which output positions are real (padding excluded for per-token outputs)."""
    if isinstance(batch, dict) and output.dim() == 3 and "attention_mask" in batch:
        return batch["attention_mask"].to(output.dtype).unsqueeze(-1)
    return None


def accumulate_probe_grads(
    output: torch.Tensor,
    params: list[torch.Tensor],
    acc: list[torch.Tensor],
    probes: int,
    generator: torch.Generator | None,
    mask: torch.Tensor | None = None,
) -> None:
    """Add the probe average of (∂(uᵀ output)/∂θ)² into ``acc`` (one tensor per param)."""
    for p in range(probes):
        u = torch.randint(0, 2, output.shape, generator=generator).to(output.dtype) * 2 - 1
        if mask is not None:
            u = u * mask
        grads = torch.autograd.grad((u * output).sum(), params, retain_graph=p < probes - 1, allow_unused=True)
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a.add_(g.detach().double() ** 2 / probes)


def forward_output(model: nn.Module, batch) -> torch.Tensor:
    if not is_transformers_model(model):
        return model(plain_input(batch))
    out = model(**model_inputs(batch))
    return out.logits if getattr(out, "logits", None) is not None else out[0]


@register_scorer
class NTKDiagScorer(Scorer):
    """NTK diagonal: θ²·Σ(∂f/∂θ)² by Hutchinson probes; exact for any architecture, one global threshold."""

    method = "ntk_diag"
    description = "θ²·Σ_n,k (∂f_k/∂θ)² (exact NTK diagonal, Hutchinson probes); any architecture"
    options_class = NTKDiagOptions
    options: NTKDiagOptions

    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        model = ctx.model
        params = list({id(t.param): t.param for t in ctx.targets}.values())
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        with grads_for(model, params):
            for batch in ctx.batches:
                out = forward_output(model, batch)
                accumulate_probe_grads(out, params, acc, self.options.hutchinson_probes, ctx.generator,
                                       output_mask(model, batch, out))
        by_param = {id(p): all_reduce_sum(a) for p, a in zip(params, acc, strict=True)}
        return {t.key: t.view(by_param[id(t.param)] * t.param.detach().double() ** 2) for t in ctx.targets}
