"""Speed benchmark: CPU latency of every way hf_px makes MiniLM smaller, each beside its accuracy after recovery.

Configurations (``--configs``, default all):

    dense        the dense teacher (bench_recovery's cached, fine-tuned MiniLM)
    px90         PX 90% unstructured sparsity, run with dense kernels
    px90-csr     the same weights loaded with ``hf_px.load(kernels="auto", batch_shape=...)``: CSR kernels in the
                 layers where they are faster, chosen again at every timed shape
    pcn50        structured PCN, every FFN cut to 0.5 of its width (no PX)
    pcn25        structured PCN to 0.25 (no PX)
    pcn50-px80   structured PCN to 0.5, then PX 80%
    blocks       the ``--remove-blocks`` blocks (3 of MiniLM's 6) that ``rank_blocks`` scores lowest with PX removed
    fast         the speed preset: ``plan_speed(model, SpeedConfig(target_speedup=2))``, ``apply_plan``, then PX 50%

Every configuration starts from the pretrained weights with a fresh head (seed 0), is shrunk/pruned on 10
calibration examples per class, then fine-tuned with bench_recovery's ``demo-e1`` recipe (builtin Rotten
Tomatoes, 2,000 training examples, 1 epoch, batch 32, lr 2e-4, max length 64, distilled from the dense teacher
with T=2, alpha=0.5 on the logits only: block removal makes hidden-state matching impossible, so no
configuration uses it) and evaluated on 1,000 held-out examples. The fine-tuned model is saved under
``--work-dir``/speed/ with its accuracy record in ``hf_px.json`` (one atomic folder), and ``--out`` is rewritten
at once; a re-run skips every configuration whose folder is there (the teacher cache is bench_recovery's, so
``--work-dir`` shared with it reuses its teacher).

Then the latency: for every shape (``--shapes``: batch-1 latency at 32 and 128 tokens, batch-32 throughput at 64)
all the configurations and the dense model are timed in ONE ``hf_px.speed.measure_latency`` call (calls
interleaved, order flipped every round, median of ``--runs``), so each ratio to dense comes from the same call
and a machine load that drifts touches every model alike. The absolute milliseconds move with the load; the
ratios are the result. ``--threads`` sets torch's intra-op threads for everything (1 by default: on a loaded
2-core machine two threads spin against each other).

    .venv/bin/python scripts/bench_speed.py --threads 1 --work-dir /work/runs/teachers
    .venv/bin/python scripts/bench_speed.py --summary-only          # the Markdown table from results/speed.json
    .venv/bin/python scripts/bench_speed.py --quick --work-dir /tmp/speed-smoke    # every step, tiny budget
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hf_px
from hf_px.data import calibration_batches
from hf_px.export.serialization import load, save_pretrained
from hf_px.finetuning.distill import DistillConfig
from hf_px.finetuning.loop import finetune
from hf_px.inference import example_inputs
from hf_px.registry import base_model_of, find_arch
from hf_px.speed.latency import measure_latency

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when imported from a test
import bench_recovery as recovery  # noqa: E402
from bench_quality import load_records, load_splits, prune_config, save_records  # noqa: E402
from speed_settings import (  # noqa: E402
    CONFIGS,
    TIMING_KEYS,
    config_list,
    model_dir,
    parse_shapes,
    recipe_id,
    recipe_params,
    recovery_args,
    speed_config,
)
from speed_settings import parse_args as parse_settings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_settings(argv, __doc__)


Pretrained = Callable[[int], nn.Module]  # seed -> the pretrained model with a freshly initialised head
Splits = tuple[Any, Any]


def shape_of(model: nn.Module) -> dict[str, Any]:
    """Blocks, FFN width, parameter counts and unstructured sparsity of ``model``."""
    spec = find_arch(model)
    blocks = len(spec.blocks(base_model_of(model))) if spec is not None else None
    ffn = int(getattr(model.config, spec.ffn_width_attr)) if spec is not None else None
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    return {"num_blocks": blocks, "ffn_width": ffn, "params": params, "nonzero_params": nonzero,
            "sparsity": float(hf_px.sparsity_report(model)["achieved_sparsity"])}


def shrink(name: str, args: argparse.Namespace, model: nn.Module, batches: list,
           pcn_batches: list | None = None) -> tuple[Any, dict[str, Any]]:
    """Apply configuration ``name`` to the pretrained ``model``: (model or PruneResult to fine-tune, record)."""
    from hf_px.pcn import PCNConfig, apply_pcn
    from hf_px.speed.plan import apply_plan, plan_speed
    from hf_px.structure import rank_blocks, remove_blocks

    spec, info = CONFIGS[name], {}
    before = shape_of(model)
    if spec.get("plan"):
        config = speed_config(args)
        plan = plan_speed(model, config)
        model, applied = apply_plan(model, plan, batches, pcn_batches=pcn_batches)
        info["plan"] = {"target_speedup": config.target_speedup, "shapes": [list(s) for s in config.shapes],
                        "runs": config.runs, **{k: v for k, v in plan.to_dict().items() if k != "candidates"}}
        info["plan"]["candidates_timed"] = len(plan.candidates)
        info["plan"]["removed"] = applied.get("removed", {}).get("removed", [])
    if spec.get("blocks"):
        count = args.remove_blocks if spec["blocks"] is True else spec["blocks"]
        if spec.get("order") == "top":  # the blocks nearest the head, the usual choice for BERT layer dropping
            n = before["num_blocks"]
            drop = list(range(n - count, n))
        else:
            ranking = rank_blocks(model, batches, method="px")
            drop = sorted(r["block"] for r in ranking[:count])
            info["block_ranking"] = [{"block": r["block"], "share": r["share"]} for r in ranking]
        info["removed"] = remove_blocks(model, drop)["removed"]
    if spec.get("pcn"):
        report = apply_pcn(model, batches, PCNConfig(width=spec["pcn"], mode="structured"))
        model = report.model if report.model is not None else model
        info["pcn_width"] = spec["pcn"]
    px = args.fast_sparsity if spec.get("px") == "fast" else spec.get("px")
    result: Any = model
    if px:
        result = hf_px.prune(model, batches, prune_config("px", sparsity=px, rounds=args.rounds, seed=args.seed),
                             progress=False)
        info["px_sparsity"] = px
    after = shape_of(model)
    info["blocks_removed"] = before["num_blocks"] - after["num_blocks"]
    info["ffn_fraction"] = after["ffn_width"] / before["ffn_width"]
    return result, info


def run_config(name: str, args: argparse.Namespace, dataset: str, splits: Splits, tokenizer: Any,
               pretrained: Pretrained, teacher: nn.Module, teacher_info: dict[str, Any], folder: Path
               ) -> dict[str, Any]:
    """Shrink/prune, distil from ``teacher``, evaluate and save configuration ``name``; returns its record."""
    train, ev = splits
    wall, cpu = time.perf_counter(), time.process_time()
    # *-teacher: shrink the fine-tuned teacher (its trained head included) instead of the pretrained weights
    model = (copy.deepcopy(teacher).requires_grad_(True) if CONFIGS[name].get("source") == "teacher"
             else pretrained(args.seed))
    batches = calibration_batches(train, tokenizer, per_class=args.per_class, batch_size=16,
                                  max_length=args.max_length, seed=args.seed)
    pcn_batches = None
    if CONFIGS[name].get("plan") and args.pcn_examples:
        pcn_batches = calibration_batches(train, tokenizer, per_class=None, num_batches=-(-args.pcn_examples // 16),
                                          batch_size=16, max_length=args.max_length, seed=args.seed)
    to_train, info = shrink(name, args, model, batches, pcn_batches)
    shrink_s = time.perf_counter() - wall
    # logits only, except the *-hidden configurations: each kept block also learns the output of the teacher
    # block it was
    hidden = CONFIGS[name].get("hidden", False)
    removed = set(info.get("removed") or info.get("plan", {}).get("removed") or [])
    kept = [i for i in range(shape_of(teacher)["num_blocks"]) if i not in removed]
    distill = DistillConfig(teacher=teacher, temperature=args.temperature, alpha=args.alpha,
                            hidden_weight=args.hidden_weight if hidden else 0.0, hidden_layers=kept if hidden else None)
    config = recovery.finetune_config(recovery_args(args), args.seed, distill)
    if CONFIGS[name].get("epochs"):  # a longer recovery for the student only; the teacher keeps the recipe's
        config = dataclasses.replace(config, epochs=CONFIGS[name]["epochs"], max_steps=None)
    out = finetune(to_train, train, ev, config, tokenizer=tokenizer)
    accuracy, dense_accuracy = float(out.metrics["eval_accuracy"]), float(teacher_info["dense_accuracy"])
    record = {"config": name, "dataset": dataset, "recipe": args.recipe, "accuracy": accuracy,
              "dense_accuracy": dense_accuracy, "retained": accuracy / dense_accuracy, **shape_of(out.model),
              **info, "distill": "logits + hidden" if hidden else "logits", **recipe_params(args), "data_source": teacher_info["data_source"],
              "train_examples": len(train), "eval_examples": len(ev), "shrink_wall_s": shrink_s,
              "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
              "torch_threads": torch.get_num_threads()}
    fmt = "sparse" if record["sparsity"] > 0.5 else "dense"  # smaller on disk; load() gives the same model back
    # the record lives in the model folder's hf_px.json: the model and its accuracy appear together or not at all
    save_pretrained(out.model, folder, format=fmt, card=False, metadata={"speed_bench": record})
    return record


def dense_record(args: argparse.Namespace, dataset: str, teacher: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    acc = float(info["dense_accuracy"])
    return {"config": "dense", "dataset": dataset, "recipe": args.recipe, "accuracy": acc, "dense_accuracy": acc,
            "retained": 1.0, **shape_of(teacher), "blocks_removed": 0, "ffn_fraction": 1.0,
            **recipe_params(args), "data_source": info["data_source"], "cpu_s": info.get("cpu_s"),
            "wall_s": info.get("wall_s")}


def untimed(acc: dict[str, Any], shapes: list[tuple[int, int]], rid: str) -> list[dict[str, Any]]:
    """One record per shape for an accuracy record, with the timing fields empty until the timing pass."""
    return [{**acc, "recipe_id": rid, "batch": b, "tokens": t, **dict.fromkeys(TIMING_KEYS)} for b, t in shapes]


def merge(records: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with every (recipe_id, config, batch, tokens) of ``new`` replaced by the new record."""
    def key(r: dict[str, Any]) -> tuple:
        return r.get("recipe_id"), r["config"], r["batch"], r["tokens"]

    keys = {key(r) for r in new}
    return [r for r in records if key(r) not in keys] + new


def time_configs(models: dict[str, nn.Module], accuracy: dict[str, dict[str, Any]], shapes: list[tuple[int, int]],
                 runs: int, rid: str, csr_source: Path | None = None) -> list[dict[str, Any]]:
    """Records of every model of ``models`` (``"dense"`` first) at every shape, one side-by-side call per shape.

    ``csr_source``: the px90 folder, loaded with ``kernels="auto"`` at each shape as ``px90-csr`` (in
    ``accuracy``), so the kernel choice is the one a user gets at that shape.
    """
    # which records share one measurement: a timestamp to read, a random part so two passes never collide
    timing_id = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{uuid.uuid4().hex[:8]}"
    records = []
    for batch, tokens in shapes:
        extra, kernels = {}, None
        if csr_source is not None and "px90-csr" in accuracy:
            extra["px90-csr"] = load(str(csr_source), kernels="auto", batch_shape=(batch, tokens))
            report = extra["px90-csr"].hf_px_kernels
            kernels = {"sparse_layers": len(report.sparse_layers), "linear_layers": len(report.layers),
                       "reverted": report.reverted, "choice_speedup": report.speedup, "note": report.note}
        timed = {n: models[n] if n in models else extra[n] for n in accuracy if n in models or n in extra}
        res = measure_latency(timed, example_inputs(models["dense"], (batch, tokens)), runs=runs, reference="dense")
        for name in timed:
            rec = {**accuracy[name], "recipe_id": rid, "batch": batch, "tokens": tokens,
                   "dense_ms": res.ms["dense"], "ms": res.ms[name], "speedup": res.speedup(name),
                   "threads": res.threads, "load_average": res.load_average, "runs": res.runs,
                   "timing_id": timing_id}
            if name == "px90-csr":
                rec["kernels"] = kernels
            records.append(rec)
        print(f"{batch}x{tokens}: dense {res.ms['dense']:.1f} ms; "
              + ", ".join(f"{n} {res.speedup(n):.2f}x" for n in timed if n != "dense")
              + f" (load average {res.load_average})", flush=True)
    return records


def run_all(args: argparse.Namespace, dataset: str, splits: Splits, tokenizer: Any, pretrained: Pretrained,
            data_source: str) -> list[dict[str, Any]]:
    """Every missing configuration, then the timing pass; ``--out`` is rewritten after each step."""
    out, shapes, wanted = Path(args.out), parse_shapes(args.shapes), config_list(args)
    rargs = recovery_args(args)
    teacher, tinfo = recovery.get_teacher(rargs, dataset, data_source, args.seed, splits, tokenizer, pretrained)
    rid = recipe_id(args, recovery.teacher_dir(rargs, dataset, data_source, args.seed))
    records = load_records(out)
    accuracy = {"dense": dense_record(args, dataset, teacher, tinfo)}
    models: dict[str, nn.Module] = {"dense": teacher}
    # px90-csr times px90's weights: it needs px90's folder even when px90 itself is not selected
    trained = [c for c in CONFIGS if c != "dense" and "same_as" not in CONFIGS[c]
               and (c in wanted or any(CONFIGS[w].get("same_as") == c for w in wanted))]
    for name in trained:
        folder = model_dir(args, dataset, rid, name)
        if (folder / "hf_px.json").exists():
            print(f"{name}: already in {folder}, skipped", flush=True)
            acc = json.loads((folder / "hf_px.json").read_text())["metadata"]["speed_bench"]
        else:
            acc = run_config(name, args, dataset, splits, tokenizer, pretrained, teacher, tinfo, folder)
            print(f"{name}: accuracy {acc['accuracy']:.4f} (dense {acc['dense_accuracy']:.4f}, kept "
                  f"{acc['retained']:.1%}); {acc['num_blocks']} blocks x FFN {acc['ffn_width']}, sparsity "
                  f"{acc['sparsity']:.0%}; {acc['wall_s']:.0f} s", flush=True)
            records = merge(records, untimed(acc, shapes, rid))
            save_records(out, records)
        accuracy[name] = acc
        if name in wanted:
            models[name] = load(str(folder)).eval()
    for name in wanted:
        source = CONFIGS[name].get("same_as")
        if source:  # same weights, other kernels: its accuracy is the source's (CSR is exact up to rounding)
            accuracy[name] = {**accuracy[source], "config": name, "accuracy_from": source}
    timed = ["dense", *[c for c in wanted if c != "dense"]]
    have = {(r["config"], r["batch"], r["tokens"]) for r in records
            if r.get("recipe_id") == rid and r.get("ms") is not None and r.get("threads") == args.threads}
    if not args.retime and all((c, b, t) in have for c in timed for b, t in shapes):
        print(f"every configuration already timed in {out}, not timed again (--retime to redo)", flush=True)
        return [r for r in records if r.get("recipe_id") == rid]
    csr = model_dir(args, dataset, rid, "px90") if "px90-csr" in wanted else None
    new = time_configs({n: models[n] for n in timed if n in models}, {n: accuracy[n] for n in timed}, shapes,
                       args.runs, rid, csr)
    records = merge(records, new)
    save_records(out, records)
    return [r for r in records if r.get("recipe_id") == rid]


LABELS = {
    "dense": "dense MiniLM (teacher)",
    "px90": "PX 90%, dense kernels",
    "px90-csr": "PX 90%, sparse kernels (auto per shape)",
    "pcn50": "structured PCN, FFN x0.5",
    "pcn25": "structured PCN, FFN x0.25",
    "pcn50-px80": "PCN FFN x0.5 + PX 80%",
}


def label(r: dict[str, Any]) -> str:
    if r["config"] in ("blocks", "blocks-top"):
        how = "PX rank" if r["config"] == "blocks" else "the top ones"
        return f"{r['blocks_removed']} of {r['num_blocks'] + r['blocks_removed']} blocks removed ({how})"
    if r["config"] == "pcn25-top1":
        return "structured PCN, FFN x0.25, top block removed"
    if r["config"].startswith("fast"):
        spec = CONFIGS.get(r["config"], {})
        return (f"fast preset: {r['blocks_removed']} block{'s' * (r['blocks_removed'] != 1)} removed, "
                f"FFN x{r['ffn_fraction']:.3g}, PX {r.get('px_sparsity', 0):.0%}"
                + (", shrunk from the teacher" if spec.get("source") == "teacher" else "")
                + (f", + hidden-state distillation (weight {r['hidden_weight']:g})" if spec.get("hidden") else "")
                + (f", {spec['epochs']} epochs of recovery" if spec.get("epochs") else ""))
    return LABELS.get(r["config"], r["config"])


def summary(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per configuration, accuracy and speed-up (median ms) at every shape."""
    if not records:
        return "no records"
    parts = []
    for rid in dict.fromkeys(r.get("recipe_id") for r in records):
        group = [r for r in records if r.get("recipe_id") == rid]
        shapes = sorted({(r["batch"], r["tokens"]) for r in group}, key=lambda s: (s[0], s[1]))
        configs = [c for c in CONFIGS if any(r["config"] == c for r in group)]
        configs += [c for c in dict.fromkeys(r["config"] for r in group) if c not in configs]
        cell = {(r["config"], r["batch"], r["tokens"]): r for r in group}
        head = ["configuration", "blocks x FFN", "sparsity", "accuracy", "% of dense"]
        head += [f"{b}x{t} ({'latency' if b == 1 else 'throughput'})" for b, t in shapes]
        lines = ["| " + " | ".join(head) + " |", "| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(shapes)]
        for c in configs:
            first = next(cell[(c, b, t)] for b, t in shapes if (c, b, t) in cell)
            row = [label(first), f"{first['num_blocks']} x {first['ffn_width']}", f"{first['sparsity']:.0%}",
                   f"{first['accuracy']:.3f}", f"{first['retained']:.1%}"]
            for b, t in shapes:
                r = cell.get((c, b, t))
                if r is None or r.get("ms") is None:
                    row.append("-")
                elif c == "dense":
                    row.append(f"1.00x ({r['ms']:.1f} ms)")
                else:
                    row.append(f"{r['speedup']:.2f}x ({r['ms']:.1f} ms)")
            lines.append("| " + " | ".join(row) + " |")
        timed = [r for r in group if r.get("ms") is not None]
        if timed:
            loads = [r["load_average"] for r in timed if r.get("load_average") is not None]
            runs = sorted({r["runs"] for r in timed})
            threads = sorted({r["threads"] for r in timed})
            lines.append("")
            lines.append(f"Recipe {group[0]['recipe']} ({rid}); speed-up = dense ms / ms, both from one interleaved "
                         f"side-by-side measurement per shape, median of {'/'.join(map(str, runs))} runs, "
                         f"{'/'.join(map(str, threads))} thread(s); 1-minute load average "
                         + (f"{min(loads):.1f}-{max(loads):.1f}" if loads else "unknown")
                         + f"; accuracy on {group[0].get('eval_size')} held-out examples.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if not args.summary_only:
        from hf_px.builtin import minilm_path
        from hf_px.modeling import load_model, load_processor

        torch.set_num_threads(args.threads)
        wall = time.perf_counter()
        model_path = minilm_path() if args.model == recovery.PACKAGED else args.model
        splits = load_splits(recovery.BUILTIN["rt"], args.train_size, args.eval_size)
        tokenizer = load_processor(model_path)
        n_labels = len(set(splits[0]["label"]))

        def pretrained(seed: int) -> nn.Module:
            torch.manual_seed(seed)  # the new head: the same for every configuration
            return load_model(model_path, "sequence-classification", num_labels=n_labels)

        run_all(args, "rt", splits, tokenizer, pretrained, recovery.BUILTIN["rt"])
        print(f"total {time.perf_counter() - wall:.0f} s wall", flush=True)
    print(summary(load_records(out)))


if __name__ == "__main__":
    main()
