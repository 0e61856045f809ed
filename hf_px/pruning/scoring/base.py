"""The scoring interface: one small class per method, found by its ``method`` name.

A scorer turns (model, targets, current masks, calibration batches) into one score tensor per target; the
iterative schedule, the global threshold and the masks live in :mod:`hf_px.pruning.loop` and :mod:`hf_px.pruning.masks`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ...config import short_repr
from ..targets import Target

if TYPE_CHECKING:  # hf_px.config validates PruneConfig.method against this registry: config -> scoring only
    from ...config import PruneConfig

SCORERS: dict[str, type[Scorer]] = {}


@dataclass
class Options:
    """A method's own settings (``PruneConfig.options``); this base class is the empty set of a method without any.

    Subclasses are dataclasses whose ``__post_init__`` validates every field, documented in an ``Args:`` block
    (``hf-px run --help`` shows it for ``prune.options.KEY``).
    """

    @classmethod
    def coerce(cls, value: Options | Mapping[str, Any] | None, method: str) -> Options:
        """``value`` as this class: None gives the defaults, a mapping its fields; other keys name the valid ones."""
        if value is None:
            return cls()
        if type(value) is cls or (cls is not Options and isinstance(value, cls)):
            return value
        if isinstance(value, Options):
            raise TypeError(f"{method} takes {cls.__name__} options, got {type(value).__name__}.")
        if not isinstance(value, Mapping):
            raise TypeError(f"options for {method} must be a {cls.__name__} or a dict, got {short_repr(value)}.")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in value if k not in names]
        if unknown:
            valid = ", ".join(names) if names else "none (it takes no options)"
            raise ValueError(f"unknown {method} option {short_repr(unknown[0])}; valid: {valid}.")
        return cls(**value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {short_repr(value)}.")


def check_int(name: str, value: Any, low: int, high: int | None = None, none: str | None = None) -> None:
    """An integer in [low, high]; ``none`` describes what None means where None is allowed."""
    if value is None and none is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bounds}" + (f" or None ({none})" if none else "")
                         + f", got {short_repr(value)}.")


def check_positive(name: str, value: Any, none: str | None = None) -> None:
    if value is None and none is not None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0" + (f" or None ({none})" if none else "")
                         + f", got {short_repr(value)}.")


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make ``cls`` available as ``PruneConfig(method=cls.method)``, with ``cls.options_class``."""
    SCORERS[cls.method] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(SCORERS)


def _scorer_class(method: str) -> type[Scorer]:
    try:
        return SCORERS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pruning method {short_repr(method)}; choose one of "
                         f"{', '.join(available_methods())}.") from None


def method_options(method: str, value: Options | Mapping[str, Any] | None = None) -> Options:
    """``value`` converted to ``method``'s options class (None: its defaults)."""
    return _scorer_class(method).options_class.coerce(value, method)


def get_scorer(method: str, options: Options | Mapping[str, Any] | None = None) -> Scorer:
    """A fresh scorer for ``method`` built with its options (a dict is converted; None: the defaults)."""
    return _scorer_class(method)(options)


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

    ``options_class``: the method's :class:`Options`, held as ``self.options``; ``uses_off_path``: whether targets
    flagged off-path (Q/K under PX) keep their own per-block ranking.
    """

    method: ClassVar[str]
    description: ClassVar[str]
    options_class: ClassVar[type[Options]] = Options
    uses_off_path: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True

    def __init__(self, options: Options | Mapping[str, Any] | None = None) -> None:
        self.options = self.options_class.coerce(options, self.method)

    def prepare(self, ctx: ScoringContext) -> None:  # noqa: B027 - optional hook
        """Called once before the first round."""

    @abstractmethod
    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Return {target.key: scores shaped like target.view(target.param)}."""
