"""The global ranking behind the pruning threshold, without sorting every score.

Scores (float32) are bucketed by the top 16 bits of their order-preserving integer key: one pass and a
histogram per matrix give, for any bucket, how many entries of each matrix lie above it. Only the entries of the
one bucket that a cut falls into are ever sorted. The selected set is the same as a full descending sort would
give (ties at the cut are broken by matrix order, then by position).

Why not ``torch.kthvalue``/``topk``: one cut is one kthvalue, but PX's off-path Q/K take the density their
block's V/O reach at the cut, so ``select_masks`` searches for the cut, and every probe needs each matrix's
count above it. The histograms answer a probe in O(matrices); kthvalue pays a pass over every score per probe.
``scripts/bench_threshold.py`` (results/threshold.json; MiniLM's 10,616,832 scores, floor 0.1, one thread, same
masks in every variant) measured, in seconds per select_masks, buckets / kthvalue / topk / full sort:
all on-path 0.66 / 0.74 / 1.04 / 2.30 at density 0.5 and 0.43 / 0.60 / 0.65 / 2.13 at 0.1; PX's Q/K rule
0.45 / 9.7 / 11.4 / 2.1 and 0.37 / 6.1 / 7.7 / 1.9. So kthvalue is no cheaper even without the search and
16-22x slower with it. (Scores are all-reduced before the threshold, so every rank ranks all of them; a sharded
threshold could all-reduce these histograms, which kthvalue cannot do without gathering every score.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_BITS = 16
_NB = 1 << _BITS


def _bucket(v: torch.Tensor) -> torch.Tensor:
    """Bucket id in [0, 2^16) that is non-decreasing in the float32 value."""
    k = v.contiguous().view(torch.int32)
    k = torch.where(k < 0, k ^ 0x7FFFFFFF, k)  # negative floats: flip magnitude bits so the int order is the value order
    return ((k >> (32 - _BITS)) + (_NB // 2)).long()


class Ranking:
    """Descending order over the concatenation of ``values`` (one 1-D float32 tensor per group)."""

    def __init__(self, values: list[torch.Tensor]):
        self.values = [v.float() for v in values]
        self.buckets = [_bucket(v) for v in self.values]
        hist = torch.stack([torch.bincount(b, minlength=_NB) for b in self.buckets]) if values \
            else torch.zeros(0, _NB, dtype=torch.long)
        self.suffix = torch.zeros(len(values), _NB + 1, dtype=torch.long)  # [g, b]: entries of g in buckets >= b
        self.suffix[:, :_NB] = hist.flip(1).cumsum(1).flip(1)
        self.total = self.suffix.sum(0)  # non-increasing in b
        self.n = int(self.total[0]) if len(values) else 0
        self._sorted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _bucket_of_rank(self, m: int) -> tuple[int, int]:
        """(b, r): the top m are all entries in buckets >= b plus the first r entries of bucket b - 1."""
        b = int(torch.searchsorted(-self.total, torch.tensor([-m]), right=False))  # first b with total[b] <= m
        return b, m - int(self.total[b])

    def _inside(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(group id, position) of bucket b's entries, in descending value order."""
        if b not in self._sorted:
            groups, positions, vals = [], [], []
            for g, (v, bk) in enumerate(zip(self.values, self.buckets, strict=True)):
                idx = torch.nonzero(bk == b).squeeze(1)
                groups.append(torch.full((len(idx),), g, dtype=torch.long))
                positions.append(idx)
                vals.append(v[idx])
            order = torch.sort(torch.cat(vals), descending=True, stable=True).indices
            self._sorted[b] = (torch.cat(groups)[order], torch.cat(positions)[order])
        return self._sorted[b]

    def counts(self, m: int) -> torch.Tensor:
        """How many of the top ``m`` entries each group holds."""
        b, r = self._bucket_of_rank(m)
        out = self.suffix[:, b].clone()
        if r > 0:
            groups, _ = self._inside(b - 1)
            out += torch.bincount(groups[:r], minlength=len(self.values))
        return out

    def largest(self, ok: Callable[[torch.Tensor, int], bool]) -> int:
        """Largest m in [0, n] with ``ok(counts(m), m)``, for a predicate that is true up to some m, then false."""
        lo_b, hi_b = 0, _NB  # bucket boundaries: m = total[b]; ok holds at b = _NB (m = 0)
        while lo_b < hi_b:  # smallest b whose boundary prefix is acceptable
            mid = (lo_b + hi_b) // 2
            if ok(self.suffix[:, mid], int(self.total[mid])):
                hi_b = mid
            else:
                lo_b = mid + 1
        base = int(self.total[lo_b])
        if lo_b == 0:
            return base
        groups, _ = self._inside(lo_b - 1)
        start = self.suffix[:, lo_b]
        lo, hi = 0, len(groups)  # how many of the boundary bucket's entries join
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(start + torch.bincount(groups[:mid], minlength=len(self.values)), base + mid):
                lo = mid
            else:
                hi = mid - 1
        return base + lo

    def top(self, m: int) -> list[torch.Tensor]:
        """Boolean keep-masks (one per group) of the top ``m`` entries."""
        b, r = self._bucket_of_rank(m)
        keep = [bk >= b for bk in self.buckets]
        if r > 0:
            groups, positions = self._inside(b - 1)
            groups, positions = groups[:r], positions[:r]
            for g in torch.unique(groups).tolist():
                keep[g][positions[groups == g]] = True
        return keep
