"""Gradual pruning during fine-tuning: re-score every few steps and tighten the masks on a cubic schedule.

One-shot pruning removes every weight before the model has adapted to the task. Gradual magnitude pruning
(Zhu & Gupta, 2017) and oBERT instead raise the sparsity while training, from ``s_i`` to ``s_f`` between steps
``t_0`` and ``t_e``:

    s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_e - t_0)) ** 3

so most weights go early, while the network can still recover, and the last few go slowly. At every pruning step
hf_px scores the current (partly trained) weights with any registered method, PX included, on a few fixed
calibration batches and applies one global threshold, exactly as :func:`hf_px.prune` does in one round. Pruned
weights stay pruned; after ``t_e`` the masks are final and training goes on with them held fixed.

Example:
    >>> from hf_px import GradualConfig, PruneConfig
    >>> cfg = GradualConfig(prune=PruneConfig(method="magnitude", sparsity=0.8), every=10, end=0.5)
    >>> [(step, round(s, 3)) for step, s in cfg.schedule(total_steps=40)]
    [(0, 0.0), (10, 0.7), (20, 0.8)]
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import PruneConfig, _finite, short_repr
from ..errors import ConfigError
from .data import EXAMPLE_ID


@dataclass
class GradualConfig:
    """How to prune while fine-tuning (``FinetuneConfig(gradual=...)``).

    Args:
        prune: the method, its options, the final sparsity and the layer-collapse floor (``rounds`` is not used:
            each pruning step is one round). ``None`` leaves it to be filled in later: ``hf-px run`` passes its
            ``prune`` section.
        initial_sparsity: the sparsity of the first pruning step, in [0, final). Weights the model already has
            pruned stay pruned, so a model pruned one-shot to 50% can continue from ``initial_sparsity=0.5``.
        start: fraction of the training steps before the first pruning step, in [0, 1).
        end: fraction of the training steps at which the final sparsity is reached, in [start, 1]; the steps
            after it fine-tune with the final masks (oBERT and GMP leave a third or more for this).
        every: optimizer steps between pruning steps (>= 1).
        calibration_batches: training batches scored at every pruning step when ``finetune`` gets no
            ``calibration`` batches (a fixed, seeded draw, the same on every process).

    Example:
        >>> GradualConfig(prune=PruneConfig(sparsity=0.9)).end
        0.7
    """

    prune: PruneConfig | None = field(default_factory=PruneConfig)
    initial_sparsity: float = 0.0
    start: float = 0.0
    end: float = 0.7
    every: int = 10
    calibration_batches: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.prune, dict):
            self.prune = PruneConfig(**self.prune)
        if self.prune is not None and not isinstance(self.prune, PruneConfig):
            raise TypeError(f"GradualConfig.prune must be a PruneConfig, got {type(self.prune).__name__}.")
        final = float(self.prune.sparsity) if self.prune is not None else 1.0
        if not _finite(self.initial_sparsity) or not 0.0 <= self.initial_sparsity < max(final, 1e-12):
            raise ValueError(f"initial_sparsity must be in [0, {final:g}) (below the final prune.sparsity), got "
                             f"{short_repr(self.initial_sparsity)}.")
        if not _finite(self.start) or not 0.0 <= self.start < 1.0:
            raise ValueError(f"start must be a fraction of the training steps in [0, 1), got {short_repr(self.start)}.")
        if not _finite(self.end) or not self.start <= self.end <= 1.0:
            raise ValueError(f"end must be a fraction of the training steps in [start={self.start:g}, 1], got "
                             f"{short_repr(self.end)}.")
        for name in ("every", "calibration_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {short_repr(value)}.")

    def schedule(self, total_steps: int) -> list[tuple[int, float]]:
        """(optimizer step, sparsity) of every pruning step; step 0 is before the first update."""
        if self.prune is None:
            raise ConfigError("GradualConfig.prune is not set: give the PruneConfig with the final sparsity.")
        t0 = int(round(self.start * total_steps))
        te = max(t0, int(round(self.end * total_steps)))
        steps = list(range(t0, te, self.every)) + [te]
        final, initial = float(self.prune.sparsity), float(self.initial_sparsity)
        span = max(te - t0, 1)
        return [(t, final + (initial - final) * (1.0 - (t - t0) / span) ** 3 if te > t0 else final) for t in steps]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prune"] = self.prune.to_dict() if self.prune is not None else None
        return out


class GradualPruner:
    """Applies a :class:`GradualConfig` inside the training loop (built by :func:`hf_px.finetune`)."""

    def __init__(self, config: GradualConfig, model: nn.Module, masks: dict[str, torch.Tensor],
                 batches: list[dict[str, torch.Tensor]], total_steps: int) -> None:
        from ..pruning.loop import check_sparsity
        from ..pruning.scoring import ScoringContext, get_scorer
        from ..pruning.targets import collect_targets

        self.config = config
        if config.prune is None:
            raise ConfigError("GradualConfig.prune is not set: give the PruneConfig with the final sparsity.")
        pc = config.prune
        self.scorer = get_scorer(pc.method, pc.options)
        if self.scorer.needs_data and not batches:
            raise ConfigError("gradual pruning needs calibration batches: pass finetune(..., calibration=batches) or "
                              "a non-empty training set.")
        targets = collect_targets(model, generic=pc.generic)
        if not self.scorer.uses_off_path:
            targets = [dataclasses.replace(t, on_path=True, follows=()) for t in targets]
        check_sparsity(pc.sparsity, [t.numel() for t in targets])
        for t in targets:  # a weight the model was given unmasked starts alive
            masks.setdefault(t.param_name, torch.ones_like(t.param, dtype=torch.bool, device="cpu"))
        self.targets, self.masks = targets, masks
        self.events = dict(config.schedule(total_steps))
        self.ctx = ScoringContext(model=model, targets=targets, masks=masks, batches=batches, config=pc,
                                  generator=torch.Generator().manual_seed(pc.seed))
        self.scorer.prepare(self.ctx)
        self.records: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        return step in self.events

    @torch.no_grad()
    def prune_step(self, step: int) -> dict[str, Any]:
        """Score the current weights, shrink the masks to this step's density (in place) and return a record."""
        from ..pruning.masks import select_masks

        t0 = time.perf_counter()
        sparsity = self.events[step]
        self.ctx.round += 1
        self.ctx.masks = self.masks
        scores = self.scorer.score(self.ctx)
        new = select_masks(self.targets, scores, self.masks, 1.0 - sparsity, self.config.prune.min_density_ratio,
                           keep_rule=self.config.prune.keep_rule)
        _broadcast(new)  # every process holds the same masks, whatever its floating-point history
        for name, mask in new.items():
            self.masks[name].copy_(mask.cpu() & self.masks[name])
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        record = {"step": step, "event": "prune", "target_sparsity": sparsity,
                  "sparsity": 1.0 - kept / max(total, 1), "prune_s": time.perf_counter() - t0}
        self.records.append(record)
        return record


def _broadcast(masks: dict[str, torch.Tensor]) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for name in sorted(masks):
        as_bytes = masks[name].to(torch.uint8)
        dist.broadcast(as_bytes, src=0)
        masks[name] = as_bytes.bool()


def calibration_from(train_ds: Any, collate: Any, count: int, batch_size: int, seed: int) -> list[dict]:
    """``count`` seeded training batches without labels, drawn apart from the training order (same on every rank)."""
    loader = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed + 1))
    out = []
    for batch in loader:
        out.append({k: v for k, v in batch.items() if k not in ("labels", EXAMPLE_ID) and torch.is_tensor(v)})
        if len(out) >= count:
            break
    return out
