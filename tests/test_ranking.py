"""The bucketed global ranking (hf_px.pruning.ranking) against full sorts, and the new threshold against the old one."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny

from hf_px.pruning.masks import _keep_count, _topk_mask, init_masks, select_masks
from hf_px.pruning.ranking import Ranking
from hf_px.pruning.targets import Target, collect_targets


def _groups(seed: int, ties: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [50, 1, 300, 0, 128]
    out = []
    for n in sizes:
        v = torch.randn(n, generator=g) * torch.logspace(-30, 30, max(n, 1))[:n]  # signs and huge range
        if ties:
            v = torch.round(v.clamp(-3, 3))  # a handful of distinct values
        out.append(v.float())
    out[2][:3] = math.inf  # the layer-collapse floor ranks first
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_top_m_matches_a_full_sort(ties):
    vals = _groups(0, ties)
    r = Ranking(vals)
    flat = torch.cat(vals)
    assert r.n == flat.numel()
    for m in [0, 1, 2, 3, 7, 100, 250, r.n - 1, r.n]:
        keep = torch.cat(r.top(m))
        assert int(keep.sum()) == m
        if 0 < m < r.n:  # nothing dropped ranks above anything kept
            assert float(flat[keep].min()) >= float(flat[~keep].max())
        if not ties:
            ref = torch.zeros_like(keep)
            ref[torch.argsort(flat, descending=True)[:m]] = True
            assert torch.equal(keep, ref)
        per_group = torch.tensor([int(k.sum()) for k in r.top(m)])
        assert torch.equal(r.counts(m), per_group)


def test_largest_matches_brute_force():
    vals = _groups(1)
    r = Ranking(vals)
    for budget in [0, 5, 77, 200, 479]:
        # a monotone rule of the kind select_masks uses: m plus a share driven by group 2's survivors
        def ok(kept, m, budget=budget):
            return m + int(round(0.5 * int(kept[2]))) <= budget
        brute = max(m for m in range(r.n + 1) if ok(r.counts(m), m))
        assert r.largest(ok) == brute


# The previous select_masks (one argsort of every alive score), kept as the reference for the bucketed one.
def _reference_select_masks(
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

    # Only alive on-path entries are ranked. They are sorted once, in float32 after dividing by the largest
    # score (the order is what matters; scores below float32's range tie at the bottom and go first).
    idx = [torch.nonzero(alive[t.key].flatten()).squeeze(1) for t in on]
    raw = [scores[t.key].flatten()[i].double() for t, i in zip(on, idx, strict=True)]
    top = max((float(r.max()) for r in raw if len(r)), default=1.0)
    scale = top if top > 0 and math.isfinite(top) else 1.0
    vals = []
    for t, r in zip(on, raw, strict=True):
        v = (r / scale).float()
        floor = min(math.ceil(min_density_ratio * density * t.numel()), n_alive[t.key])
        if floor > 0:  # the floor entries sort first, so any cut keeps them
            v[torch.topk(v, floor).indices] = math.inf
        vals.append(v)
    order = torch.argsort(torch.cat(vals), descending=True)
    n_alive_on = len(order)

    if off:
        # a target's survivors at cut m are the entries of its group among the first m of the global order
        group_of = {(t.block, t.role): i for i, t in enumerate(on)}
        group_in_order = torch.cat([torch.full((len(i),), g, dtype=torch.int16) for g, i in enumerate(idx)])[order]
        positions = [torch.nonzero(group_in_order == g).squeeze(1) for g in range(len(on))]  # ascending
        sizes = [t.numel() for t in on]
        follow_ids = [[group_of[(t.block, r)] for r in t.follows if (t.block, r) in group_of] for t in off]

        def off_counts(m: int) -> list[int]:
            kept = [int(torch.searchsorted(p, m)) for p in positions]
            counts = []
            for t, ids in zip(off, follow_ids, strict=True):
                rho = sum(kept[i] for i in ids) / max(sum(sizes[i] for i in ids), 1) if ids else m / max(n_alive_on, 1)
                counts.append(min(int(round(rho * t.numel())), n_alive[t.key]))
            return counts

        lo, hi = 0, n_alive_on  # largest m with m + Σ off_counts(m) <= keep_total
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid + sum(off_counts(mid)) <= keep_total:
                lo = mid
            else:
                hi = mid - 1
        counts = off_counts(lo)
        m_on = min(n_alive_on, keep_total - sum(counts))
    else:
        m_on, counts = min(keep_total, n_alive_on), []

    keep_alive = torch.zeros(n_alive_on, dtype=torch.bool)
    keep_alive[order[:m_on]] = True
    new = {name: torch.zeros_like(m) for name, m in masks.items()}
    for t, i, kept in zip(on, idx, torch.split(keep_alive, [len(i) for i in idx]), strict=True):
        flat = torch.zeros(t.numel(), dtype=torch.bool)
        flat[i[kept]] = True
        t.view(new[t.param_name]).copy_(flat.view_as(alive[t.key]))
    for t, k in zip(off, counts, strict=True):
        t.view(new[t.param_name]).copy_(_topk_mask(scores[t.key], alive[t.key], k))
    return new



@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_select_masks_equals_the_sorting_implementation(family, ratio):
    model = tiny(family)
    targets = collect_targets(model)
    g = torch.Generator().manual_seed(3)
    scores = {t.key: torch.rand(t.view(t.param).shape, generator=g, dtype=torch.float64) ** 4 for t in targets}
    new = old = init_masks(targets)
    for d in (0.7, 0.4, 0.1, 0.03):
        new = select_masks(targets, scores, new, d, ratio)
        old = _reference_select_masks(targets, scores, old, d, ratio)
        assert new.keys() == old.keys()
        for name in new:
            assert torch.equal(new[name], old[name]), (family, d, name)
        total = sum(t.numel() for t in targets)
        assert sum(int(m.sum()) for m in new.values()) == _keep_count(d, total)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_full_floor_prunes_every_matrix_to_the_same_density(family):
    """min_density_ratio=1: the floors use the whole budget, so each matrix keeps the round's density (its own
    best-scored weights), however differently the matrices' scores are scaled."""
    model = tiny(family)
    targets = collect_targets(model)
    g = torch.Generator().manual_seed(5)
    scores = {t.key: torch.rand(t.view(t.param).shape, generator=g, dtype=torch.float64) * 10.0 ** (3 * i)
              for i, t in enumerate(targets)}  # a global threshold alone would keep only the last matrices
    masks = init_masks(targets)
    slack = len(targets)  # each floor is rounded up, so the cut may take up to one entry per matrix back
    for d in (0.5, 0.2):
        fresh = select_masks(targets, scores, init_masks(targets), d, 1.0)
        masks = select_masks(targets, scores, masks, d, 1.0)  # the same from the previous round's masks
        for t in targets:
            for m in (fresh, masks):
                assert abs(int(t.view(m[t.param_name]).sum()) - d * t.numel()) <= slack, (t.key, d)
            if t.on_path:  # what a fresh round keeps are the matrix's own top scores, but for the rounding
                kept = t.view(fresh[t.param_name]).flatten()  # entries given back (floored ties go by position)
                best = torch.topk(scores[t.key].flatten(), int(kept.sum())).indices
                assert int((~kept[best]).sum()) <= slack, (t.key, d)
    glob = select_masks(targets, scores, init_masks(targets), 0.2, 0.0)
    assert int(targets[0].view(glob[targets[0].param_name]).sum()) < 0.2 * targets[0].numel() / 2
