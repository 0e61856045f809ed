"""Global-threshold benchmark: the bucketed ranking (hf_px/pruning/ranking.py) against kthvalue, topk and a full sort.

The prunable set is MiniLM-L6's (BERT, hidden 384, FFN 1536, 6 blocks: 10,616,832 weights) with synthetic
log-normal scores spanning many decades, as PX's do. Every variant runs inside the real ``select_masks`` (the same
floor, min_density_ratio=0.1, and the same per-block Q/K rule); only the ranking object is swapped, so the masks
must be identical and the times compare like for like. Two cases: every matrix on-path (every method but PX) and
PX's off-path Q/K, whose density follows the block's V/O and needs a search over the cut. One thread, medians of
``--repeats``; all variants side by side in one process, so the ratios hold even on a loaded machine.

Run:  .venv/bin/python scripts/bench_threshold.py [--repeats 3] [--out results/threshold.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_px.pruning import masks as masks_module
from hf_px.pruning.masks import init_masks, select_masks
from hf_px.pruning.ranking import Ranking
from hf_px.pruning.report import format_table
from hf_px.pruning.targets import collect_targets


class _FlatRanking:
    """The ranking interface of ``Ranking`` over one concatenated tensor; subclasses say how to find the cut."""

    def __init__(self, values: list[torch.Tensor]):
        self.values = [v.float() for v in values]
        self.flat = torch.cat(self.values) if values else torch.zeros(0)
        self.n = self.flat.numel()
        self.group = torch.repeat_interleave(torch.arange(len(values)), torch.tensor([len(v) for v in values]))

    def cut(self, m: int) -> torch.Tensor:
        """Boolean mask over ``flat`` of its top ``m`` (ties at the cut: first in concatenated order)."""
        keep = torch.zeros(self.n, dtype=torch.bool)
        if m <= 0:
            return keep
        if m >= self.n:
            return ~keep
        t = self.kth_largest(m)
        keep = self.flat > t
        rest = m - int(keep.sum())
        keep[torch.nonzero(self.flat == t).squeeze(1)[:rest]] = True
        return keep

    def kth_largest(self, m: int) -> torch.Tensor:
        raise NotImplementedError

    def counts(self, m: int) -> torch.Tensor:
        return torch.bincount(self.group[self.cut(m)], minlength=len(self.values))

    def largest(self, ok: Callable[[torch.Tensor, int], bool]) -> int:
        lo, hi = 0, self.n  # ok holds at 0; bisection, one cut per probe
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(self.counts(mid), mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def top(self, m: int) -> list[torch.Tensor]:
        return list(torch.split(self.cut(m), [len(v) for v in self.values]))


class KthRanking(_FlatRanking):
    def kth_largest(self, m: int) -> torch.Tensor:
        return torch.kthvalue(self.flat, self.n - m + 1).values


class TopkRanking(_FlatRanking):
    def kth_largest(self, m: int) -> torch.Tensor:
        return torch.topk(self.flat, m, sorted=False).values.min()


class SortRanking(_FlatRanking):
    """One stable descending sort; any cut's per-group counts are then a prefix bincount (the pre-bucket code)."""

    def __init__(self, values: list[torch.Tensor]):
        super().__init__(values)
        self.order = torch.sort(self.flat, descending=True, stable=True).indices
        self.group_in_order = self.group[self.order]

    def counts(self, m: int) -> torch.Tensor:
        return torch.bincount(self.group_in_order[:m], minlength=len(self.values))

    def cut(self, m: int) -> torch.Tensor:
        keep = torch.zeros(self.n, dtype=torch.bool)
        keep[self.order[:m]] = True
        return keep


VARIANTS: dict[str, type] = {"buckets": Ranking, "kthvalue": KthRanking, "topk": TopkRanking, "sort": SortRanking}


def minilm_targets() -> list:
    model = BertForSequenceClassification(BertConfig(vocab_size=8, hidden_size=384, num_hidden_layers=6,
                                                     num_attention_heads=12, intermediate_size=1536,
                                                     max_position_embeddings=8))
    return collect_targets(model)


def run_case(targets: list, scores: dict, density: float, ratio: float, variant: str,
             repeats: int) -> tuple[float, dict]:
    masks_module.Ranking = VARIANTS[variant]
    times, out = [], {}
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            out = select_masks(targets, scores, init_masks(targets), density, ratio)
            times.append(time.perf_counter() - start)
    finally:
        masks_module.Ranking = Ranking
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--densities", default="0.5,0.1")
    ap.add_argument("--min-density-ratio", type=float, default=0.1)
    ap.add_argument("--out", default="results/threshold.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    px_targets = minilm_targets()  # Q/K off-path, following V/O of their block
    all_on = [dataclasses.replace(t, on_path=True, follows=()) for t in px_targets]
    g = torch.Generator().manual_seed(0)
    scores = {t.key: torch.exp(torch.randn(t.view(t.param).shape, generator=g, dtype=torch.float64) * 6)
              for t in px_targets}
    n = sum(t.numel() for t in px_targets)
    rows, records = [], []
    for case, targets in (("all on-path", all_on), ("PX: Q/K per block", px_targets)):
        for density in (float(d) for d in args.densities.split(",")):
            times, ref = {}, None
            same = {}
            for variant in VARIANTS:
                times[variant], got = run_case(targets, scores, density, args.min_density_ratio, variant,
                                               args.repeats)
                ref = got if ref is None else ref
                same[variant] = all(torch.equal(got[k], ref[k]) for k in ref)
            rec = {"case": case, "density": density, "prunable": n, "min_density_ratio": args.min_density_ratio,
                   "seconds": times, "same_masks_as_buckets": same,
                   "ratio_to_buckets": {v: times[v] / times["buckets"] for v in VARIANTS}}
            records.append(rec)
            rows.append([case, f"{density:g}", *(f"{times[v]:.3f}" for v in VARIANTS),
                         *(f"{rec['ratio_to_buckets'][v]:.1f}x" for v in VARIANTS if v != "buckets"),
                         "yes" if all(same.values()) else "NO"])
    head = ["case", "density", *(f"{v} (s)" for v in VARIANTS), *(f"{v}/buckets" for v in VARIANTS if v != "buckets"),
            "same masks"]
    print(f"select_masks on {n:,} float32 scores, one thread, median of {args.repeats}:")
    print(format_table(head, rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": 1, "repeats": args.repeats, "records": records}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
