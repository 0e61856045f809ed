"""``hf-px finetune``: fine-tune a pruned checkpoint with its masks held fixed.

Example:
    hf-px finetune --model out/ --dataset builtin:rotten_tomatoes --epochs 3 --output-dir ft/
    accelerate launch --config_file scripts/configs/accelerate_cpu2.yaml scripts/finetune.py --model out/ ...
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

EVAL_SPLITS = ("validation", "dev", "test", "eval")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options shared by ``hf-px finetune`` and ``scripts/finetune.py``."""
    p.add_argument("--model", required=True, help="checkpoint folder (dense or sparse hf_px save) or Hub id")
    p.add_argument("--dataset", required=True,
                   help="builtin:rotten_tomatoes, builtin:tweets, a .csv/.tsv/.json/.parquet file or folder, or a Hub id")
    p.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default=None, help=f"default: the first of {', '.join(EVAL_SPLITS)} present")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--task", choices=("auto", "classification", "causal-lm"), default="auto",
                   help="auto: the checkpoint's architecture; a bare encoder gets a sequence-classification head")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: bf16/fp16 on a GPU that supports it, else no")
    p.add_argument("--eval-every", type=int, default=None, help="optimizer steps between evaluations")
    p.add_argument("--save-every", type=int, default=None, help="optimizer steps between checkpoints")
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--peft", choices=("lora",), default=None)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--no-merge", action="store_true", help="save the LoRA adapters instead of the merged model")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="metric names (accuracy, f1, perplexity) or evaluate script paths")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default="label")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classes of the classification head (default: the training split's); set it to replace a "
                        "trained head that has another number of labels")
    p.add_argument("--log-with", nargs="+", default=["jsonl"], choices=("jsonl", "tensorboard"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (*.bin) weights; refused by default because pickle can run code.")
    from .prune import add_push_args

    add_push_args(p)
    return p


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a pruned checkpoint with its masks held fixed",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from ..config import FinetuneConfig

    return FinetuneConfig(
        epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
        seed=args.seed, mixed_precision=args.mixed_precision, eval_every=args.eval_every,
        save_every=args.save_every, save_total_limit=args.save_total_limit, log_every=args.log_every,
        output_dir=args.output_dir, resume=args.resume, peft=args.peft, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, merge_lora=not args.no_merge,
        metrics=tuple(args.metrics) if args.metrics else None, max_length=args.max_length,
        text_column=args.text_column, label_column=args.label_column, log_with=tuple(args.log_with),
        progress_bar=not args.no_progress,
    )


def _splits(args: argparse.Namespace):
    from ..data import load_dataset_any

    dd = load_dataset_any(args.dataset, config_name=args.dataset_config, seed=args.seed)
    if args.train_split not in dd:
        raise ValueError(f"dataset {args.dataset!r} has no split {args.train_split!r} (splits: {', '.join(dd)}); "
                         "choose one with --train-split")
    train = dd[args.train_split]
    if args.eval_split is not None and args.eval_split not in dd:
        raise ValueError(f"dataset {args.dataset!r} has no split {args.eval_split!r} (splits: {', '.join(dd)})")
    eval_name = args.eval_split or next((s for s in EVAL_SPLITS if s in dd), None)
    evals = dd[eval_name] if eval_name else None
    if args.max_train_samples:
        train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
    if evals is not None and args.max_eval_samples:
        evals = evals.select(range(min(args.max_eval_samples, len(evals))))
    return train, evals, eval_name


def _causal(args: argparse.Namespace, cfg: Any) -> bool:
    archs = getattr(cfg, "architectures", None) or []
    return args.task == "causal-lm" or (args.task == "auto" and any("CausalLM" in a or "LMHead" in a for a in archs))


def check_data(args: argparse.Namespace, cfg: Any, train: Any, evals: Any, eval_name: str | None):
    """(train, eval, Labels or None): both splits with labels as ids of the training split's one map; missing text
    and labels the head cannot hold are refused before any model is loaded, with the checks of ``hf-px run``."""
    from ..data import check_text_rows, resolve_columns
    from ..data.labels import checkpoint_label_names, encode_labels, infer_num_labels, trained_head

    causal = _causal(args, cfg)
    text, label, _ = resolve_columns(train, args.text_column, None if causal else args.label_column)
    if text is not None:
        for name, split in ((args.train_split, train), (eval_name, evals)):
            if split is not None:
                check_text_rows(split, text, name, fix="remove them from the data (hf-px finetune cannot skip them)")
    if causal or label is None:
        return train, evals, None
    head = trained_head(cfg)
    labels = infer_num_labels(train, label, evals, num_labels=args.num_labels,
                              head_labels=head if args.task == "auto" else None,  # classification: a new head
                              names=checkpoint_label_names(cfg) if head else None, min_classes=2,
                              train_split=args.train_split, eval_split=str(eval_name))
    return encode_labels(train, labels), encode_labels(evals, labels) if evals is not None else None, labels


def load_model(args: argparse.Namespace, cfg: Any, labels: Any = None):
    """The checkpoint as a trainable model (a classification head is added to a bare encoder) + tokenizer."""
    import transformers

    from ..data.labels import set_label_names
    from ..export.serialization import load

    archs = getattr(cfg, "architectures", None) or []
    has_head = any(("For" in a or "LMHead" in a) for a in archs)
    num_labels = labels.num_labels if labels is not None else args.num_labels
    kwargs: dict[str, Any] = {}
    if _causal(args, cfg):
        task_class = transformers.AutoModelForCausalLM
    elif args.task == "classification" or not has_head or args.num_labels is not None:
        task_class = transformers.AutoModelForSequenceClassification
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
    else:
        task_class = None
    seq_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if task_class is transformers.AutoModelForSequenceClassification and seq_head:
        if getattr(cfg, "num_labels", None) == kwargs.get("num_labels"):
            task_class, kwargs = None, {}  # keep the trained head
        else:
            kwargs["ignore_mismatched_sizes"] = True  # a head trained for other labels is replaced by a new one
    if not getattr(args, "allow_pickle", False):
        kwargs["use_safetensors"] = True  # never fall back to a *.bin next to (or instead of) the safetensors
    model = load(args.model, task_class=task_class, **kwargs)
    if type(model).__name__.endswith("ForSequenceClassification"):
        set_label_names(model.config, labels)  # the saved model names its classes as the training split does
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def check_output_dir(args: argparse.Namespace) -> None:
    """A new or empty --output-dir, or (with --resume) one holding an earlier fine-tune run; never the input.

    Every process checks before the process group starts, so no rank has written anything yet.
    """
    from ..folders import check_output_folder, local_inputs

    check_output_folder(args.output_dir, flag="--output-dir", kind="finetune", resume=args.resume,
                        inputs=local_inputs(args.model, args.dataset))


def run(args: argparse.Namespace) -> int:
    from ..finetuning.loop import finetune
    from ..modeling import check_model_source
    from ..pruning.masks import masks_from_model
    from .prune import check_push_args, push_if_asked

    check_push_args(args)
    config = config_from_args(args)
    check_output_dir(args)
    # before anything is loaded: a missing folder fails here (not as a Hub-id error), and so do pickle-only weights
    check_model_source(args.model, allow_pickle=args.allow_pickle)
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(args.model)
    train, evals, labels = check_data(args, cfg, *_splits(args))
    model, tokenizer = load_model(args, cfg, labels)
    # masks are the checkpoint's zeros; new heads are outside the prunable set and stay dense
    out = finetune(model, train, evals, config, tokenizer=tokenizer, masks=masks_from_model(model))
    if out.world_size == 1 or int(os.environ.get("RANK", "0")) == 0:
        summary = {"output_dir": os.path.abspath(args.output_dir), "steps": out.global_step,
                   "world_size": out.world_size, "metrics": out.metrics,
                   "density": out.sparsity.get("density_after", out.sparsity.get("density_before"))}
        print(json.dumps(summary, indent=2))
        if out.output_dir:
            push_if_asked(args, os.path.join(out.output_dir, "model"))
    return 0
