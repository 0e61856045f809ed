"""The scoring interface: one small class per method, found by its ``method`` name.

A scorer turns (model, targets, current masks, calibration batches) into one score tensor per target; the
iterative schedule, the global threshold and the masks live in :mod:`hf_px.pruning.loop` and :mod:`hf_px.pruning.masks`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..targets import Target

if TYPE_CHECKING:  # hf_px.config validates PruneConfig.method against this registry: config -> scoring only
    from ...config import PruneConfig

SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make ``cls`` available as ``PruneConfig(method=cls.method)``."""
    SCORERS[cls.method] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(SCORERS)


def get_scorer(method: str) -> Scorer:
    try:
        return SCORERS[method]()
    except KeyError:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(available_methods())}.") from None


def model_inputs(batch: dict) -> dict:
    """The model's forward arguments from a calibration batch (labels are never used for scoring)."""
    return {k: v for k, v in batch.items() if k != "labels"}


_LOCAL_ONLY = [False]


@contextmanager
def local_scoring() -> Iterator[None]:
    """Score with this process's batches only, even under torch.distributed (one process prunes, others wait)."""
    before = _LOCAL_ONLY[0]
    _LOCAL_ONLY[0] = True
    try:
        yield
    finally:
        _LOCAL_ONLY[0] = before


def _sharded() -> bool:
    return not _LOCAL_ONLY[0] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes when torch.distributed is running (calibration sharded across ranks)."""
    if _sharded():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@contextmanager
def grads_for(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Only ``params`` require grad inside the block (no backward into embeddings and heads); restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over processes when torch.distributed is running."""
    if _sharded():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@dataclass
class ScoringContext:
    model: nn.Module
    targets: list[Target]
    masks: dict[str, torch.Tensor]
    batches: list[dict]
    config: PruneConfig
    round: int = 0
    generator: torch.Generator | None = None


class Scorer(ABC):
    """Score every prunable target; higher means keep.

    ``uses_off_path``: whether targets flagged off-path (Q/K under PX) keep their own per-block ranking.
    """

    method: ClassVar[str]
    description: ClassVar[str]
    uses_off_path: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True

    def prepare(self, ctx: ScoringContext) -> None:  # noqa: B027 - optional hook
        """Called once before the first round."""

    @abstractmethod
    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Return {target.key: scores shaped like target.view(target.param)}."""
