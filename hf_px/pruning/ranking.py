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
16-22x slower with it.

Sharded scores (:class:`ShardedRanking`): when each process holds only part of the scores, the histograms are
summed over processes, so every process sees the same counts and finds the same cut without any score leaving
its process. Inside the bucket a cut falls into, a second histogram of the key's low 16 bits orders the entries
exactly (float32 keys have 32 bits), and equal scores are split by matrix order and then position from
per-process counts. :func:`sharded_topk` does the same for one matrix's own top-k (the layer-collapse floor,
off-path Q/K) with 8-bit radix histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

_BITS = 16
_NB = 1 << _BITS
_LOW = (1 << (32 - _BITS)) - 1


def _key32(v: torch.Tensor) -> torch.Tensor:
    """int32 key whose signed order is the float32 order (negative floats: magnitude bits flipped)."""
    k = v.contiguous().view(torch.int32)
    return torch.where(k < 0, k ^ 0x7FFFFFFF, k)


def _bucket(v: torch.Tensor) -> torch.Tensor:
    """Bucket id in [0, 2^16) that is non-decreasing in the float32 value.

    Recomputed where needed rather than stored: one cheap pass, and no integer copy of every score held
    through the search (peak memory, scripts/bench_px_memory.py).
    """
    return (_key32(v) >> (32 - _BITS)) + (_NB // 2)


def _suffix_sums(hist: torch.Tensor) -> torch.Tensor:
    """[g, b] = Σ_{b' >= b} hist[g, b'], with one zero column appended; consumes ``hist`` (cumsum in place)."""
    rows = hist.sum(1, keepdim=True)
    prefix = hist.cumsum_(1)  # [g, b] = Σ_{b' <= b}; suffix[b + 1] = rows - prefix[b]
    return torch.cat([rows, prefix.neg_().add_(rows)], dim=1)


class Ranking:
    """Descending order over the concatenation of ``values`` (one 1-D float32 tensor per group)."""

    def __init__(self, values: list[torch.Tensor]):
        self.values = [v.float() for v in values]
        self._set_histogram(self._local_histogram())
        self._sorted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _local_histogram(self) -> torch.Tensor:
        if not self.values:
            return torch.zeros(0, _NB, dtype=torch.long)
        return torch.stack([torch.bincount(_bucket(v), minlength=_NB) for v in self.values])

    def _set_histogram(self, hist: torch.Tensor) -> None:
        self.suffix = _suffix_sums(hist)  # [g, b]: entries of g in buckets >= b
        self.total = self.suffix.sum(0)  # non-increasing in b
        self.n = int(self.total[0]) if len(self.values) else 0

    def _bucket_of_rank(self, m: int) -> tuple[int, int]:
        """(b, r): the top m are all entries in buckets >= b plus the first r entries of bucket b - 1."""
        b = int(torch.searchsorted(-self.total, torch.tensor([-m]), right=False))  # first b with total[b] <= m
        return b, m - int(self.total[b])

    def _inside(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(group id, position) of bucket b's entries, in descending value order."""
        if b not in self._sorted:
            groups, positions, vals = [], [], []
            for g, v in enumerate(self.values):
                idx = torch.nonzero(_bucket(v) == b).squeeze(1)
                groups.append(torch.full((len(idx),), g, dtype=torch.long))
                positions.append(idx)
                vals.append(v[idx])
            order = torch.sort(torch.cat(vals), descending=True, stable=True).indices
            self._sorted[b] = (torch.cat(groups)[order], torch.cat(positions)[order])
        return self._sorted[b]

    def _boundary_counts(self, b: int, r: int) -> torch.Tensor:
        """How many of the first ``r`` entries of bucket ``b`` (in ranking order) each group holds."""
        groups, _ = self._inside(b)
        return torch.bincount(groups[:r], minlength=len(self.values))

    def _boundary_keep(self, b: int, r: int) -> list[torch.Tensor | None]:
        """Per group, the positions of its entries among the first ``r`` of bucket ``b`` (None: none)."""
        groups, positions = self._inside(b)
        groups, positions = groups[:r], positions[:r]
        out: list[torch.Tensor | None] = [None] * len(self.values)
        for g in torch.unique(groups).tolist():
            out[g] = positions[groups == g]
        return out

    def counts(self, m: int) -> torch.Tensor:
        """How many of the top ``m`` entries each group holds."""
        b, r = self._bucket_of_rank(m)
        out = self.suffix[:, b].clone()
        if r > 0:
            out += self._boundary_counts(b - 1, r)
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
        start = self.suffix[:, lo_b]
        lo, hi = 0, int(self.total[lo_b - 1]) - base  # how many of the boundary bucket's entries join
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(start + self._boundary_counts(lo_b - 1, mid), base + mid):
                lo = mid
            else:
                hi = mid - 1
        return base + lo

    def top(self, m: int) -> list[torch.Tensor]:
        """Boolean keep-masks (one per group) of the top ``m`` entries."""
        b, r = self._bucket_of_rank(m)
        keep = [_bucket(v) >= b for v in self.values]
        if r > 0:
            for g, positions in enumerate(self._boundary_keep(b - 1, r)):
                if positions is not None:
                    keep[g][positions] = True
        return keep


# ------------------------------------------------------------------------------------------ sharded scores
def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) over the processes of ``group``; the tensor itself with one process."""
    if _world(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


def all_gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """[world, *t.shape]: every process's ``t`` (same shape on every process), in rank order."""
    world = _world(group)
    if world == 1:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _rank(group) -> int:
    return dist.get_rank(group) if _world(group) > 1 else 0


def _before_me(starts: torch.Tensor, sizes: torch.Tensor, rank: int) -> torch.Tensor:
    """Per group (columns), whether each process's entries come before this process's in the group's order.

    Processes are ordered by where their part of the group starts, then by rank (empty parts go anywhere).
    """
    ranks = torch.arange(starts.shape[0]).unsqueeze(1)
    earlier = (starts < starts[rank]) | ((starts == starts[rank]) & (ranks < rank))
    return earlier & (sizes > 0)


class ShardedRanking(Ranking):
    """:class:`Ranking` over the entries every process holds, each process holding a part of some groups.

    ``values[g]`` is this process's part of group g (possibly empty) and ``starts[g]`` where that part begins in
    the group's order (any value for an empty part). Every process builds it at once (collectives), with the
    same number of groups; counts, cuts and the tie-breaking are those of one :class:`Ranking` over the whole
    groups, and ``top`` returns this process's part of the keep-masks. Scores never leave their process: the
    bucket histograms and, for the bucket a cut falls into, the histograms of the low 16 key bits are summed.
    """

    def __init__(self, values: list[torch.Tensor], starts: Sequence[int], group=None):
        self.group = group
        self.values = [v.float() for v in values]
        self.sizes = torch.tensor([len(v) for v in self.values], dtype=torch.long)
        self.starts = torch.tensor(list(starts), dtype=torch.long)
        self._set_histogram(all_reduce(self._local_histogram(), group))
        self._level2: dict[int, tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]] = {}
        self._order: tuple[torch.Tensor, torch.Tensor] | None = None

    def _low(self, b: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Bucket b: per group, this process's (positions, low 16 key bits) of its entries; the global
        histogram of the low bits per group, and its suffix sums."""
        if b not in self._level2:
            parts = []
            for v in self.values:
                idx = torch.nonzero(_bucket(v) == b).squeeze(1)
                parts.append((idx, _key32(v[idx]) & _LOW))
            hist = torch.stack([torch.bincount(low, minlength=_LOW + 1) for _, low in parts]) if parts \
                else torch.zeros(0, _LOW + 1, dtype=torch.long)
            hist = all_reduce(hist, self.group)
            self._level2[b] = (parts, hist, _suffix_sums(hist.clone()))
        return self._level2[b]

    def _cut_in(self, b: int, r: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The first r entries of bucket b: per-group counts above the tied key, that key's low bits d, and
        per-group counts of the tied entries taken (ties go by group order)."""
        _, hist, suffix = self._low(b)
        total = suffix.sum(0)
        d = int(torch.searchsorted(-total, torch.tensor([-r]), right=False))  # first d with total[d] <= r
        above, rest = suffix[:, d], r - int(total[d])
        taken = torch.zeros(len(self.values), dtype=torch.long)
        if rest > 0:  # entries with low bits d - 1 are equal scores: whole groups first, in group order
            tied = hist[:, d - 1]
            before = tied.cumsum(0) - tied
            taken = (rest - before).clamp(min=0).minimum(tied)
        return above, d, taken

    def _boundary_counts(self, b: int, r: int) -> torch.Tensor:
        above, _, taken = self._cut_in(b, r)
        return above + taken

    def _boundary_keep(self, b: int, r: int) -> list[torch.Tensor | None]:
        parts, _, _ = self._low(b)
        _, d, taken = self._cut_in(b, r)
        # each process's tied entries per group, to split a group's share of the ties by position
        tied_here = torch.tensor([int((low == d - 1).sum()) for _, low in parts], dtype=torch.long)
        tied_all = all_gather_rows(tied_here, self.group)
        if self._order is None:
            self._order = (all_gather_rows(self.starts, self.group), all_gather_rows(self.sizes, self.group))
        starts, sizes = self._order
        earlier = (_before_me(starts, sizes, _rank(self.group)) * tied_all).sum(0)
        mine = (taken - earlier).clamp(min=0).minimum(tied_here)
        out: list[torch.Tensor | None] = []
        for (idx, low), k in zip(parts, mine.tolist(), strict=True):
            sel = idx[low >= d]
            if k > 0:  # positions ascend, so the first k tied ones are this process's earliest
                sel = torch.cat([sel, idx[low == d - 1][:k]])
            out.append(sel)
        return out


def sharded_topk(values: list[torch.Tensor], ks: list[int], starts: Sequence[int],
                 exact_topk: Callable[[int, torch.Tensor], torch.Tensor], group=None) -> list[torch.Tensor]:
    """This process's part of the top-``ks[g]`` mask of each group, each group split over processes.

    ``values[g]`` (float32 or float64, one dtype for all) is this process's part of group g, starting at
    ``starts[g]`` in the group's order. The k-th largest value is found exactly by radix histograms summed over
    processes; everything above it is kept. When that value is tied and only some of the tied entries fit, the
    choice must be the one ``torch.topk`` makes on the whole group, which follows no rule that parts can
    reproduce: then (only then) that group's values are gathered and ``exact_topk(g, whole)`` (a boolean mask
    over the whole group) decides. Every process must call this at once with the same ``ks``.
    """
    sizes = all_gather_rows(torch.tensor([len(v) for v in values], dtype=torch.long), group)  # [world, groups]
    n = sizes.sum(0)
    keep = [torch.ones(len(v), dtype=torch.bool) if ks[g] >= int(n[g]) and ks[g] > 0
            else torch.zeros(len(v), dtype=torch.bool) for g, v in enumerate(values)]
    active = []
    for g, k in enumerate(ks):
        if not 0 < k < int(n[g]):
            continue
        if int(sizes[:, g].max()) == int(n[g]):  # whole on one process: that process asks torch.topk itself
            if len(values[g]) == int(n[g]):
                keep[g] = exact_topk(g, values[g])
        else:
            active.append(g)
    if not active:
        return keep
    bits = 64 if values[active[0]].dtype == torch.float64 else 32
    sign = -(1 << (bits - 1))
    # keys with the sign bit flipped: their unsigned order, read 8 bits at a time from the top, is the value order
    flipped = {g: (_key64(values[g]) if bits == 64 else _key32(values[g].float())) ^ sign for g in active}
    match = {g: torch.ones(len(values[g]), dtype=torch.bool) for g in active}
    greater = {g: torch.zeros(len(values[g]), dtype=torch.bool) for g in active}
    rest = {g: ks[g] for g in active}
    tied = {}
    for shift in range(bits - 8, -1, -8):
        digits = {g: (flipped[g] >> shift) & 0xFF for g in active}
        hist = all_reduce(torch.stack([torch.bincount(digits[g][match[g]], minlength=256) for g in active]), group)
        for row, g in enumerate(active):
            above = hist[row].flip(0).cumsum(0).flip(0)  # [d]: entries with digit >= d
            d = int((above >= rest[g]).nonzero().max())  # the largest digit whose tail reaches rest
            greater[g] |= match[g] & (digits[g] > d)
            rest[g] -= int(above[d + 1]) if d < 255 else 0
            match[g] &= digits[g] == d
            tied[g] = int(hist[row, d])
    for g in active:
        if rest[g] == tied[g]:
            keep[g] = greater[g] | match[g]
    ambiguous = [g for g in active if rest[g] != tied[g]]
    if ambiguous:
        _resolve_by_gathering(values, ambiguous, keep, starts, exact_topk, group)
    return keep


def _key64(v: torch.Tensor) -> torch.Tensor:
    """int64 key whose signed order is the float64 order."""
    k = v.contiguous().view(torch.int64)
    return torch.where(k < 0, k ^ 0x7FFFFFFFFFFFFFFF, k)


def _resolve_by_gathering(values: list[torch.Tensor], groups: list[int], keep: list[torch.Tensor],
                          starts: Sequence[int], exact_topk: Callable[[int, torch.Tensor], torch.Tensor],
                          group=None) -> None:
    """Gather each of ``groups`` whole on every process (in order), let ``exact_topk`` pick, keep this part."""
    rank, world = _rank(group), _world(group)
    for g in groups:
        local = values[g]
        sizes = all_gather_rows(torch.tensor([len(local)], dtype=torch.long), group)[:, 0]
        at = all_gather_rows(torch.tensor([int(starts[g])], dtype=torch.long), group)[:, 0]
        width = int(sizes.max())
        padded = torch.zeros(width, dtype=local.dtype)
        padded[: len(local)] = local
        rows = all_gather_rows(padded, group)
        order = sorted(range(world), key=lambda p: (int(at[p]), p))
        whole = torch.cat([rows[p, : int(sizes[p])] for p in order])
        offset = sum(int(sizes[p]) for p in order[: order.index(rank)])
        keep[g] = exact_topk(g, whole)[offset: offset + len(local)]
