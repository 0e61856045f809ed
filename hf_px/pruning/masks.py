"""Masks: the density schedule, the global threshold, and applying/deriving masks.

Masks are boolean tensors keyed by parameter name, shaped like the parameter. Pruned weights are zeroed in
place as soon as they are pruned, so the model itself always *is* the masked model: no hooks, nothing to
remove before ``save_pretrained``. ``masks_from_model`` recovers the masks of any checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import nn

from .ranking import Ranking, ShardedRanking, all_reduce, sharded_topk
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


KEEP_RULES = ("exact", "reference")


def check_keep_rule(keep_rule: str) -> None:
    if keep_rule not in KEEP_RULES:
        raise ValueError(f"keep_rule must be 'exact' (keep round(density * N), ties broken by position) or "
                         f"'reference' (prune int((1 - density) * N) and every weight tied with the threshold, as "
                         f"the reference PX code does), got {keep_rule!r}.")


def _keep_count(density: float, total: int, keep_rule: str = "exact") -> int:
    if keep_rule == "reference":
        # the reference code prunes int((1 - d) * N) by this very float expression; the same expression gives the
        # same count even where (1 - d) * N lands a rounding error below an integer
        return total - min(total, max(0, int((1.0 - density) * total)))
    # round() keeps the achieved density within half a weight of the target
    return min(total, max(0, int(round(density * total))))


def _drop_threshold_ties(values: list[torch.Tensor], keep: list[torch.Tensor], n_dead: int,
                         pruned: int) -> list[torch.Tensor]:
    """``keep`` less every entry that does not score above the ``pruned``-th smallest score (the reference rule).

    The threshold is taken over all entries, the dead ones at score 0 (what the reference's θ-proportional
    scores give a pruned weight), so a cut that falls among them still prunes live weights scoring 0; dead
    entries never come back. Entries forced in by the layer-collapse floor (+inf) always stay.
    """
    if pruned < 1:  # the reference leaves the masks alone when it would prune nothing
        return keep
    every = torch.cat([*values, torch.zeros(n_dead, dtype=torch.float32)])
    tau = torch.kthvalue(every, min(pruned, every.numel())).values
    return [k & ((v > tau) | (v == math.inf)) for v, k in zip(values, keep, strict=True)]


def _topk_mask(scores: torch.Tensor, alive: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` highest scores among alive entries (pruned stay pruned)."""
    flat = torch.where(alive.flatten(), scores.flatten().double(), torch.tensor(-math.inf, dtype=torch.float64))
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    keep = min(keep, int(alive.sum()))
    if keep > 0:
        out[torch.topk(flat, keep, sorted=False).indices] = True
    return out.view_as(alive)


def _scale(top: float) -> float:
    """The divisor that brings the largest alive on-path score to 1 before the float32 ranking."""
    return top if top > 0 and math.isfinite(top) else 1.0


def _floor_count(t: Target, min_density_ratio: float, density: float, n_alive: int) -> int:
    """The layer-collapse floor: how many of ``t``'s best alive entries rank ahead of every cut."""
    return min(math.ceil(min_density_ratio * density * t.numel()), n_alive)


def _cut(on: list[Target], off: list[Target], n_alive: dict[str, int], ranking: Ranking,
         keep_total: int) -> tuple[int, list[int]]:
    """(m_on, off-path counts): how many on-path entries the global cut keeps, and how many each off-path
    target keeps (its block's reference roles' density at that cut), totalling at most ``keep_total``."""
    n_alive_on = ranking.n
    if not off:
        return min(keep_total, n_alive_on), []
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
    return min(n_alive_on, keep_total - sum(counts)), counts


def select_masks(
    targets: list[Target],
    scores: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    density: float,
    min_density_ratio: float = 0.0,
    keep_rule: str = "exact",
) -> dict[str, torch.Tensor]:
    """New masks at ``density`` over all targets with one global threshold.

    On-path targets share one global ranking. Off-path targets (``on_path=False``, e.g. Q/K under PX) are
    never compared with them: each gets the density its block's reference roles reach at the threshold and
    is ranked within itself. The cut is found by bisection so that the total kept count is exact.
    ``min_density_ratio`` > 0 guards against layer collapse: every on-path matrix keeps at least
    ``min_density_ratio * density`` of its weights (its best-scored ones).

    ``keep_rule="exact"`` keeps exactly ``round(density * N)`` (ties at the cut broken by matrix order, then
    position); ``"reference"`` prunes ``int((1 - density) * N)`` and every on-path weight whose score equals
    the threshold, so ties all go and fewer may be kept (docs/px.md §3). Ties are equal float32 values of the
    scores divided by their maximum, the precision the ranking uses.
    """
    check_keep_rule(keep_rule)
    total = sum(t.numel() for t in targets)
    keep_total = _keep_count(density, total, keep_rule)
    on = [t for t in targets if t.on_path]
    off = [t for t in targets if not t.on_path]
    alive = {t.key: t.view(masks[t.param_name]) for t in targets}
    n_alive = {t.key: int(alive[t.key].sum()) for t in targets}

    # Only alive on-path entries are ranked, in float32 after dividing by the largest score (the order is
    # what matters; scores below float32's range tie at the bottom and go first). One target's float64 copy
    # exists at a time, and boolean masks stand in for int64 indices (peak memory, scripts/bench_px_memory.py).
    alive_flat = [alive[t.key].flatten() for t in on]
    top = max((float(scores[t.key].flatten()[a].max()) for t, a in zip(on, alive_flat, strict=True)
               if n_alive[t.key]), default=1.0)
    scale = _scale(top)
    vals = []
    for t, a in zip(on, alive_flat, strict=True):
        v = (scores[t.key].flatten()[a].double() / scale).float()
        floor = _floor_count(t, min_density_ratio, density, n_alive[t.key])
        if floor > 0:  # the floor entries rank first, so any cut keeps them
            v[torch.topk(v, floor).indices] = math.inf
        vals.append(v)
    ranking = Ranking(vals)
    n_alive_on = ranking.n
    m_on, counts = _cut(on, off, n_alive, ranking, keep_total)

    keep_alive = ranking.top(m_on)
    if keep_rule == "reference":
        # without off-path targets this is the reference's own cut; with them, the on-path cut of the search
        n_on = sum(t.numel() for t in on)
        keep_on = m_on if off else keep_total
        keep_alive = _drop_threshold_ties(vals, keep_alive, n_on - n_alive_on, n_on - keep_on)
    new = {name: torch.zeros_like(m) for name, m in masks.items()}
    for t, a, kept in zip(on, alive_flat, keep_alive, strict=True):
        flat = torch.zeros(t.numel(), dtype=torch.bool)
        flat[a] = kept
        t.view(new[t.param_name]).copy_(flat.view_as(alive[t.key]))
    for t, k in zip(off, counts, strict=True):
        t.view(new[t.param_name]).copy_(_topk_mask(scores[t.key], alive[t.key], k))
    return new


@dataclass(frozen=True)
class ScoreShard:
    """One process's part of one target's scores, for :func:`select_masks_sharded`.

    Args:
        start: where the part begins in the target's flattened order (``target.view(param).flatten()``).
        scores: the part's scores, 1-D, any float dtype.
        alive: the part's current mask, 1-D bool of the same length (pruned entries stay pruned).
    """

    start: int
    scores: torch.Tensor
    alive: torch.Tensor


def select_masks_sharded(
    targets: list[Target],
    shards: dict[str, ScoreShard],
    density: float,
    min_density_ratio: float = 0.0,
    keep_rule: str = "exact",
    group=None,
) -> dict[str, torch.Tensor]:
    """:func:`select_masks` over scores spread across processes: the same masks, and no score leaves its process.

    Every process of ``group`` (default: the whole ``torch.distributed`` world) calls it at once with the same
    ``targets`` and its own ``shards``: target key → this process's :class:`ScoreShard` of it (a target it
    holds no part of is left out). A process may hold whole targets, a contiguous piece of each, or a mix;
    together the pieces must cover every entry of every target exactly once. Returns this process's piece of
    every new mask it holds a part of: target key → 1-D bool, aligned with its shard.

    Only counts cross processes: the bucket histograms of the global ranking (:class:`ShardedRanking`) and the
    per-target alive counts that the layer-collapse floor and the off-path rule need. So the cut, the tie-
    breaking (matrix order, then position) and the kept count are those of :func:`select_masks` on all scores
    at once. The one exception is a target split across processes whose own top-k (floor or off-path count)
    ends inside a run of equal scores: which of them ``torch.topk`` keeps follows no rule that pieces can
    reproduce, so that target's scores are gathered (see :func:`~hf_px.pruning.ranking.sharded_topk`).
    ``keep_rule="reference"`` needs every score in one place and is refused.
    """
    check_keep_rule(keep_rule)
    if keep_rule != "exact":
        raise ValueError("select_masks_sharded supports keep_rule='exact' only: the reference rule's threshold "
                         "ties need every score on one process; gather the scores and call select_masks.")
    empty = ScoreShard(0, torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    part = {t.key: shards.get(t.key, empty) for t in targets}
    unknown = set(shards) - set(part)
    if unknown:
        raise ValueError(f"shards for targets that are not in the list: {sorted(unknown)[:3]}")
    for key, p in part.items():
        if p.scores.dim() != 1 or p.alive.shape != p.scores.shape or p.alive.dtype != torch.bool:
            raise ValueError(f"shard of {key}: scores must be 1-D and alive a bool tensor of the same length.")
    counts_here = torch.tensor([[len(part[t.key].scores), int(part[t.key].alive.sum())] for t in targets],
                               dtype=torch.long).view(-1, 2)
    held, alive_all = all_reduce(counts_here, group).unbind(1)
    for t, n in zip(targets, held.tolist(), strict=True):
        if n != t.numel():  # the same sums on every process: all of them raise
            raise ValueError(f"the shards of {t.key} hold {n} entries over all processes, not its {t.numel()}: "
                             "every entry of every target must be on exactly one process.")
    n_alive = {t.key: int(n) for t, n in zip(targets, alive_all.tolist(), strict=True)}
    total = sum(t.numel() for t in targets)
    keep_total = _keep_count(density, total, keep_rule)
    on = [t for t in targets if t.on_path]
    off = [t for t in targets if not t.on_path]

    # the same float32 values as select_masks, with the largest score taken over every process
    maxima = [float(part[t.key].scores[part[t.key].alive].max()) for t in on if int(part[t.key].alive.sum())]
    top = float(all_reduce(torch.tensor([max(maxima, default=-math.inf)], dtype=torch.float64), group, op="max"))
    scale = _scale(top if top > -math.inf else 1.0)
    vals = [(part[t.key].scores[part[t.key].alive].double() / scale).float() for t in on]
    starts = [part[t.key].start for t in on]
    floors = [_floor_count(t, min_density_ratio, density, n_alive[t.key]) for t in on]

    def topk_of(ks: list[int], sorted_: bool = True):
        def exact(g: int, whole: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(whole), dtype=torch.bool)
            out[torch.topk(whole, ks[g], sorted=sorted_).indices] = True
            return out

        return exact

    for v, first in zip(vals, sharded_topk(vals, floors, starts, topk_of(floors), group), strict=True):
        v[first] = math.inf  # the floor entries rank first, so any cut keeps them
    ranking = ShardedRanking(vals, starts, group)
    m_on, counts = _cut(on, off, n_alive, ranking, keep_total)

    new = {}
    for t, kept in zip(on, ranking.top(m_on), strict=True):
        flat = torch.zeros(len(part[t.key].alive), dtype=torch.bool)
        flat[part[t.key].alive] = kept
        new[t.key] = flat
    # off-path targets: their own top-k among alive entries, as select_masks' _topk_mask does
    ninf = torch.tensor(-math.inf, dtype=torch.float64)
    flats = [torch.where(part[t.key].alive, part[t.key].scores.double(), ninf) for t in off]
    kept_off = sharded_topk(flats, counts, [part[t.key].start for t in off], topk_of(counts, sorted_=False), group)
    for t, kept in zip(off, kept_off, strict=True):
        new[t.key] = kept
    return {key: m for key, m in new.items() if key in shards}


def density(masks: dict[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept / max(total, 1)
