"""Quality benchmark: the packaged MiniLM pruned by each method, then fine-tuned with the same budget.

For every (dataset, seed): one dense fine-tune, and for every (method, sparsity) a fresh model pruned on the same
calibration set (``--per-class`` examples per class of the training subset), evaluated right after pruning and
after fine-tuning. Records are merged into ``--out`` (one per dataset/method/sparsity/seed; a rerun replaces its
own records; the key includes lr, steps and the layer floor; keep runs with another --min-density-ratio in their
own --out, as the tables do not separate them), so a grid can be filled by several short runs. Prints a mean ± std
table and writes a PNG plot of accuracy after fine-tuning against sparsity (``--plot``).

"Accuracy after prune" is a linear probe: a logistic-regression head fit on the pruned model's frozen mean-pooled
features of ``--probe-examples`` training sentences (the task head is freshly initialised, so its own accuracy
before fine-tuning is chance; it is kept as ``head_accuracy_after_prune``).

Run (a small grid; the issue's full grid is 3 datasets x 6 methods x 4 sparsities x 3 seeds):
    .venv/bin/python scripts/bench_quality.py --datasets rt --methods px,magnitude,snip --sparsities 0.8 \\
        --seeds 0 --train-size 2000 --steps 150
    .venv/bin/python scripts/bench_quality.py --summary-only     # table + plot from results/quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import hf_px
from hf_px.builtin import minilm_path
from hf_px.data import calibration_batches, load_dataset_any
from hf_px.modeling import load_model, load_processor
from hf_px.pruning.report import format_table

# SST-2: the Hub copy, or a local copy of GLUE SST-2 (a folder with train.tsv/dev.tsv) named by HF_PX_SST2
DATASETS = {"sst2": os.environ.get("HF_PX_SST2", "stanfordnlp/sst2"), "rt": "builtin:rotten_tomatoes",
            "tweets": "builtin:tweets"}
EVAL_SPLITS = ("dev", "validation", "test")
# benchmark-only method names: a method with non-default options (PruneConfig.options)
VARIANTS = {
    "wanda-global": ("wanda", {"per_row": False}),  # one global ranking, not the paper's per row
    "px-b1": ("px", {"b_length": 1}),  # PX without the token-route factor of the B pass (docs/px.md §5.5)
}


def prune_config(method: str, **kwargs) -> hf_px.PruneConfig:
    """The PruneConfig of a method name or of a benchmark variant (``VARIANTS``)."""
    name, options = VARIANTS.get(method, (method, None))
    return hf_px.PruneConfig(method=name, options=options, **kwargs)


def load_splits(name: str, train_size: int, eval_size: int | None, config_name: str | None = None):
    """(train subset, eval split): a fixed seed-0 subset of the training split, the dev/test split (capped).

    ``name`` is a key of ``DATASETS`` or anything ``load_dataset_any`` reads (``config_name``: a Hub config).
    """
    dd = load_dataset_any(DATASETS.get(name, name), config_name)
    eval_split = next((s for s in EVAL_SPLITS if s in dd), None)
    if "train" not in dd or eval_split is None:
        raise ValueError(f"{name}: need a 'train' split and one of {EVAL_SPLITS}; found {sorted(dd)}.")
    train = dd["train"].shuffle(seed=0).select(range(min(train_size, len(dd["train"]))))
    ev = dd[eval_split]
    if eval_size is not None and len(ev) > eval_size:
        ev = ev.shuffle(seed=0).select(range(eval_size))
    return train, ev


def _text_column(ds) -> str:
    return next(c for c in ("sentence", "text") if c in ds.column_names)


@torch.no_grad()
def features_and_logits(model, tok, ds, max_length: int, batch_size: int = 64):
    """Mean-pooled last hidden states over real tokens, and the task head's logits, for every row of ``ds``."""
    col, feats, logits = _text_column(ds), [], []
    model.eval()
    for start in range(0, len(ds), batch_size):
        rows = ds[start:start + batch_size]
        enc = tok(rows[col], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = model(**enc, output_hidden_states=True)
        m = enc["attention_mask"].unsqueeze(-1).float()
        feats.append((out.hidden_states[-1] * m).sum(1) / m.sum(1))
        logits.append(out.logits)
    return torch.cat(feats), torch.cat(logits)


def probe_accuracy(train_x, train_y, eval_x, eval_y, l2: float = 1e-3) -> float:
    """Logistic regression (L-BFGS, standardised features) fit on train, accuracy on eval."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt, xe = (train_x - mu) / sd, (eval_x - mu) / sd
    n_cls = int(max(train_y.max(), eval_y.max())) + 1
    w = torch.zeros(xt.shape[1], n_cls, requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, train_y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(((xe @ w + b).argmax(1) == eval_y).float().mean())


def run_one(args, dataset: str, method: str, sparsity: float, seed: int, tok, train, ev) -> dict:
    torch.manual_seed(seed)  # the new classifier head: identical for every method of this seed
    n_labels = len(set(train["label"]))
    model = load_model(minilm_path(), "sequence-classification", num_labels=n_labels)
    record = {"dataset": dataset, "method": method, "sparsity": sparsity, "seed": seed,
              "train_size": len(train), "eval_size": len(ev), "steps": args.steps, "rounds": args.rounds,
              "lr": args.lr, "batch_size": args.batch_size, "per_class": args.per_class,
              "min_density_ratio": args.min_density_ratio}
    masks = None
    if method != "dense":
        batches = calibration_batches(train, tok, per_class=args.per_class, batch_size=16,
                                      max_length=args.max_length, seed=seed)
        result = hf_px.prune(model, batches, prune_config(method, sparsity=sparsity, rounds=args.rounds, seed=seed,
                                                          min_density_ratio=args.min_density_ratio), progress=False)
        masks = result.masks
        record.update(achieved_sparsity=result.report["achieved_sparsity"], prune_time_s=result.report["time_s"])
    probe = train.shuffle(seed=1).select(range(min(args.probe_examples, len(train))))
    px, _ = features_and_logits(model, tok, probe, args.max_length)
    ex, logits = features_and_logits(model, tok, ev, args.max_length)
    ey = torch.tensor(list(ev["label"]))
    record["accuracy_after_prune"] = probe_accuracy(px, torch.tensor(list(probe["label"])), ex, ey)
    record["head_accuracy_after_prune"] = float((logits.argmax(1) == ey).float().mean())

    from hf_px.config import FinetuneConfig
    from hf_px.finetuning.loop import finetune

    start = time.perf_counter()
    cfg = FinetuneConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=seed,
                         max_length=args.max_length, eval_batch_size=64, progress_bar=False, log_every=50)
    out = finetune(model, train, None, cfg, tokenizer=tok, masks=masks)
    record["finetune_time_s"] = time.perf_counter() - start
    _, logits = features_and_logits(out.model, tok, ev, args.max_length)
    record["accuracy_after_finetune"] = float((logits.argmax(1) == ey).float().mean())
    return record


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(records, f, indent=2)
    os.replace(tmp, path)


def _key(r: dict) -> tuple:
    # records from before --min-density-ratio existed ran with the library default, 0.1
    return (r["dataset"], r["method"], float(r["sparsity"]), int(r["seed"]), r.get("lr"), r.get("steps"),
            float(r.get("min_density_ratio", 0.1)))


def replace_records(records: list[dict], new: list[dict]) -> list[dict]:
    """``records`` with ``new`` added; a new record replaces an old one of the same key."""
    keys = {_key(r) for r in new}
    return [r for r in records if _key(r) not in keys] + new


def summary_rows(records: list[dict]) -> list[list]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r.get("lr"), r.get("steps"), r["method"], float(r["sparsity"])), []).append(r)

    def ms(vals: list[float]) -> str:
        vals = [100 * v for v in vals]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.1f} ± {sd:.1f}"

    rows = []
    for (ds, lr, steps, method, sp), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        rows.append([ds, f"{lr:g}" if lr is not None else "-", steps, method, f"{sp:.2f}", len(rs), ms([r["accuracy_after_prune"] for r in rs]),
                     ms([r["accuracy_after_finetune"] for r in rs])])
    return rows


def pivot_tables(records: list[dict], key: str = "accuracy_after_finetune") -> str:
    """One table per (dataset, lr, steps): methods as rows, sparsities as columns, mean (± std over seeds) of ``key``."""
    out = []
    setups = sorted({(r["dataset"], r.get("lr"), r.get("steps")) for r in records}, key=str)
    for ds, lr, steps in setups:
        rs = [r for r in records if (r["dataset"], r.get("lr"), r.get("steps")) == (ds, lr, steps)]
        sparsities = sorted({float(r["sparsity"]) for r in rs if r["method"] != "dense"})
        methods = sorted({r["method"] for r in rs}, key=lambda m: (m != "dense", m != "px", m))
        rows = []
        for m in methods:
            row = [m]
            for sp in ([0.0] if m == "dense" else []) + ([] if m == "dense" else sparsities):
                vals = [100 * r[key] for r in rs if r["method"] == m and float(r["sparsity"]) == sp]
                n = len(vals)
                cell = "-" if not n else f"{statistics.mean(vals):.1f}" + (
                    f" ± {statistics.stdev(vals):.1f} (n={n})" if n > 1 else "")
                row.append(cell)
            if m == "dense":
                row += [row[1]] * (len(sparsities) - 1)
            rows.append(row)
        out.append(f"{ds} (lr {lr}, {steps} steps): {key}\n"
                   + format_table(["method", *[f"{sp:.0%}" for sp in sparsities]], rows))
    return "\n\n".join(out)


def markdown_table(records: list[dict], key: str = "accuracy_after_finetune") -> str:
    """One Markdown table per dataset: methods as rows, sparsities as columns; mean ± std over seeds, ``(n=k)``
    where a cell has fewer seeds than the most complete one. Bold: the best pruning method of each column."""
    order = list(DATASETS)
    datasets = sorted({r["dataset"] for r in records}, key=lambda d: (order.index(d) if d in order else len(order), d))
    methods = sorted({r["method"] for r in records}, key=lambda m: (m != "dense", m != "px", m))
    cells: dict[tuple, list[float]] = {}
    for r in records:
        cells.setdefault((r["method"], r["dataset"], float(r["sparsity"])), []).append(100 * r[key])
    n_max = max(len(v) for v in cells.values())
    tables = []
    for d in datasets:
        sparsities = sorted({sp for m, ds, sp in cells if ds == d and m != "dense"})
        best = {sp: max((statistics.mean(cells[(m, d, sp)]) for m in methods if m != "dense" and (m, d, sp) in cells),
                        default=None) for sp in sparsities}
        lines = [f"**{d}**", "", "| method | " + " | ".join(f"{sp:.0%}" for sp in sparsities) + " |",
                 "| --- | " + " | ".join("---:" for _ in sparsities) + " |"]
        for m in methods:
            row = []
            for sp in sparsities:
                vals = cells.get((m, d, 0.0 if m == "dense" else sp))
                if not vals:
                    row.append("-")
                    continue
                mean = statistics.mean(vals)
                text = f"{mean:.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")
                text += f" (n={len(vals)})" if len(vals) < n_max else ""
                row.append(f"**{text}**" if m != "dense" and mean == best[sp] else text)
            if any(c != "-" for c in row):
                lines.append(f"| {m} | " + " | ".join(row) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def plot(records: list[dict], path: Path, key: str = "accuracy_after_finetune",
         panel: Callable[[dict], str] | None = None) -> str:
    """Mean ``key`` (± std over seeds) against sparsity, one panel per ``panel(record)`` (default: dataset, lr and
    steps), one colour per method; ``dense`` records (sparsity 0) are drawn as a horizontal line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib to get it)."
    label = panel or (lambda r: f"{r['dataset']} lr={r.get('lr')} steps={r.get('steps')}")
    datasets = sorted({label(r) for r in records})
    # one colour per method in every panel; PX drawn thicker
    colours = {m: f"C{i % 10}" for i, m in enumerate(sorted({r["method"] for r in records} - {"dense"}))}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        for method in sorted({r["method"] for r in records if label(r) == ds}):
            pts: dict[float, list[float]] = {}
            for r in records:
                if label(r) == ds and r["method"] == method:
                    pts.setdefault(float(r["sparsity"]), []).append(100 * r[key])
            xs = sorted(pts)
            if method == "dense":
                ax.axhline(statistics.mean(pts[xs[0]]), color="k", ls="--", label="dense")
                continue
            ax.errorbar(xs, [statistics.mean(pts[x]) for x in xs],
                        [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0 for x in xs], marker="o", label=method,
                        color=colours[method], linewidth=2.5 if method == "px" else 1.2, capsize=2)
        ax.set(title=ds, xlabel="sparsity", ylabel=f"{key.replace('_', ' ')} (%)")
        ax.legend(fontsize="small", loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return f"plot: {path}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="rt", help=f"comma list of {', '.join(DATASETS)} or any load_dataset_any name")
    p.add_argument("--methods", default="px,magnitude,snip",
                   help="comma list of pruning methods, plus the variants wanda-global (wanda ranked globally, not "
                   "per row) and px-b1 (PX with b_length=1: no token-route factor in the B pass)")
    p.add_argument("--sparsities", default="0.8", help="comma list, e.g. 0.5,0.8,0.9,0.95")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--no-dense", action="store_true", help="skip the dense fine-tune")
    p.add_argument("--train-size", type=int, default=2000, help="fixed training subset (seed 0)")
    p.add_argument("--eval-size", type=int, default=1000, help="cap on the eval split (SST-2 dev has 872)")
    p.add_argument("--probe-examples", type=int, default=500)
    p.add_argument("--per-class", type=int, default=10, help="calibration examples per class")
    p.add_argument("--rounds", type=int, default=10, help="pruning rounds (the same for every method)")
    p.add_argument("--steps", type=int, default=150, help="fine-tune optimizer steps")
    p.add_argument("--min-density-ratio", type=float, default=0.1,
                   help="layer-collapse floor passed to PruneConfig (default 0.1, the library default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a loaded 2-core machine two threads spin against each other)")
    p.add_argument("--out", default="results/quality.json")
    p.add_argument("--plot", default="results/quality.png")
    p.add_argument("--summary-only", action="store_true", help="print the table and plot from --out, run nothing")
    p.add_argument("--merge", default="", metavar="FILES",
                   help="comma list of record files (e.g. from parallel shards, each with its own --out) merged into "
                   "--out first; a record of the same dataset/method/sparsity/seed/lr/steps/min-density-ratio replaces the older one")
    p.add_argument("--markdown", action="store_true",
                   help="also print the after-fine-tune and after-prune tables as Markdown (the README's tables)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    records = load_records(out)
    for extra in [Path(f) for f in args.merge.split(",") if f]:
        if not extra.exists():
            raise SystemExit(f"--merge: {extra} does not exist")
        incoming = load_records(extra)
        records = replace_records(records, incoming)
        save_records(out, records)
        print(f"merged {len(incoming)} records from {extra} into {out}")
    if not args.summary_only:
        tok = load_processor(minilm_path())
        methods = [m for m in args.methods.split(",") if m]
        sparsities = [float(s) for s in args.sparsities.split(",") if s]
        for s in sparsities:
            if not 0 < s < 1 or math.isnan(s):
                raise SystemExit(f"--sparsities: {s} is not in (0, 1)")
        for dataset in [d for d in args.datasets.split(",") if d]:
            train, ev = load_splits(dataset, args.train_size, args.eval_size)
            for seed in [int(s) for s in args.seeds.split(",") if s]:
                runs = ([] if args.no_dense else [("dense", 0.0)]) + [(m, s) for s in sparsities for m in methods]
                for method, sparsity in runs:
                    t0 = time.perf_counter()
                    rec = run_one(args, dataset, method, sparsity, seed, tok, train, ev)
                    rec["wall_s"] = time.perf_counter() - t0
                    records = replace_records(records, [rec])
                    save_records(out, records)
                    print(f"{dataset} {method} {sparsity} seed {seed}: after prune (probe) "
                          f"{rec['accuracy_after_prune']:.4f}, after fine-tune {rec['accuracy_after_finetune']:.4f} "
                          f"({rec['wall_s']:.0f} s)", flush=True)
    print(format_table(["dataset", "lr", "steps", "method", "sparsity", "seeds", "after prune (probe) %", "after fine-tune %"],
                       summary_rows(records)))
    if records:
        print()
        print(pivot_tables(records))
        print()
        print(pivot_tables(records, "accuracy_after_prune"))
        if args.markdown:
            for key in ("accuracy_after_finetune", "accuracy_after_prune"):
                print(f"\n{key} (%):\n" + markdown_table(records, key))
        print(plot(records, Path(args.plot)))


if __name__ == "__main__":
    main()
