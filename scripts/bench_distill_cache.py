"""Does caching the teacher's logits pay? Fine-tuning time with and without ``DistillConfig(cache_logits=True)``.

For each model family, three runs of the same fine-tuning (same pruned student, data and seed), interleaved and
repeated in one process so that the ratios compare like with like (absolute seconds depend on the machine's load):
``plain`` (no teacher), ``distill`` (teacher forward at every step) and ``cached`` (teacher logits cached per
example: epoch 1 fills the cache, later epochs read it). Reports medians of the first-epoch and later-epoch times,
the ratios to ``plain`` and ``distill``, the teacher forward passes and the cache's CPU memory.
Writes results/distill_cache.json.

Run:  .venv/bin/python scripts/bench_distill_cache.py [--families bert,llama] [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import datasets
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hf_px.finetuning.distill
from hf_px.finetuning.distill import DistillConfig
from hf_px.finetuning.loop import FinetuneConfig, finetune
from hf_px.pruning.masks import apply_masks
from hf_px.pruning.report import format_table
from hf_px.pruning.targets import collect_targets

MODES = ("plain", "distill", "cached")


def build(family: str, seed: int, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "bert":
        return BertForSequenceClassification(BertConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
            intermediate_size=4 * args.hidden, max_position_embeddings=args.length, num_labels=2))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=3 * args.hidden, max_position_embeddings=args.length,
            bos_token_id=0, eos_token_id=0, pad_token_id=0))
    raise ValueError(f"unknown family {family!r}; choose bert or llama.")


def pruned_student(family: str, args: argparse.Namespace) -> torch.nn.Module:
    model = build(family, 0, args)
    g = torch.Generator().manual_seed(1)
    apply_masks(model, {t.param_name: torch.rand(t.param.shape, generator=g) < 0.1 for t in collect_targets(model)})
    return model


def dataset(family: str, args: argparse.Namespace) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.length // 2, args.length + 1, (args.examples,), generator=g).tolist()
    ids = [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lengths]
    cols = {"input_ids": ids, "attention_mask": [[1] * n for n in lengths]}
    if family == "bert":
        cols["label"] = [row[0] % 2 for row in ids]
    return datasets.Dataset.from_dict(cols)


def one_run(family: str, mode: str, teacher: torch.nn.Module, data: datasets.Dataset,
            args: argparse.Namespace) -> dict:
    distill = None if mode == "plain" else DistillConfig(teacher=teacher, cache_logits=mode == "cached")
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, progress_bar=False, log_every=10**6,
                            distill=distill)
    built, calls = [], [0]
    original = hf_px.finetuning.distill.build_distiller

    def capture(*a, **k):  # the run's Distiller, for its cache counters
        d = original(*a, **k)
        built.append(d)
        return d

    hook = teacher.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    marks: list[tuple[int, float]] = []
    hf_px.finetuning.distill.build_distiller = capture
    try:
        out = finetune(pruned_student(family, args), data, config=config,
                       on_step=lambda step, rec: marks.append((rec["epoch"], time.perf_counter())))
    finally:
        hf_px.finetuning.distill.build_distiller = original
        hook.remove()
    ends = [t for _, t in sorted({epoch: t for epoch, t in marks}.items())]  # the last step of every epoch
    # the loop's own clock, so that epoch 1 excludes the setup (accelerator, data preparation, teacher loading)
    epoch_s = [out.extras["train_time_s"] - (ends[-1] - ends[0])] + [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
    distiller = built[0] if built and built[0] is not None else None
    return {"first_epoch_s": epoch_s[0], "later_epoch_s": statistics.mean(epoch_s[1:]) if len(epoch_s) > 1 else None,
            "total_s": sum(epoch_s), "teacher_forwards": calls[0],
            "cache_kib": distiller.cache_bytes / 2**10 if distiller is not None else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="bert,llama")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--out", default="results/distill_cache.json")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2: the cache is read from the second epoch on.")
    torch.set_num_threads(args.threads)

    records, rows = [], []
    for family in args.families.split(","):
        teacher, data = build(family, 2, args), dataset(family, args)
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(args.repeats):  # interleaved: load drift hits every mode alike
            for mode in MODES:
                runs[mode].append(one_run(family, mode, teacher, data, args))
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("first_epoch_s", "later_epoch_s", "total_s")}
               for m, rs in runs.items()}
        for mode in MODES:
            rec = {"family": family, "mode": mode, **med[mode], "teacher_forwards": runs[mode][0]["teacher_forwards"],
                   "cache_kib": runs[mode][0]["cache_kib"], "runs": runs[mode],
                   "later_vs_plain": med[mode]["later_epoch_s"] / med["plain"]["later_epoch_s"],
                   "later_vs_distill": med[mode]["later_epoch_s"] / med["distill"]["later_epoch_s"],
                   "total_vs_distill": med[mode]["total_s"] / med["distill"]["total_s"]}
            records.append(rec)
            rows.append([family, mode, rec["first_epoch_s"], rec["later_epoch_s"], rec["later_vs_plain"],
                         rec["later_vs_distill"], rec["total_vs_distill"], rec["teacher_forwards"],
                         round(rec["cache_kib"], 1)])
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    setup["torch_threads"] = torch.get_num_threads()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": setup, "records": records}, indent=1) + "\n")
    print(format_table(["family", "mode", "epoch 1 s", "later epoch s", "later/plain", "later/distill",
                        "total/distill", "teacher fwd", "cache KiB"], rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
