"""Scoring methods, one class each, registered by their ``method`` name with their options class."""

from . import basic, grasp, ntk_diag, px, snip, synflow, wanda  # noqa: F401  (registration side effects)
from .base import (
    SCORERS,
    Options,
    Scorer,
    ScoringContext,
    available_methods,
    get_scorer,
    method_options,
    register_scorer,
)
from .grasp import GraspOptions
from .ntk_diag import NTKDiagOptions
from .px import PXOptions
from .synflow import SynflowOptions
from .wanda import WandaOptions

__all__ = ["SCORERS", "GraspOptions", "NTKDiagOptions", "Options", "PXOptions", "Scorer", "ScoringContext",
           "SynflowOptions", "WandaOptions", "available_methods", "get_scorer", "method_options", "register_scorer"]
