"""Cost of one PX round against one training step on the same calibration batches (packaged MiniLM).

Run:  .venv/bin/python scripts/bench_px_round.py [--repeats 3] [--per-class 10]
Prints a table and writes results/px_round.json. Ratios are measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

import hf_px
from hf_px.builtin import minilm_path
from hf_px.data import calibration_batches, load_dataset_any
from hf_px.modeling import load_model, load_processor
from hf_px.pruning.masks import init_masks, select_masks
from hf_px.pruning.report import format_table
from hf_px.pruning.scoring import ScoringContext, get_scorer
from hf_px.pruning.targets import collect_targets


def train_step_time(model, batches, repeats: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:  # one step over the whole calibration set, as the PX round sees it
            loss = model(**batch).loss / len(batches)
            loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    model.eval()
    return min(times)


def px_round_time(model, batches, repeats: int, qk_score: str) -> tuple[float, float]:
    targets = collect_targets(model)
    masks = init_masks(targets)
    config = hf_px.PruneConfig(method="px", sparsity=0.9, rounds=1, options={"qk_score": qk_score})
    scorer = get_scorer("px", config.options)
    ctx = ScoringContext(model=model, targets=targets, masks=masks, batches=batches, config=config,
                         generator=torch.Generator().manual_seed(0))
    scorer.prepare(ctx)
    score_t, select_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        scores = scorer.score(ctx)
        mid = time.perf_counter()
        select_masks(targets, scores, masks, 0.5, config.min_density_ratio)
        score_t.append(mid - start)
        select_t.append(time.perf_counter() - mid)
    return min(score_t), min(select_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--out", default="results/px_round.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    path = minilm_path()
    tok = load_processor(path)
    model = load_model(path, "sequence-classification", num_labels=2)
    data = load_dataset_any("builtin:rotten_tomatoes")
    batches = calibration_batches(data["train"], tok, per_class=args.per_class, batch_size=16, max_length=64)
    n = sum(len(b["input_ids"]) for b in batches)

    step = train_step_time(model, batches, args.repeats)
    rows, records = [], []
    for qk in ("ntk_diag", "magnitude"):
        score, select = px_round_time(model, batches, args.repeats, qk)
        total = score + select
        records.append({"qk_score": qk, "score_s": score, "select_s": select, "round_s": total,
                        "train_step_s": step, "round_over_step": total / step})
        rows.append([qk, f"{score:.3f}", f"{select:.3f}", f"{total:.3f}", f"{step:.3f}", f"{total / step:.2f}x"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"MiniLM-L6, {n} calibration examples in {len(batches)} batches, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(format_table(["Q/K score", "score (s)", "threshold (s)", "PX round (s)", "train step (s)", "ratio"], rows))
    print(f"peak RSS: {peak_mb:.0f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"examples": n, "batches": len(batches), "peak_rss_mb": peak_mb,
                               "machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "records": records}, indent=2))


if __name__ == "__main__":
    main()
