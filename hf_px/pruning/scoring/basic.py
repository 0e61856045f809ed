"""Data-free baselines."""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext, register_scorer


@register_scorer
class RandomScorer(Scorer):
    """Random: i.i.d. Gaussian scores (a sanity floor)."""

    method = "random"
    description = "i.i.d. Gaussian scores; a sanity floor"
    needs_data = False

    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        return {t.key: torch.randn(t.view(t.param).shape, generator=ctx.generator) for t in ctx.targets}


@register_scorer
class MagnitudeScorer(Scorer):
    """Magnitude: |θ|, global threshold."""

    method = "magnitude"
    description = "|weight|, one global threshold"
    needs_data = False

    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        return {t.key: t.view(t.param).detach().abs().float() for t in ctx.targets}
