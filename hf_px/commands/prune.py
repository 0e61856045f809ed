"""``hf-px prune``: the pipeline's calibrate (+ PCN) + prune + save stages, the checkpoint published to one folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..pipeline.config import TASKS
from ..pipeline.table import folders
from ..pruning.scoring import SCORERS
from .flags import ConfigHelpFormatter, add_flags, discard, flag, run_stages

HELP = "prune a checkpoint to a target sparsity with PX (or a baseline)"
EPILOG = """examples:
  hf-px prune --model builtin:minilm --dataset builtin:rotten_tomatoes --sparsity 0.9 --output-dir out/
  hf-px prune --model bert-base-uncased --dataset glue --dataset-config sst2 --text-column sentence \\
      --sparsity 0.8 --rounds 50 --output-dir out/
"""

# the Hub flags of every command (hf-px push too): --hub-* as in transformers' TrainingArguments
PUSH = (flag("--push-to-hub", "push.enabled", const=True),
        flag("--hub-model-id", "push.hub_model_id", aliases=("--repo-id",)),
        flag("--hub-private", "push.private", const=True, aliases=("--private",)))
GROUPS = {
    "model": (
        flag("--model", "model.name_or_path", required=True), flag("--task", "model.task", choices=TASKS),
        flag("--num-labels", "model.num_labels"), flag("--tokenizer", "model.tokenizer"),
        flag("--gguf-file", "model.gguf_file"), flag("--trust-remote-code", "model.trust_remote_code", const=True),
        flag("--allow-pickle", "model.allow_pickle", const=True)),
    "calibration data": (
        flag("--dataset", "data.dataset"), flag("--dataset-config", "data.dataset_config"),
        flag("--train-split", "data.train_split", aliases=("--split",)), flag("--text-column", "data.text_column"),
        flag("--label-column", "data.label_column"), flag("--image-column", "data.image_column"),
        flag("--per-class", "data.per_class"), flag("--num-batches", "data.num_batches"),
        # --batch-size is the training batch in hf-px finetune; calibration batches get their own name
        flag("--calibration-batch-size", "data.calibration_batch_size", aliases=("--batch-size",)),
        flag("--max-length", "data.max_length"),
        flag("--drop-empty-text", "data.drop_empty_text", const=True)),
    "pruning": (
        flag("--method", "prune.method", choices=sorted(SCORERS)), flag("--sparsity", "prune.sparsity"), flag("--rounds", "prune.rounds"),
        flag("--qk-score", "prune.options.qk_score", choices=("ntk_diag", "magnitude")),
        flag("--a-gate", "prune.options.a_gate", choices=("secant", "bound")),
        flag("--b-length", "prune.options.b_length"), flag("--min-density-ratio", "prune.min_density_ratio"),
        flag("--generic", "prune.generic", const=True), flag("--seed", "prune.seed", "data.seed")),
    "PCN width reduction (applied before pruning; off unless one of these is given)": (
        flag("--pcn-variance", "pcn.variance"), flag("--pcn-width", "pcn.width"),
        flag("--pcn-mode", "pcn.mode", choices=("structured", "projection"))),
    "output": (
        flag("--output-dir", "output.model_dir", required=True,
             help="the folder the pruned checkpoint is written to, renamed into place once complete: new, empty, "
             "or an earlier hf-px checkpoint with --overwrite."),
        flag("--format", "output.format", choices=("dense", "sparse")),
        flag("--overwrite", "output.overwrite", const=True), *PUSH),
}
FLAGS = tuple(f for group in GROUPS.values() for f in group)


def register(sub: argparse._SubParsersAction) -> None:
    methods = "\n".join(f"  {name}: {cls.description}" for name, cls in sorted(SCORERS.items()))
    p = sub.add_parser(
        "prune", help=HELP,
        description="Prune the block matrices of a Hugging Face checkpoint to a target sparsity. Scores are "
        "recomputed over --rounds rounds with density d^(r/R) and one global threshold; embeddings, norms, "
        "biases, pooler and heads stay dense. The result is saved atomically to --output-dir. Each flag sets the "
        "hf-px run config key in brackets, whose documentation is its help.",
        epilog=f"methods:\n{methods}\n\n{EPILOG}", formatter_class=ConfigHelpFormatter,
    )
    add_flags(p, GROUPS)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars.")
    p.set_defaults(func=run, flags=FLAGS)


def run(args: argparse.Namespace) -> int:
    # the command has no fine-tuning, evaluation or plots: a run config with those stages off
    config = {"model": {"name_or_path": args.model}, "prune": {}, "finetune": None, "evaluate": {"enabled": False},
              "report": {"plots": False}}
    result = run_stages(args, FLAGS, config)
    if not result.is_main_process:
        return 0
    folder = result.model_dir
    print(f"\nsaved the pruned checkpoint to {folder} (report in {Path(folder) / 'hf_px.json'})")
    push = result.output_dir / folders()["push"] / "push.json"
    if push.exists():
        print(f"pushed to {json.loads(push.read_text())['url']}")
    discard(result)
    return 0
