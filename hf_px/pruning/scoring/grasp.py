"""GraSP (Wang et al. 2020), as in the official code: S = θ⊙Hg / (|Σ θ⊙Hg| + 1e-10), the largest kept.

g = Σ_batches ∇L (logits / 200, no graph); then for each batch ∇(gᵀ∇L) = Hg by double backward. The paper's
score is S(−θ) = −θ⊙Hg with the *largest* removed; we return its negation +θ⊙Hg so that, like every scorer,
higher = keep (the same masks). Scores are signed: a weight whose removal would raise the gradient norm keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Options, Scorer, ScoringContext, all_reduce_sum, check_positive, register_scorer
from .snip import grads_for, summed_grads, task_loss, unique_params


@dataclass
class GraspOptions(Options):
    """GraSP's options.

    Args:
        temperature: the logits are divided by it before the loss (the official code's 200).
    """

    temperature: float = 200.0

    def __post_init__(self) -> None:
        check_positive("temperature", self.temperature)


@register_scorer
class GraSPScorer(Scorer):
    """GraSP: θ⊙Hg (Hessian-gradient product by double backward, logits/200), normalised; higher = keep."""

    method = "grasp"
    description = "θ⊙Hg, gradient-flow preservation (GraSP, Wang et al. 2020); needs labels"
    options_class = GraspOptions
    options: GraspOptions

    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        temperature = float(self.options.temperature)
        params = unique_params(ctx)
        g = [x.to(p.dtype) for x, p in zip(summed_grads(ctx, params, temperature), params, strict=True)]
        hg = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        # the fused CPU/flash SDPA kernels have no double backward; the math kernel does (same values)
        with grads_for(ctx.model, params), sdpa_kernel(SDPBackend.MATH):
            for batch in ctx.batches:
                grads = torch.autograd.grad(task_loss(ctx.model, batch, temperature), params, create_graph=True,
                                            allow_unused=True)
                z = sum((gi * gf).sum() for gi, gf in zip(g, grads, strict=True) if gf is not None)
                if not torch.is_tensor(z) or not z.requires_grad:
                    continue  # no target on the loss path: Hg is zero
                for acc, h in zip(hg, torch.autograd.grad(z, params, allow_unused=True), strict=True):
                    if h is not None:
                        acc.add_(h.detach().double())
        raw = {id(p): p.detach().double() * all_reduce_sum(h) for p, h in zip(params, hg, strict=True)}
        norm = abs(sum(float(s.sum()) for s in raw.values())) + 1e-10
        return {t.key: t.view(raw[id(t.param)]) / norm for t in ctx.targets}
