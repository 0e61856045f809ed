"""Cost benchmark: one scoring round of each method as a ratio to one training step on the same batches.

Three tables, every ratio measured side by side in one process (absolute seconds depend on the machine's load):
1. every registered method on the packaged MiniLM (score, global threshold, round, ratio, peak extra RSS);
2. PX cost against model size (tiny BERT configs -> MiniLM);
3. PX cost against the number of calibration batches.

A training step is forward + backward over the same calibration batches and one AdamW step; each row pairs
a step with the round timed right after it and reports medians of the per-pair ratios. Peak memory is the
highest resident set size seen (sampled every 2 ms) above the level before the call. Writes results/cost.json.

Run:  .venv/bin/python scripts/bench_cost.py [--repeats 2] [--methods px,snip,...] [--skip-size] [--skip-batches]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import hf_px
from hf_px.builtin import minilm_path
from hf_px.data import calibration_batches, load_dataset_any
from hf_px.modeling import load_model, load_processor
from hf_px.pruning.masks import init_masks, select_masks
from hf_px.pruning.report import format_table
from hf_px.pruning.scoring import ScoringContext, available_methods, get_scorer
from hf_px.pruning.targets import collect_targets

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Highest RSS above the starting level while the block runs (a sampling thread; coarse but allocator-agnostic)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def train_step(model, batches) -> tuple[float, float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    model.train()
    with PeakRSS() as mem:
        start = time.perf_counter()
        for batch in batches:
            (model(**batch).loss / len(batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
    model.eval()
    return elapsed, mem.extra_mb


def scoring_round(model, batches, method: str) -> tuple[float, float, float]:
    """(score seconds, threshold seconds, peak extra MB) of one round at density 0.5 from dense masks."""
    config = hf_px.PruneConfig(method=method, sparsity=0.5, rounds=1)
    targets = collect_targets(model)
    scorer = get_scorer(method)
    if not scorer.uses_off_path:
        targets = [dataclasses.replace(t, on_path=True, follows=()) for t in targets]  # as hf_px.prune does
    ctx = ScoringContext(model=model, targets=targets, masks=init_masks(targets), batches=batches, config=config,
                         generator=torch.Generator().manual_seed(0))
    with PeakRSS() as mem:
        start = time.perf_counter()
        scorer.prepare(ctx)
        scores = scorer.score(ctx)
        mid = time.perf_counter()
        select_masks(targets, scores, ctx.masks, 0.5, config.min_density_ratio)
        end = time.perf_counter()
    return mid - start, end - mid, mem.extra_mb


def paired(model, batches, method: str, repeats: int) -> dict:
    """Each repeat times a training step and then the round right after it; the medians of the per-pair ratios
    are reported, so slow drifts of the machine's load cancel."""
    pairs = []
    for _ in range(repeats):
        step, step_mb = train_step(model, batches)
        score, select, mb = scoring_round(model, batches, method)
        pairs.append((step, score, select, mb, step_mb))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {"train_step_s": med([p[0] for p in pairs]), "score_s": med([p[1] for p in pairs]),
            "select_s": med([p[2] for p in pairs]), "round_s": med([p[1] + p[2] for p in pairs]),
            "round_over_step": med([(p[1] + p[2]) / p[0] for p in pairs]),
            "score_over_step": med([p[1] / p[0] for p in pairs]), "peak_extra_mb": max(p[3] for p in pairs),
            "train_step_peak_extra_mb": max(p[4] for p in pairs), "repeats": repeats}


def _row(label, r: dict) -> list:
    return [label, f"{r['score_s']:.2f}", f"{r['select_s']:.2f}", f"{r['train_step_s']:.2f}",
            f"{r['score_over_step']:.2f}x", f"{r['round_over_step']:.2f}x", f"{r['peak_extra_mb']:.0f}"]


HEAD = ["score (s)", "threshold (s)", "train step (s)", "score/step", "round/step", "peak extra MB"]


def bert_config(hidden: int, layers: int) -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(2, hidden // 32),
                      intermediate_size=4 * hidden, num_labels=2, attn_implementation="eager")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(available_methods()))
    p.add_argument("--repeats", type=int, default=3, help="step/round pairs per row (medians)")
    p.add_argument("--per-class", type=int, default=10, help="calibration examples per class (RT: 2 classes)")
    p.add_argument("--batch-counts", default="1,2,4,8", help="PX cost vs calibration batches (of 16 examples)")
    p.add_argument("--skip-size", action="store_true")
    p.add_argument("--skip-batches", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/cost.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = minilm_path()
    tok = load_processor(path)
    train = load_dataset_any("builtin:rotten_tomatoes")["train"]
    batches = calibration_batches(train, tok, per_class=args.per_class, batch_size=16, max_length=64)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores); torch threads {args.threads}")
    out: dict = {"threads": args.threads, "loadavg_start": load, "calibration_examples": sum(len(b["labels"])
                 for b in batches), "calibration_batches": len(batches)}

    model = load_model(path, "sequence-classification", num_labels=2)
    rows, recs = [], []
    for method in [m for m in args.methods.split(",") if m]:
        r = {"method": method, **paired(model, batches, method, args.repeats)}
        recs.append(r)
        rows.append(_row(method, r))
        print(f"  {method}: round {r['round_s']:.2f} s, {r['round_over_step']:.2f}x", flush=True)
    out["methods"] = recs
    print(f"\nMiniLM-L6, {out['calibration_examples']} examples in {len(batches)} batches (medians of {args.repeats} "
          "step/round pairs)")
    print(format_table(["method", *HEAD], rows))

    if not args.skip_size:
        sizes = [("bert h64 L2", bert_config(64, 2)), ("bert h128 L4", bert_config(128, 4)),
                 ("bert h256 L4", bert_config(256, 4)), ("MiniLM-L6 h384", None)]
        rows, recs = [], []
        for name, cfg in sizes:
            m = model if cfg is None else BertForSequenceClassification(cfg).eval()
            n = sum(t.numel() for t in collect_targets(m))
            r = {"model": name, "prunable_params": n, **paired(m, batches, "px", args.repeats)}
            recs.append(r)
            rows.append(_row(f"{name} ({n / 1e6:.2f}M)", r))
        out["px_vs_size"] = recs
        print("\nPX round vs model size (prunable params)")
        print(format_table(["model", *HEAD], rows))

    if not args.skip_batches:
        rows, recs = [], []
        for n in [int(x) for x in args.batch_counts.split(",") if x]:
            bs = calibration_batches(train, tok, per_class=None, num_batches=n, batch_size=16, max_length=64)
            r = {"batches": n, **paired(model, bs, "px", args.repeats)}
            recs.append(r)
            rows.append(_row(n, r))
        out["px_vs_batches"] = recs
        print("\nPX round vs calibration batches (16 examples each, MiniLM)")
        print(format_table(["batches", *HEAD], rows))

    out["loadavg_end"] = os.getloadavg()
    print(f"\nload average at end: {out['loadavg_end'][0]:.2f}")
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, dest)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
