"""Where each pruning method puts its weight budget: density per matrix role (Q, K, V, O, FFN in/out) and per block.

The packaged MiniLM, the same calibration set as ``bench_quality.py`` (10 per class of the fixed training subset),
the same rounds and layer floor; no fine-tuning. Prints two tables and writes ``--out`` (JSON).

Run:
    .venv/bin/python scripts/bench_allocation.py --dataset rt --sparsity 0.8 \\
        --methods px,px-b1,snip,magnitude,wanda,synflow --out results/allocation.json

``--model`` prunes another checkpoint instead, e.g. a fine-tuned dense teacher that bench_recovery.py cached (what
its ``--source teacher`` cells start from), and ``--dataset`` may be a local folder (GLUE SST-2's train.tsv):

    .venv/bin/python scripts/bench_allocation.py --model TEACHER_DIR --dataset PATH/TO/sst2 --train-size 20000 \\
        --methods px,magnitude,snip --out results/allocation_teacher.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_quality import load_splits, prune_config

import hf_px
from hf_px.builtin import minilm_path
from hf_px.data import calibration_batches
from hf_px.modeling import load_model, load_processor
from hf_px.pruning.report import format_table
from hf_px.pruning.targets import collect_targets


def allocation(masks: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, dict]:
    """Kept fraction of the weights, grouped by the registry's role of each matrix and by block."""
    where = {t.key: (t.role, t.block) for t in collect_targets(model)}
    by_role: dict[str, list[int]] = {}
    by_block: dict[int, list[int]] = {}
    by_matrix: dict[str, list[int]] = {}
    for key, mask in masks.items():
        role, block = where[key]
        for group, name in ((by_role, role), (by_block, block), (by_matrix, f"{block}.{role}")):
            kept_total = group.setdefault(name, [0, 0])
            kept_total[0] += int(mask.sum())
            kept_total[1] += mask.numel()
    share = lambda g: {str(k): kt[0] / kt[1] for k, kt in g.items()}  # noqa: E731
    return {"by_role": share(by_role), "by_block": share(by_block), "by_matrix": share(by_matrix)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="rt", help="rt, sst2 or tweets (as in bench_quality.py), or a local folder")
    p.add_argument("--model", default=None, help="checkpoint folder to prune (default: the packaged pretrained "
                   "MiniLM with a fresh head)")
    p.add_argument("--min-density-ratio", type=float, default=hf_px.PruneConfig.min_density_ratio,
                   help="PruneConfig.min_density_ratio")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--methods", default="px,px-b1,snip,magnitude,wanda,synflow")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--train-size", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/allocation.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or minilm_path()
    tok = load_processor(path)
    train, _ = load_splits(args.dataset, args.train_size, None)
    n_labels = len(set(train["label"]))
    batches = calibration_batches(train, tok, per_class=args.per_class, batch_size=16, max_length=64, seed=args.seed)
    records = []
    for method in [m for m in args.methods.split(",") if m]:
        torch.manual_seed(args.seed)
        model = load_model(path, "sequence-classification", num_labels=n_labels)
        config = prune_config(method, sparsity=args.sparsity, rounds=args.rounds, seed=args.seed,
                              min_density_ratio=args.min_density_ratio)
        result = hf_px.prune(model, batches, config, progress=False)
        records.append({"dataset": args.dataset, "model": args.model or "builtin:minilm", "method": method,
                        "sparsity": args.sparsity, "seed": args.seed, "rounds": args.rounds,
                        "min_density_ratio": args.min_density_ratio, **allocation(result.masks, model)})
    for key in ("by_role", "by_block"):
        columns = list(records[0][key])
        print(f"\nkept fraction {key.replace('_', ' ')} ({args.dataset}, {args.sparsity:.0%} sparsity):")
        print(format_table(["method", *columns], [[r["method"], *(f"{r[key][c]:.3f}" for c in columns)] for r in records]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
