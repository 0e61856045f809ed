"""``hf-px run CONFIG``: the whole pipeline from one YAML/JSON file, resumable, one folder per stage.

Every config key is also a flag (``--prune.sparsity 0.8``; values are read as YAML, so ``null``, ``true`` and
lists work). Flags of ``hf-px prune`` / ``hf-px finetune`` map onto keys as listed in ``FLAG_KEYS``.

examples:
  hf-px run scripts/configs/tiny-smoke.yaml --output.output_dir runs/smoke
  hf-px run scripts/configs/minilm-rotten-tomatoes.yaml --prune.sparsity 0.9 --force
  accelerate launch --config_file scripts/configs/accelerate_cpu2.yaml -m hf_px run scripts/configs/tiny-smoke.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any

# hf-px prune / hf-px finetune flag -> run config key (the flag <-> key map a test keeps complete)
FLAG_KEYS = {
    "prune": {
        "--model": "model.name_or_path", "--task": "model.task", "--num-labels": "model.num_labels",
        "--tokenizer": "model.tokenizer", "--gguf-file": "model.gguf_file",
        "--trust-remote-code": "model.trust_remote_code", "--allow-pickle": "model.allow_pickle",
        "--dataset": "data.dataset", "--dataset-config": "data.dataset_config", "--split": "data.train_split",
        "--text-column": "data.text_column", "--label-column": "data.label_column",
        "--image-column": "data.image_column", "--per-class": "data.per_class", "--num-batches": "data.num_batches",
        "--batch-size": "data.calibration_batch_size", "--max-length": "data.max_length",
        "--method": "prune.method", "--sparsity": "prune.sparsity", "--rounds": "prune.rounds",
        "--qk-score": "prune.qk_score", "--a-gate": "prune.a_gate", "--b-length": "prune.b_length",
        "--min-density-ratio": "prune.min_density_ratio",
        "--generic": "prune.generic", "--seed": "prune.seed", "--pcn-variance": "pcn.variance",
        "--pcn-width": "pcn.width", "--pcn-mode": "pcn.mode", "--output-dir": "output.output_dir",
        "--format": "output.format", "--overwrite": "--force", "--no-progress": "--no-progress",
        "--push-to-hub": "push.enabled", "--hub-model-id": "push.hub_model_id", "--hub-private": "push.private",
    },
    "finetune": {
        "--model": "model.name_or_path", "--dataset": "data.dataset", "--dataset-config": "data.dataset_config",
        "--train-split": "data.train_split", "--eval-split": "data.eval_split",
        "--max-train-samples": "data.max_train_samples", "--max-eval-samples": "data.max_eval_samples",
        "--task": "model.task", "--output-dir": "output.output_dir", "--epochs": "finetune.epochs",
        "--max-steps": "finetune.max_steps", "--learning-rate": "finetune.learning_rate",
        "--weight-decay": "finetune.weight_decay", "--batch-size": "finetune.batch_size",
        "--eval-batch-size": "finetune.eval_batch_size",
        "--gradient-accumulation-steps": "finetune.gradient_accumulation_steps",
        "--warmup-ratio": "finetune.warmup_ratio", "--max-grad-norm": "finetune.max_grad_norm",
        "--seed": "finetune.seed", "--mixed-precision": "finetune.mixed_precision",
        "--eval-every": "finetune.eval_every", "--save-every": "finetune.save_every",
        "--save-total-limit": "finetune.save_total_limit", "--log-every": "finetune.log_every",
        "--resume": "(automatic: a re-run resumes)", "--peft": "finetune.peft", "--lora-r": "finetune.lora_r",
        "--lora-alpha": "finetune.lora_alpha", "--lora-dropout": "finetune.lora_dropout",
        "--no-merge": "finetune.merge_lora", "--metrics": "evaluate.metrics", "--max-length": "data.max_length",
        "--text-column": "data.text_column", "--label-column": "data.label_column", "--num-labels": "model.num_labels",
        "--allow-pickle": "model.allow_pickle", "--log-with": "finetune.log_with", "--no-progress": "--no-progress", "--push-to-hub": "push.enabled",
        "--hub-model-id": "push.hub_model_id", "--hub-private": "push.private",
    },
}


def _arg_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` block (``a, b: text`` documents both)."""
    doc = cls.__doc__ or ""
    if "Args:" not in doc:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in doc.split("Args:", 1)[1].splitlines()[1:]:
        m = re.match(r"^\s{8}([\w, ]+):\s*(.*)$", line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2)
        elif line.startswith(" " * 12) and names:
            for n in names:
                out[n] += " " + line.strip()
        elif line.strip() and not line.startswith(" " * 8):
            break
    return out


def add_config_flags(p: argparse.ArgumentParser) -> None:
    from ..pipeline.config import SECTIONS, section_fields

    for section in SECTIONS:
        cls, _ = SECTIONS[section]
        docs = _arg_docs(cls)
        g = p.add_argument_group(f"{section} (config section; --{section}.KEY VALUE overrides the file)")
        for f in section_fields(section):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            text = docs.get(f.name, "")
            g.add_argument(f"--{section}.{f.name}", dest=f"key:{section}.{f.name}", default=argparse.SUPPRESS,
                           metavar="VALUE", help=f"{text} (default: {default!r})".strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline from a YAML/JSON config (resumable, one folder per stage)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML or JSON run config (examples: scripts/configs/*.yaml).")
    p.add_argument("--output-dir", default=None, help="run folder; same as --output.output_dir.")
    p.add_argument("--force", action="store_true", help="redo every stage, even complete ones.")
    p.add_argument("--check", action="store_true", help="validate the config and inputs, write nothing, exit.")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set prune.sparsity=0.8 (repeatable).")
    add_config_flags(p)
    p.set_defaults(func=run)


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {k[4:]: _value(v) for k, v in vars(args).items() if k.startswith("key:")}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. prune.sparsity=0.8), got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = _value(value)
    if args.output_dir is not None:
        out["output.output_dir"] = args.output_dir
    return out


def run(args: argparse.Namespace) -> int:
    from ..pipeline import ConfigError, RunConfig, RunError
    from ..pipeline import run as run_pipeline
    from ..pipeline.checks import check_run

    if args.no_progress:  # transformers' and datasets' own bars (loading, saving, map) as well
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        overrides = overrides_from_args(args)
        if args.check:
            cfg = RunConfig.from_file(args.config, overrides)
            plan = check_run(cfg)
            print(f"config OK: task {plan.task}, {len(plan.train)} training examples, "
                  f"{len(plan.eval) if plan.eval is not None else 0} evaluation examples; nothing written.")
            return 0
        result = run_pipeline(args.config, force=args.force, progress=not args.no_progress, overrides=overrides)
    except (ConfigError, RunError) as err:
        print(f"hf-px run: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if not result.is_main_process:
        return 0
    summary = ", ".join(f"{k}={v}" for k, v in result.stages.items())
    print(f"[hf-px run] finished: {summary}")
    if result.metrics:
        print("[hf-px run] metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    print(f"[hf-px run] report: {result.output_dir / 'report.md'}; model: {result.model_dir}")
    return 0
