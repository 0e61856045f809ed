"""``hf-px prune``: load a checkpoint, draw calibration batches, prune, save atomically."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import PruneConfig
from ..folders import check_output_folder, local_inputs
from ..pruning.scoring import SCORERS

EPILOG = """examples:
  hf-px prune --model ./minilm --dataset builtin:rotten_tomatoes --sparsity 0.9 --output-dir out/
  hf-px prune --model bert-base-uncased --dataset glue --dataset-config sst2 --text-column sentence \\
      --sparsity 0.8 --rounds 50 --output-dir out/
"""


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="Hub id or local checkpoint folder (config.json + safetensors).")
    g.add_argument("--task", default="auto", choices=["auto", "sequence-classification", "image-classification",
                                                      "causal-lm", "features"],
                   help="head to load with the Auto classes; 'auto' reads config.architectures (default: auto).")
    g.add_argument("--num-labels", type=int, default=None,
                   help="number of classes for a classification head (default: read from the dataset's labels).")
    g.add_argument("--tokenizer", default=None, help="tokenizer/processor location if not next to the model.")
    g.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load (dequantized to float32).")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint.")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (*.bin) weights; refused by default because pickle can run code.")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument("--dataset", default="builtin:rotten_tomatoes",
                   help="builtin:rotten_tomatoes | builtin:tweets | a csv/tsv/json/jsonl/parquet file or folder | "
                        "a Hub dataset id (default: builtin:rotten_tomatoes).")
    g.add_argument("--dataset-config", default=None, help="Hub dataset configuration name (e.g. sst2 for glue).")
    g.add_argument("--split", default="train", help="split to draw calibration examples from (default: train).")
    g.add_argument("--text-column", default=None, help="text column (default: detected: text, sentence, ...).")
    g.add_argument("--label-column", default="label", help="label column (default: label).")
    g.add_argument("--image-column", default=None, help="image column for vision models (default: detected).")
    g.add_argument("--per-class", type=int, default=10,
                   help="class-balanced examples per class, as in the PX paper (default: 10).")
    g.add_argument("--num-batches", type=int, default=None,
                   help="unlabelled data: number of batches to draw instead of --per-class.")
    g.add_argument("--batch-size", type=int, default=16, help="calibration batch size (default: 16).")
    g.add_argument("--max-length", type=int, default=128, help="token truncation length (default: 128).")


def register(sub: argparse._SubParsersAction) -> None:
    methods = "; ".join(f"{name}: {cls.description}" for name, cls in sorted(SCORERS.items()))
    p = sub.add_parser(
        "prune", help="prune a checkpoint to a target sparsity with PX (or a baseline)",
        description="Prune the block matrices of a Hugging Face checkpoint to a target sparsity. Scores are "
        "recomputed over --rounds rounds with density d^(r/R) and one global threshold; embeddings, norms, "
        "biases, pooler and heads stay dense. The result is saved atomically to --output-dir.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--method", default="px", choices=sorted(SCORERS), help=f"scoring method (default: px). {methods}")
    g.add_argument("--sparsity", type=float, default=0.9, help="fraction of prunable weights to remove, in [0, 1).")
    g.add_argument("--rounds", type=int, default=100, help="iterative rounds, density d^(r/R) (default: 100).")
    g.add_argument("--qk-score", default="ntk_diag", choices=["ntk_diag", "magnitude"],
                   help="PX: how Q/K (off-path) are ranked inside their block (default: ntk_diag).")
    g.add_argument("--a-gate", default="secant", choices=["secant", "bound"],
                   help="PX: data-side gate for smooth activations (default: secant).")
    g.add_argument("--b-length", type=int, default=None,
                   help="PX on encoders: B-pass length, the weight of attention paths against skip/MLP paths "
                   "(default: the calibration set's mean real length; 1: no token-route factor).")
    g.add_argument("--min-density-ratio", type=float, default=0.1,
                   help="layer-collapse guard: each matrix keeps >= ratio x round density (0 disables; default 0.1).")
    g.add_argument("--generic", action="store_true",
                   help="prune an unregistered architecture: every Linear in its repeated blocks (NTK-diagonal scores).")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling, probes and random scores (default: 0).")
    c = p.add_argument_group("PCN width reduction (applied before pruning; off unless one of these is given)")
    c.add_argument("--pcn-variance", type=float, default=None,
                   help="keep the principal components reaching this explained variance, in (0, 1] (e.g. 0.99).")
    c.add_argument("--pcn-width", type=float, default=None,
                   help="keep this width instead: an integer, or a fraction of the layer width in (0, 1).")
    c.add_argument("--pcn-mode", default="structured", choices=["structured", "projection"],
                   help="structured: FFN neurons selected, stock from_pretrained reloads it; projection: frozen "
                        "per-block Q/K/V basis (BERT family, registered pcn_bert class) (default: structured).")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", required=True, help="folder to write the pruned checkpoint to.")
    o.add_argument("--format", default="dense", choices=["dense", "sparse"],
                   help="dense: stock safetensors with zeros; sparse: packed values + bitmasks (default: dense).")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing hf-px checkpoint in --output-dir (a folder holding hf_px.json); "
                        "folders with other files, or holding the input, are never replaced.")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars.")
    add_push_args(o)
    p.set_defaults(func=run)


def add_push_args(group) -> None:
    group.add_argument("--push-to-hub", action="store_true",
                       help="after saving, upload the folder as one commit (token: HF_TOKEN; endpoint: HF_ENDPOINT).")
    group.add_argument("--hub-model-id", default=None, help="repo id to push to, e.g. user/minilm-px90.")
    group.add_argument("--hub-private", action="store_true", help="create the Hub repo as private.")


def check_push_args(args: argparse.Namespace) -> None:
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push-to-hub needs --hub-model-id (e.g. --hub-model-id user/minilm-px90).")
    if args.push_to_hub:
        from ..export.hub import check_repo_id

        check_repo_id(args.hub_model_id, "--hub-model-id")


def push_if_asked(args: argparse.Namespace, folder) -> None:
    if args.push_to_hub:
        from ..export.hub import push_to_hub

        url = push_to_hub(str(folder), args.hub_model_id, private=args.hub_private)
        print(f"pushed to {url}")


def check_output_dir(path: str, overwrite: bool, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse an output folder that is not safe to write or replace, before any work is done."""
    check_output_folder(path, flag="--output-dir", kind="prune", overwrite=overwrite, inputs=local_inputs(*inputs))


def pcn_config(args: argparse.Namespace):
    """The PCNConfig the flags ask for, or None."""
    if args.pcn_variance is None and args.pcn_width is None:
        return None
    from ..pcn import PCNConfig

    width = args.pcn_width
    if width is not None and width >= 1:
        width = int(width)
    return PCNConfig(variance=args.pcn_variance if width is None else None, width=width, mode=args.pcn_mode)


def _checked_calibration_data(args: argparse.Namespace, ds: Any) -> tuple[Any, Any]:
    """The calibration split with labels as ids of one map, and that map; refused (before any model is loaded)
    for missing text or labels the head cannot hold, with the same checks as ``hf-px run``."""
    from ..data import check_text_rows, resolve_columns
    from ..data.labels import checkpoint_label_names, encode_labels, infer_num_labels, trained_head
    from ..modeling import CLASSIFICATION_TASKS, task_from_config

    text, label, image = resolve_columns(ds, args.text_column, args.label_column, args.image_column)
    if text is not None and image is None:
        check_text_rows(ds, text, args.split, fix="remove them from the data (hf-px prune cannot skip them)")
    ckpt = _checkpoint_config(args)
    task = args.task if args.task != "auto" or ckpt is None else task_from_config(ckpt)
    if label is None or task not in (*CLASSIFICATION_TASKS, "auto"):
        return ds, None
    head = trained_head(ckpt)
    labels = infer_num_labels(ds, label, num_labels=args.num_labels, head_labels=head,
                              names=checkpoint_label_names(ckpt) if head else None, train_split=args.split)
    return encode_labels(ds, labels), labels


def _checkpoint_config(args: argparse.Namespace) -> Any:
    """The checkpoint's config (metadata only), or None where it cannot be read before loading."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code,
                                                       gguf_file=args.gguf_file)
    except (OSError, ValueError):
        return None  # load_model reports it with its own message


def run(args: argparse.Namespace) -> int:
    config = PruneConfig(pcn=pcn_config(args), method=args.method, sparsity=args.sparsity, rounds=args.rounds, qk_score=args.qk_score,
                         a_gate=args.a_gate, b_length=args.b_length, min_density_ratio=args.min_density_ratio, generic=args.generic,
                         seed=args.seed)
    check_output_dir(args.output_dir, args.overwrite, (args.model, args.tokenizer, args.dataset))
    check_push_args(args)
    from ..data import calibration_batches, load_dataset_any
    from ..data.labels import set_label_names
    from ..modeling import check_model_source, load_model, load_processor
    from ..pruning.loop import prune

    check_model_source(args.model, allow_pickle=args.allow_pickle)
    dataset = load_dataset_any(args.dataset, config_name=args.dataset_config, split=args.split, seed=args.seed)
    ds, labels = _checked_calibration_data(args, dataset[args.split])
    model = load_model(args.model, args.task, labels.num_labels if labels else args.num_labels,
                       trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                       gguf_file=args.gguf_file)
    if type(model).__name__.endswith(("ForSequenceClassification", "ForImageClassification")):
        set_label_names(model.config, labels)  # the saved checkpoint names its classes as the data do
    task = "image-classification" if "ImageClassification" in type(model).__name__ else "text"
    processor = load_processor(args.tokenizer or args.model, task, gguf_file=args.gguf_file)
    batches = calibration_batches(ds, processor, per_class=args.per_class if args.num_batches is None else None,
                                  num_batches=args.num_batches, batch_size=args.batch_size,
                                  text_column=args.text_column, label_column=args.label_column,
                                  image_column=args.image_column, max_length=args.max_length, seed=args.seed)
    result = prune(model, batches, config, tokenizer=processor, progress=not args.no_progress)
    result.report["calibration"].update(dataset=args.dataset, per_class=args.per_class)
    result.report["base_model"] = args.model
    print(result.report)
    folder = result.save_pretrained(args.output_dir, format=args.format)
    print(f"\nsaved the pruned checkpoint to {folder} (report in {Path(folder) / 'hf_px.json'})")
    push_if_asked(args, folder)
    return 0
