"""Scoring methods, one class each, registered by their ``method`` name."""

from . import basic, grasp, ntk_diag, px, snip, synflow, wanda  # noqa: F401  (registration side effects)
from .base import SCORERS, Scorer, ScoringContext, available_methods, get_scorer, register_scorer

__all__ = ["SCORERS", "Scorer", "ScoringContext", "available_methods", "get_scorer", "register_scorer"]
