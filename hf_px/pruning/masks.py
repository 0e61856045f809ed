"""Masks: the density schedule, the global threshold, and applying/deriving masks.

Masks are boolean tensors keyed by parameter name, shaped like the parameter. Pruned weights are zeroed in
place as soon as they are pruned, so the model itself always *is* the masked model: no hooks, nothing to
remove before ``save_pretrained``. ``masks_from_model`` recovers the masks of any checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import torch
from torch import nn

from .ranking import Ranking
from .targets import Target, collect_targets


class DensitySchedule(Sequence[float]):
    """The densities d_r = d^(r/R), r = 1..R, computed on access: the loop needs one round at a time."""

    def __init__(self, target_density: float, rounds: int) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}.")
        self.target_density, self.rounds = float(target_density), rounds

    def __len__(self) -> int:
        return self.rounds

    @overload
    def __getitem__(self, index: int) -> float: ...

    @overload
    def __getitem__(self, index: slice) -> list[float]: ...

    def __getitem__(self, index: int | slice) -> float | list[float]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.rounds))]
        if index < 0:
            index += self.rounds
        if not 0 <= index < self.rounds:
            raise IndexError(f"round {index} is outside 0..{self.rounds - 1}")
        return self.target_density ** ((index + 1) / self.rounds)

    def __repr__(self) -> str:
        return f"DensitySchedule(target_density={self.target_density}, rounds={self.rounds})"


def density_schedule(target_density: float, rounds: int) -> DensitySchedule:
    """Exponential schedule d_r = d^(r/R), r = 1..R (PX, SynFlow); the last entry is the target.

    Example:
        >>> [round(d, 3) for d in density_schedule(0.01, 2)]
        [0.1, 0.01]
    """
    return DensitySchedule(target_density, rounds)


def init_masks(targets: list[Target]) -> dict[str, torch.Tensor]:
    """All-True masks for the parameters of ``targets`` (already-zero weights count as kept)."""
    return {t.param_name: torch.ones_like(t.param, dtype=torch.bool) for t in targets}


def masks_from_model(model: nn.Module, param_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks read back from a checkpoint's zeros (weight != 0).

    With ``param_names=None`` the prunable set of the model's architecture is used.
    """
    if param_names is None:
        param_names = list(dict.fromkeys(t.param_name for t in collect_targets(model, generic=True)))
    params = dict(model.named_parameters())
    return {n: params[n].detach() != 0 for n in param_names}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


def _keep_count(density: float, total: int) -> int:
    # round() keeps the achieved density within half a weight of the target
    return min(total, max(0, int(round(density * total))))


def _topk_mask(scores: torch.Tensor, alive: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` highest scores among alive entries (pruned stay pruned)."""
    flat = torch.where(alive.flatten(), scores.flatten().double(), torch.tensor(-math.inf, dtype=torch.float64))
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    keep = min(keep, int(alive.sum()))
    if keep > 0:
        out[torch.topk(flat, keep, sorted=False).indices] = True
    return out.view_as(alive)


def select_masks(
    targets: list[Target],
    scores: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    density: float,
    min_density_ratio: float = 0.0,
) -> dict[str, torch.Tensor]:
    """New masks at ``density`` over all targets with one global threshold.

    On-path targets share one global ranking. Off-path targets (``on_path=False``, e.g. Q/K under PX) are
    never compared with them: each gets the density its block's reference roles reach at the threshold and
    is ranked within itself. The cut is found by bisection so that the total kept count is exact.
    ``min_density_ratio`` > 0 guards against layer collapse: every on-path matrix keeps at least
    ``min_density_ratio * density`` of its weights (its best-scored ones).
    """
    total = sum(t.numel() for t in targets)
    keep_total = _keep_count(density, total)
    on = [t for t in targets if t.on_path]
    off = [t for t in targets if not t.on_path]
    alive = {t.key: t.view(masks[t.param_name]) for t in targets}
    n_alive = {t.key: int(alive[t.key].sum()) for t in targets}

    # Only alive on-path entries are ranked, in float32 after dividing by the largest score (the order is
    # what matters; scores below float32's range tie at the bottom and go first).
    idx = [torch.nonzero(alive[t.key].flatten()).squeeze(1) for t in on]
    raw = [scores[t.key].flatten()[i].double() for t, i in zip(on, idx, strict=True)]
    top = max((float(r.max()) for r in raw if len(r)), default=1.0)
    scale = top if top > 0 and math.isfinite(top) else 1.0
    vals = []
    for t, r in zip(on, raw, strict=True):
        v = (r / scale).float()
        floor = min(math.ceil(min_density_ratio * density * t.numel()), n_alive[t.key])
        if floor > 0:  # the floor entries rank first, so any cut keeps them
            v[torch.topk(v, floor).indices] = math.inf
        vals.append(v)
    ranking = Ranking(vals)
    n_alive_on = ranking.n

    if off:
        # a target's survivors at cut m are the entries of its group among the top m of the global order
        group_of = {(t.block, t.role): i for i, t in enumerate(on)}
        sizes = [t.numel() for t in on]
        follow_ids = [[group_of[(t.block, r)] for r in t.follows if (t.block, r) in group_of] for t in off]

        def off_counts(kept_per_group: torch.Tensor, m: int) -> list[int]:
            kept = kept_per_group.tolist()
            counts = []
            for t, ids in zip(off, follow_ids, strict=True):
                rho = sum(kept[i] for i in ids) / max(sum(sizes[i] for i in ids), 1) if ids else m / max(n_alive_on, 1)
                counts.append(min(int(round(rho * t.numel())), n_alive[t.key]))
            return counts

        # largest m with m + Σ off_counts(m) <= keep_total
        lo = ranking.largest(lambda kept, m: m + sum(off_counts(kept, m)) <= keep_total)
        counts = off_counts(ranking.counts(lo), lo)
        m_on = min(n_alive_on, keep_total - sum(counts))
    else:
        m_on, counts = min(keep_total, n_alive_on), []

    keep_alive = ranking.top(m_on)
    new = {name: torch.zeros_like(m) for name, m in masks.items()}
    for t, i, kept in zip(on, idx, keep_alive, strict=True):
        flat = torch.zeros(t.numel(), dtype=torch.bool)
        flat[i[kept]] = True
        t.view(new[t.param_name]).copy_(flat.view_as(alive[t.key]))
    for t, k in zip(off, counts, strict=True):
        t.view(new[t.param_name]).copy_(_topk_mask(scores[t.key], alive[t.key], k))
    return new


def density(masks: dict[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept / max(total, 1)
