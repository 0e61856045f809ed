"""Recovery benchmark: how much of the dense model's accuracy a pruned model keeps once distilled from it.

For every (dataset, seed) the dense teacher (the packaged MiniLM, or ``--model``) is fine-tuned once and cached
under ``--work-dir`` (a re-run with the same teacher settings reuses it). Then every (method, sparsity) cell
prunes a fresh copy of the pretrained weights (the PX paper's setting; ``--source teacher`` prunes the teacher's
weights) on ``--per-class`` examples per class of the training subset, fine-tunes it with the same recipe while
distilling the teacher, and evaluates it on the dev/test split. The teacher is fine-tuned with the recipe's
training settings (train size, epochs/steps, lr, batch size, max length), always on labels, all weights trained.

Each cell's record is written to ``--out`` as soon as it finishes (atomic rewrite), and cells already there
(same dataset, source, recipe, method, sparsity, seed) are skipped, so a stopped grid keeps its cells and
resumes. ``--recipe NAME`` labels the recipe; reusing a name with other recipe settings is refused.

Run (``--sst2`` takes a local copy of GLUE SST-2, e.g. a folder with train.tsv/dev.tsv):
    .venv/bin/python scripts/bench_recovery.py --datasets rt,sst2 --sst2 PATH/TO/sst2 \\
        --methods px,snip,magnitude,wanda --sparsities 0.8,0.9,0.95 --seeds 0,1,2 --epochs 1 --recipe kd-e1
    .venv/bin/python scripts/bench_recovery.py --summary-only     # Markdown tables + results/recovery.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hf_px
from hf_px.config import FinetuneConfig
from hf_px.data import calibration_batches
from hf_px.export.serialization import load, save_pretrained
from hf_px.finetuning.distill import DistillConfig
from hf_px.finetuning.gradual import GradualConfig
from hf_px.finetuning.loop import finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, also when imported from a test
from bench_quality import load_records, load_splits, markdown_table, plot, prune_config, save_records  # noqa: E402

BUILTIN = {"rt": "builtin:rotten_tomatoes"}
PACKAGED = "builtin:minilm"
SOURCES = ("pretrained", "teacher")
# what a record's numbers depend on besides its cell: a recipe name must always mean the same values
RECIPE_KEYS = ("model", "train_size", "eval_size", "epochs", "steps", "lr", "batch_size", "max_length", "per_class",
               "rounds", "temperature", "alpha", "freeze_embeddings")
# recipe settings added after the first records: what the records without them were run with
LATER_KEYS = {"schedule": "oneshot", "group_by_length": False, "min_density_ratio": 0.1}
GRADUAL_KEYS = ("initial_sparsity", "gradual_every", "gradual_end")
TEACHER_KEYS = ("model", "train_size", "eval_size", "epochs", "steps", "lr", "batch_size", "max_length")
CELL_KEYS = ("dataset", "source", "recipe", "method", "sparsity", "seed")

Splits = tuple[Any, Any]  # (train subset, eval split) as datasets.Dataset
Pretrained = Callable[[int], nn.Module]  # seed -> the pretrained model with a freshly initialised head


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The fine-tuning recipe's options, shared with bench_speed (whose teachers are this script's)."""
    p.add_argument("--train-size", type=int, default=2000, help="fixed training subset (seed-0 shuffle)")
    p.add_argument("--eval-size", type=int, default=1000, help="cap on the eval split (SST-2 dev has 872)")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (ignored when --steps is set)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--per-class", type=int, default=10, help="calibration examples per class")
    p.add_argument("--rounds", type=int, default=10, help="pruning rounds (the same for every method)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    p.add_argument("--alpha", type=float, default=0.5, help="share of the distillation term (0: labels only)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="rt", help="comma list: rt (built-in Rotten Tomatoes), sst2 (see --sst2)")
    p.add_argument("--sst2", default="glue:sst2",
                   help="where sst2 comes from: a local folder/file, or a Hub id[:config] (default glue:sst2, "
                   "which needs the Hub)")
    p.add_argument("--methods", default="px,snip,magnitude,wanda",
                   help="comma list of pruning methods (and bench_quality's variants, e.g. wanda-global)")
    p.add_argument("--sparsities", default="0.8,0.9,0.95", help="comma list in (0, 1)")
    p.add_argument("--seeds", default="0", help="comma list of seeds (head init, calibration sample, data order)")
    p.add_argument("--source", choices=SOURCES, default="pretrained",
                   help="what is pruned: the pretrained weights (default) or the fine-tuned dense teacher's")
    p.add_argument("--model", default=PACKAGED, help=f"model folder or Hub id (default: {PACKAGED}, the packaged "
                   "all-MiniLM-L6-v2)")
    p.add_argument("--recipe", default="default", help="name of this recipe, stored in every record")
    add_recipe_arguments(p)
    p.add_argument("--schedule", choices=("oneshot", "gradual"), default="oneshot",
                   help="oneshot: prune to the sparsity, then fine-tune with fixed masks; gradual: prune to "
                   "--initial-sparsity, then keep pruning while fine-tuning on the cubic schedule (hf_px.GradualConfig)")
    p.add_argument("--min-density-ratio", type=float, default=hf_px.PruneConfig.min_density_ratio,
                   help="PruneConfig.min_density_ratio: every matrix keeps at least this fraction of the round's "
                   "density (1: every matrix pruned to the same sparsity, ranked by the method within it)")
    p.add_argument("--initial-sparsity", type=float, default=0.0, help="gradual: sparsity of the first pruning step")
    p.add_argument("--gradual-every", type=int, default=5, help="gradual: optimizer steps between pruning steps")
    p.add_argument("--gradual-end", type=float, default=0.7,
                   help="gradual: fraction of the steps at which the final sparsity is reached")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together while the pruned model is fine-tuned "
                   "(FinetuneConfig.group_by_length; the teacher is not, so it is shared with other recipes)")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="keep the pruned model's input embeddings fixed while it is fine-tuned (not the teacher's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a loaded 2-core machine two threads spin against each other)")
    p.add_argument("--work-dir", default="results/recovery-work", help="where the fine-tuned teachers are cached")
    p.add_argument("--out", default="results/recovery.json")
    p.add_argument("--plot", default="results/recovery.png",
                   help="where the plot of the share of dense kept is written after every run (one panel per dataset "
                   "and budget)")
    p.add_argument("--summary-only", action="store_true", help="print the tables and plot from --out, run nothing")
    return p


def recipe_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {k: getattr(args, k) for k in RECIPE_KEYS}
    params["schedule"], params["group_by_length"] = args.schedule, args.group_by_length
    params["min_density_ratio"] = args.min_density_ratio
    if args.schedule == "gradual":
        params.update({k: getattr(args, k) for k in GRADUAL_KEYS})
    return params


def cell_key(record: dict[str, Any]) -> tuple:
    return (record["dataset"], record["source"], record["recipe"], record["method"], float(record["sparsity"]),
            int(record["seed"]))


def check_recipe(records: Iterable[dict[str, Any]], args: argparse.Namespace) -> None:
    """Refuse to mix, under one recipe name, records made with other settings: skipped cells would lie."""
    mine = recipe_params(args)
    for r in records:
        if r["recipe"] == args.recipe:
            diff = {k: (r.get(k, LATER_KEYS.get(k)), v) for k, v in mine.items() if r.get(k, LATER_KEYS.get(k)) != v}
            if diff:
                raise SystemExit(f"recipe {args.recipe!r} in {args.out} was run with other settings "
                                 f"(recorded, now): {diff}; choose another --recipe name.")


def finetune_config(args: argparse.Namespace, seed: int, distill: DistillConfig | None = None,
                    gradual: GradualConfig | None = None) -> FinetuneConfig:
    return FinetuneConfig(epochs=args.epochs, max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                          max_length=args.max_length, seed=seed, eval_batch_size=64, progress_bar=False,
                          log_every=50, metrics=("accuracy",), distill=distill, gradual=gradual,
                          group_by_length=args.group_by_length and distill is not None,
                          freeze_embeddings=args.freeze_embeddings and distill is not None)


def teacher_dir(args: argparse.Namespace, dataset: str, data_source: str, seed: int) -> Path:
    settings = {k: getattr(args, k) for k in TEACHER_KEYS}
    digest = hashlib.sha1(json.dumps([data_source, seed, settings], sort_keys=True).encode()).hexdigest()[:10]
    return Path(args.work_dir) / "teachers" / f"{dataset}-seed{seed}-{digest}"


def get_teacher(args: argparse.Namespace, dataset: str, data_source: str, seed: int, splits: Splits, tokenizer: Any,
                pretrained: Pretrained) -> tuple[nn.Module, dict[str, Any]]:
    """The dense teacher of (dataset, seed) and its record (``dense_accuracy``, cost), fine-tuned on first use."""
    folder = teacher_dir(args, dataset, data_source, seed)
    meta = folder / "hf_px.json"
    if meta.exists():
        info = json.loads(meta.read_text())["metadata"]["teacher"]
        return load(str(folder)).eval(), info
    train, ev = splits
    wall, cpu = time.perf_counter(), time.process_time()
    out = finetune(pretrained(seed), train, ev, finetune_config(args, seed), tokenizer=tokenizer)
    info = {"dataset": dataset, "data_source": data_source, "seed": seed,
            "dense_accuracy": float(out.metrics["eval_accuracy"]),
            "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
            **{k: getattr(args, k) for k in TEACHER_KEYS}}
    # hf_px.json holds the record, so the model and its accuracy appear together (atomic folder rename) or not at all
    save_pretrained(out.model, folder, card=False, metadata={"teacher": info})
    print(f"{dataset} seed {seed}: dense teacher {info['dense_accuracy']:.4f} ({info['wall_s']:.0f} s), "
          f"cached in {folder}", flush=True)
    return out.model.eval(), info


def run_cell(args: argparse.Namespace, dataset: str, method: str, sparsity: float, seed: int, splits: Splits,
             tokenizer: Any, pretrained: Pretrained, teacher: nn.Module, teacher_info: dict[str, Any]) -> dict[str, Any]:
    """Prune, distil from ``teacher`` (``teacher_info``: its record from :func:`get_teacher`), evaluate one cell."""
    train, ev = splits
    wall, cpu = time.perf_counter(), time.process_time()
    # the cached teacher is frozen; its pruned copy must train
    model = copy.deepcopy(teacher).requires_grad_(True) if args.source == "teacher" else pretrained(seed)
    batches = calibration_batches(train, tokenizer, per_class=args.per_class, batch_size=16,
                                  max_length=args.max_length, seed=seed)
    final = prune_config(method, sparsity=sparsity, rounds=args.rounds, seed=seed,
                         min_density_ratio=args.min_density_ratio)
    gradual = None
    if args.schedule == "gradual":
        # one-shot to the starting sparsity (if any), the rest while fine-tuning on the same calibration batches
        gradual = GradualConfig(prune=final, initial_sparsity=args.initial_sparsity, every=args.gradual_every,
                                end=args.gradual_end)
        first = dataclasses.replace(final, sparsity=args.initial_sparsity)
        result = hf_px.prune(model, batches, first, progress=False) if args.initial_sparsity > 0 else model
    else:
        result = hf_px.prune(model, batches, final, progress=False)
    prune_s = time.perf_counter() - wall
    distill = DistillConfig(teacher=teacher, temperature=args.temperature, alpha=args.alpha)
    out = finetune(result, train, ev, finetune_config(args, seed, distill, gradual), tokenizer=tokenizer,
                   calibration=batches if gradual is not None else None)
    accuracy, dense_accuracy = float(out.metrics["eval_accuracy"]), teacher_info["dense_accuracy"]
    return {"dataset": dataset, "source": args.source, "recipe": args.recipe, "method": method,
            "sparsity": sparsity, "seed": seed, "accuracy": accuracy, "dense_accuracy": dense_accuracy,
            "retained": accuracy / dense_accuracy, "achieved_sparsity": (1.0 - out.sparsity["density_after"]) if gradual is not None
            else result.report["achieved_sparsity"],
            **recipe_params(args), "data_source": teacher_info["data_source"], "train_examples": len(train),
            "eval_examples": len(ev),
            "prune_wall_s": prune_s, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
            "torch_threads": torch.get_num_threads()}


def grid(args: argparse.Namespace) -> list[tuple[str, float]]:
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    bad = [s for s in sparsities if math.isnan(s) or not 0 < s < 1]
    if bad:
        raise SystemExit(f"--sparsities: {bad} not in (0, 1)")
    try:  # PruneConfig's own check, before any data is read
        hf_px.PruneConfig(min_density_ratio=args.min_density_ratio)
    except ValueError as err:
        raise SystemExit(f"--min-density-ratio: {err}") from None
    return [(m, s) for s in sparsities for m in args.methods.split(",") if m]


def run_grid(args: argparse.Namespace, splits: dict[str, Splits], tokenizer: Any, pretrained: Pretrained,
             sources: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every missing cell of ``splits`` x seeds x methods x sparsities; ``--out`` is rewritten after each."""
    out = Path(args.out)
    records = load_records(out)
    check_recipe(records, args)
    done = {cell_key(r) for r in records}
    cells = grid(args)
    for dataset, data in splits.items():
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            base = {"dataset": dataset, "source": args.source, "recipe": args.recipe, "seed": seed}
            todo = [(m, s) for m, s in cells if cell_key({**base, "method": m, "sparsity": s}) not in done]
            if len(todo) < len(cells):
                print(f"{dataset} seed {seed}: {len(cells) - len(todo)} cells already in {out}, skipped", flush=True)
            if not todo:
                continue  # no teacher needed: a finished grid costs nothing to re-run
            source = (sources or {}).get(dataset, dataset)
            teacher, info = get_teacher(args, dataset, source, seed, data, tokenizer, pretrained)
            for method, sparsity in todo:
                record = run_cell(args, dataset, method, sparsity, seed, data, tokenizer, pretrained, teacher, info)
                records.append(record)
                save_records(out, records)
                done.add(cell_key(record))
                print(f"{dataset} {method} {sparsity:.0%} seed {seed}: accuracy {record['accuracy']:.4f} "
                      f"(dense {record['dense_accuracy']:.4f}, kept {record['retained']:.1%}; "
                      f"{record['cpu_s']:.0f} CPU s, {record['wall_s']:.0f} s)", flush=True)
    return records


def with_dense(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` plus one ``dense`` record (sparsity 0) per (dataset, source, recipe, seed), from its teacher."""
    dense = {}
    for r in records:
        dense[(r["dataset"], r["source"], r["recipe"], r["seed"])] = {
            "dataset": r["dataset"], "source": r["source"], "recipe": r["recipe"], "seed": r["seed"],
            "method": "dense", "sparsity": 0.0, "accuracy": r["dense_accuracy"], "retained": 1.0}
    return list(records) + list(dense.values())


def summary(records: list[dict[str, Any]], plot_path: Path | None = None) -> str:
    """Markdown: per (recipe, source), accuracy and % of dense kept, mean ± std over seeds; writes the plot."""
    parts = []
    for recipe, source in sorted({(r["recipe"], r["source"]) for r in records}):
        group = with_dense([r for r in records if (r["recipe"], r["source"]) == (recipe, source)])
        head = f"### recipe {recipe}, pruned from the {source} weights"
        parts.append(f"{head}: accuracy (%), mean ± std over seeds\n\n{markdown_table(group, 'accuracy')}")
        parts.append(f"{head}: % of dense accuracy kept\n\n{markdown_table(group, 'retained')}")
    text = "\n\n".join(parts)
    if plot_path is not None and records:
        text += "\n\n" + plot(plot_records(records), plot_path, key="retained", panel=lambda r: r["panel"])
    return text


# what the plot shows, by (recipe, source): the panel's budget and the line's label; the tables show every recipe
SMALL, LARGE = "2,000 examples", "large budget, gradual from the teacher"
PLOT_VARIANTS = {("demo-e1", "pretrained"): (SMALL, "{}"), ("demo-e1", "teacher"): (SMALL, "{} from teacher"),
                 ("demo-e1-gradual", "pretrained"): (SMALL, "{} gradual"),
                 ("demo-e1-gradual", "teacher"): (SMALL, "{} teacher + gradual"),
                 ("full20k-e1-gradual", "teacher"): (LARGE, "{}"), ("full8k-e1-gradual", "teacher"): (LARGE, "{}")}


def plot_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Share of dense kept, one panel per (dataset, budget): the small-budget grid with PX's variants as their own
    lines, and the large-budget recipe's methods."""
    chosen = [r for r in records if (r["recipe"], r["source"]) in PLOT_VARIANTS] or records
    out = []
    for r in with_dense(chosen):
        budget, name = PLOT_VARIANTS.get((r["recipe"], r["source"]), (r["recipe"], "{}"))
        out.append({**r, "method": "dense" if r["method"] == "dense" else name.format(r["method"]),
                    "panel": f"{r['dataset']}, {budget}"})
    return out


def dataset_source(name: str, sst2: str) -> tuple[str, str | None]:
    """(what load_dataset_any reads, Hub config) of a dataset name."""
    if name in BUILTIN:
        return BUILTIN[name], None
    if name != "sst2":
        raise SystemExit(f"--datasets: unknown dataset {name!r}; choose rt or sst2")
    if os.path.exists(os.path.expanduser(sst2)) or ":" not in sst2:
        return sst2, None
    hub_id, config = sst2.rsplit(":", 1)
    return hub_id, config


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.source not in SOURCES:
        raise SystemExit(f"--source must be one of {SOURCES}")
    out = Path(args.out)
    if not args.summary_only:
        from hf_px.builtin import minilm_path
        from hf_px.modeling import load_model, load_processor

        torch.set_num_threads(args.threads)
        model_path = minilm_path() if args.model == PACKAGED else args.model
        grid(args)  # a bad --sparsities fails before any data is read
        check_recipe(load_records(out), args)
        splits, sources = {}, {}
        for name in [d for d in args.datasets.split(",") if d]:
            source, config = dataset_source(name, args.sst2)
            sources[name] = source + (f":{config}" if config else "")
            splits[name] = load_splits(source, args.train_size, args.eval_size, config)
        tokenizer = load_processor(model_path)
        n_labels = {name: len(set(train["label"])) for name, (train, _) in splits.items()}

        def pretrained_for(dataset: str) -> Pretrained:
            def load(seed: int) -> nn.Module:
                torch.manual_seed(seed)  # the new head: the same for every method of a seed
                return load_model(model_path, "sequence-classification", num_labels=n_labels[dataset])
            return load

        for name in splits:  # one dataset at a time: each has its own label count
            run_grid(args, {name: splits[name]}, tokenizer, pretrained_for(name), sources)
    records = load_records(out)
    print(summary(records, Path(args.plot)) if records else f"no records in {out}")


if __name__ == "__main__":
    main()
