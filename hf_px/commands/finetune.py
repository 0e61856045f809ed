"""hf-px finetune: the pipeline's finetune + evaluate + save stages on a pruned checkpoint, masks held fixed.

--model takes a checkpoint folder (e.g. the output of hf-px prune), a Hub id or builtin:minilm. --output-dir
gets the fine-tuning folder (checkpoints/step_N, logs/metrics.jsonl, model/, results.json); a run that was
stopped continues from its last checkpoint with --resume.

examples:
  hf-px finetune --model out/ --dataset builtin:rotten_tomatoes --epochs 3 --output-dir ft/
  accelerate launch --config_file scripts/configs/accelerate_cpu2.yaml scripts/finetune.py --model out/ ...
"""

from __future__ import annotations

import argparse
import json
import os

from ..pipeline.config import TASKS
from .flags import ConfigHelpFormatter, add_flags, discard, flag, run_stages
from .prune import PUSH

HELP = "fine-tune a pruned checkpoint with its masks held fixed"

GROUPS = {
    "model": (
        flag("--model", "model.name_or_path", required=True), flag("--task", "model.task", choices=TASKS),
        flag("--num-labels", "model.num_labels"), flag("--allow-pickle", "model.allow_pickle", const=True)),
    "data": (
        flag("--dataset", "data.dataset", required=True), flag("--dataset-config", "data.dataset_config"),
        flag("--train-split", "data.train_split"), flag("--eval-split", "data.eval_split"),
        flag("--max-train-samples", "data.max_train_samples"), flag("--max-eval-samples", "data.max_eval_samples"),
        flag("--text-column", "data.text_column"), flag("--label-column", "data.label_column"),
        flag("--max-length", "data.max_length"), flag("--drop-empty-text", "data.drop_empty_text", const=True)),
    "training": (
        flag("--epochs", "finetune.epochs"), flag("--max-steps", "finetune.max_steps"),
        flag("--learning-rate", "finetune.learning_rate"), flag("--weight-decay", "finetune.weight_decay"),
        flag("--batch-size", "finetune.batch_size"),
        flag("--gradient-accumulation-steps", "finetune.gradient_accumulation_steps"),
        flag("--warmup-ratio", "finetune.warmup_ratio"), flag("--max-grad-norm", "finetune.max_grad_norm"),
        flag("--seed", "finetune.seed", "data.seed"),
        flag("--mixed-precision", "finetune.mixed_precision", choices=("no", "fp16", "bf16")),
        flag("--eval-every", "finetune.eval_every"), flag("--log-every", "finetune.log_every"),
        flag("--log-with", "finetune.log_with", choices=("jsonl", "tensorboard"))),
    "LoRA": (
        flag("--peft", "finetune.peft", choices=("lora",)), flag("--lora-r", "finetune.lora_r"),
        flag("--lora-alpha", "finetune.lora_alpha"), flag("--lora-dropout", "finetune.lora_dropout"),
        flag("--no-merge", "finetune.merge_lora", const=False,
             help="keep the LoRA adapters in the saved model instead of merging them into the weights.")),
    "evaluation": (
        flag("--metrics", "evaluate.metrics"),
        flag("--eval-batch-size", "finetune.eval_batch_size", "evaluate.batch_size")),
    "output": (
        flag("--output-dir", "finetune.output_dir", required=True), flag("--resume", "finetune.resume", const=True),
        flag("--save-every", "finetune.save_every"), flag("--save-total-limit", "finetune.save_total_limit"),
        *PUSH),
}
FLAGS = tuple(f for group in GROUPS.values() for f in group)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_flags(p, GROUPS)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars.")
    p.set_defaults(func=run, flags=FLAGS)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    add_arguments(subparsers.add_parser(
        "finetune", help=HELP, description=__doc__,
        epilog="Each flag sets the hf-px run config key in brackets, whose documentation is its help.", formatter_class=ConfigHelpFormatter))


def run(args: argparse.Namespace) -> int:
    # the checkpoint was pruned already: a run config with calibration and pruning off, no plots
    config = {"model": {"name_or_path": args.model}, "prune": None, "finetune": {}, "report": {"plots": False}}
    result = run_stages(args, FLAGS, config)
    if not result.is_main_process:
        return 0
    ft = result.report.get("finetune") or {}
    sparsity = ft.get("sparsity") or {}
    print(json.dumps({"output_dir": os.path.abspath(args.output_dir), "steps": ft.get("steps"),
                      "world_size": ft.get("world_size"), "metrics": result.metrics,
                      "density": sparsity.get("density_after", sparsity.get("density_before"))}, indent=2))
    discard(result)
    return 0
