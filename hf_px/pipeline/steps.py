"""The work of each pipeline stage: read the previous stages' folders, write into this stage's temp folder.

Every function takes a :class:`Context` and the stage's temp folder and fills ``summary`` (which goes into the
manifest). Model-bearing stages save a ``model/`` checkpoint that the next stage loads; nothing is passed in
memory, so a re-run can start at any stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .context import Context, random_init_config
from .stages import copy_tree, write_json_atomic
from .summary import model_stats, write_card, write_report

BATCHES_FILE = "batches.safetensors"
MASKS_FILE = "masks.safetensors"


def source_model(ctx: Context) -> torch.nn.Module:
    """The starting model; a new head (or a from_config model) is initialised with data.seed."""
    from transformers import set_seed

    from ..data.labels import set_label_names
    from ..modeling import CLASSIFICATION_TASKS, load_model

    cfg, plan = ctx.cfg, ctx.plan
    set_seed(cfg.data.seed)
    if cfg.model.from_config is not None:
        return plan.task.auto_class.from_config(random_init_config(ctx)).eval()
    model = load_model(plan.model_path, plan.task, plan.num_labels,  # ignored for tasks without a label head
                       trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle,
                       gguf_file=cfg.model.gguf_file)
    if plan.task in CLASSIFICATION_TASKS:  # every later stage loads this config, so the saved model names its classes
        set_label_names(model.config, plan.labels)
    return model


def current_model(ctx: Context) -> torch.nn.Module:
    """The model the last completed model stage saved (the starting model when there is none)."""
    folder = ctx.latest_model_dir()
    if folder is None:
        return source_model(ctx)
    from ..export.serialization import load

    return load(str(folder), trust_remote_code=ctx.cfg.model.trust_remote_code).eval()


def save_model(model: torch.nn.Module, folder: Path, ctx: Context, masks: dict | None = None,
               metadata: dict | None = None, format: str = "dense") -> None:
    from ..export.serialization import save_pretrained

    save_pretrained(model, folder, format=format, masks=masks, tokenizer=ctx.processor(), card=False,
                    metadata=metadata)


def save_masks(masks: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(path))


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(str(path)).items()}


def load_batches(ctx: Context) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    flat = load_file(str(ctx.stage_path("calibrate") / BATCHES_FILE))
    batches: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        i, name = key.split("/", 1)
        batches.setdefault(int(i), {})[name] = value
    return [batches[i] for i in sorted(batches)]


# ------------------------------------------------------------------------------------------ stages
def calibrate(ctx: Context, tmp: Path, summary: dict) -> None:
    from safetensors.torch import save_file

    from ..data import calibration_batches

    d, plan = ctx.cfg.data, ctx.plan
    batches = calibration_batches(plan.train, ctx.processor(), per_class=d.per_class if plan.label_column else None,
                                  num_batches=d.num_batches, batch_size=d.calibration_batch_size,
                                  text_column=plan.text_column, label_column=plan.label_column,
                                  image_column=plan.image_column, max_length=d.max_length, seed=d.seed)
    flat = {f"{i}/{k}": v.contiguous() for i, b in enumerate(batches) for k, v in b.items()
            if isinstance(v, torch.Tensor)}
    save_file(flat, str(tmp / BATCHES_FILE))
    counts: dict[str, int] = {}
    for b in batches:
        for y in b.get("labels", torch.empty(0)).tolist():
            counts[str(y)] = counts.get(str(y), 0) + 1
    summary.update(num_batches=len(batches), num_examples=sum(len(next(iter(b.values()))) for b in batches),
                   class_counts=counts, dataset=d.dataset, train_examples=len(plan.train),
                   eval_examples=len(plan.eval) if plan.eval is not None else 0)


def pcn(ctx: Context, tmp: Path, summary: dict) -> None:
    from ..pcn import apply_pcn

    model = current_model(ctx)  # the starting model, or the teacher with prune.source: teacher
    report = apply_pcn(model, load_batches(ctx), ctx.cfg.pcn)
    model = report.model if report.model is not None else model
    save_model(model, tmp / "model", ctx, metadata={"pcn": report.to_dict()})
    write_json_atomic(tmp / "pcn.json", report.to_dict())
    summary.update(params_before=report.params_before, params_after=report.params_after,
                   flops_before=report.flops_before, flops_after=report.flops_after)


def shrink(ctx: Context, tmp: Path, summary: dict) -> None:
    """Plan block removal and FFN width toward ``speed.target_speedup`` by timing on this machine, then apply it."""
    from ..speed.plan import apply_plan, plan_speed

    model = current_model(ctx)
    plan = plan_speed(model, ctx.cfg.speed)
    prune_cfg = ctx.cfg.prune
    model, record = apply_plan(model, plan, load_batches(ctx), method=prune_cfg.method if prune_cfg else "px",
                               options=prune_cfg.options if prune_cfg else None)
    save_model(model, tmp / "model", ctx, metadata={"speed": record})
    write_json_atomic(tmp / "speed.json", record)
    summary.update(blocks_removed=plan.blocks_removed, num_blocks=plan.num_blocks, ffn_width=plan.ffn_width,
                   ffn_fraction=plan.ffn_fraction, planned_speedups=plan.speedups, target_met=plan.met)


def final_sparsity_report(model: torch.nn.Module, masks: dict, gradual: Any) -> dict[str, Any]:
    """The pruning report's numbers after gradual pruning: per-matrix densities of the final masks."""
    from ..pruning.report import layer_rows
    from ..pruning.targets import collect_targets

    targets = [t for t in collect_targets(model, generic=gradual.prune.generic) if t.param_name in masks]
    named = [(t.key, t.view(masks[t.param_name])) for t in targets]
    layers = layer_rows(named)
    for lay, t in zip(layers, targets, strict=True):
        lay.update(block=t.block, role=t.role)
    prunable, kept = sum(lay["numel"] for lay in layers), sum(int(m.sum()) for _, m in named)
    return {"layers": layers, "target_sparsity": gradual.prune.sparsity, "kept_params": kept,
            "achieved_sparsity": 1.0 - kept / max(prunable, 1),
            "gradual": {k: v for k, v in gradual.to_dict().items() if k != "prune"}}


def measure_speed(ctx: Context, model: torch.nn.Module) -> dict[str, Any]:
    """The saved model's latency against the starting model's, side by side at every ``speed.shapes``."""
    from ..inference.choose import example_inputs
    from ..speed.latency import measure_latency

    dense, rows = source_model(ctx), []
    for batch, tokens in ctx.cfg.speed.shapes:
        res = measure_latency({"dense": dense, "this model": model}, example_inputs(dense, (batch, tokens)),
                              runs=2 * ctx.cfg.speed.runs)
        rows.append({"batch": batch, "tokens": tokens, "dense_ms": res.ms["dense"], "ms": res.ms["this model"],
                     "speedup": res.speedup("this model"), "threads": res.threads,
                     "load_average": res.load_average})
    return {"target_speedup": ctx.cfg.speed.target_speedup, "shapes": rows}


def prune(ctx: Context, tmp: Path, summary: dict) -> None:
    from ..pruning.loop import prune as run_prune
    from ..pruning.scoring.base import local_scoring

    model = current_model(ctx)
    config = dataclasses.replace(ctx.cfg.prune, pcn=None)
    if ctx.cfg.gradual is not None:  # one-shot to the starting sparsity; fine-tuning prunes the rest
        config = dataclasses.replace(config, sparsity=ctx.cfg.gradual.initial_sparsity)
    with local_scoring():  # only the main process prunes; the others wait at the stage barrier
        result = run_prune(model, load_batches(ctx), config, tokenizer=ctx.processor(), progress=ctx.progress)
    result.report["calibration"].update(dataset=ctx.cfg.data.dataset, per_class=ctx.cfg.data.per_class)
    result.report["base_model"] = ctx.cfg.model.name_or_path or f"from_config:{ctx.cfg.model.from_config['model_type']}"
    print(result.report, flush=True)
    save_model(model, tmp / "model", ctx, masks=result.masks, metadata={"report": result.report.to_dict()})
    save_masks(result.masks, tmp / MASKS_FILE)
    write_json_atomic(tmp / "prune_report.json", result.report.to_dict())
    summary.update(method=config.method, target_sparsity=config.sparsity,
                   achieved_sparsity=result.report["achieved_sparsity"], time_s=result.report["time_s"])


def _train(ctx: Context, name: str, model: torch.nn.Module, masks: dict, distill: Any = None,
           gradual: Any = None) -> Any:
    """Fine-tune ``model`` with the finetune recipe (every process); checkpoints go to the stage's work folder."""
    from ..finetuning.loop import finetune as run_finetune

    work, ft = ctx.training_dir(name), ctx.cfg.finetune
    # the pipeline's own folder: checkpoints by default, resumed by fingerprint; the user's: as configured
    managed = {"resume": any((work / "checkpoints").glob("step_*")), "save_every": ft.save_every or 100,
               "save_total_limit": ft.save_total_limit or 2} if work == ctx.work_dir(name) else {}
    config = dataclasses.replace(ft, **managed, output_dir=str(work), progress_bar=ft.progress_bar and ctx.progress,
                                 label_column=ctx.plan.label_column or "label", text_column=ctx.plan.text_column,
                                 max_length=ctx.cfg.data.max_length, distill=distill, gradual=gradual,
                                 metrics=tuple(ctx.cfg.evaluate.metrics) if ctx.cfg.evaluate.metrics else None)
    return run_finetune(model, ctx.plan.train, ctx.plan.eval, config, tokenizer=ctx.processor(), masks=masks,
                        calibration=load_batches(ctx) if gradual is not None else None)


def _keep_training_outputs(ctx: Context, name: str, out: Any, tmp: Path, summary: dict) -> None:
    work = ctx.training_dir(name)
    copy_tree(work / "model", tmp / "model")
    shutil.copy2(work / "results.json", tmp / "results.json")
    if (work / "logs" / "metrics.jsonl").exists():
        shutil.copy2(work / "logs" / "metrics.jsonl", tmp / "metrics.jsonl")
    summary.update(steps=out.global_step, metrics=out.metrics, world_size=out.world_size,
                   resumed_from=os.path.basename(out.resumed_from) if out.resumed_from else None,
                   sparsity=out.sparsity)


def teacher(ctx: Context, tmp: Path | None, summary: dict) -> None:
    """The dense teacher (every process): the starting model fine-tuned with the finetune recipe, no masks, no
    distillation; or ``teacher.checkpoint`` as given. Its evaluation is the run's dense baseline."""
    given = ctx.cfg.teacher.checkpoint
    if given is None:
        out = _train(ctx, "teacher", source_model(ctx), masks={})
        if tmp is not None:
            _keep_training_outputs(ctx, "teacher", out, tmp, summary)
        return
    from ..export.serialization import load

    model = load(given, trust_remote_code=ctx.cfg.model.trust_remote_code).eval()
    metrics = _eval_metrics(ctx, model)
    if tmp is None:
        return
    save_model(model, tmp / "model", ctx)
    write_json_atomic(tmp / "metrics.json", metrics)
    summary.update(checkpoint=str(Path(given).expanduser().absolute()), steps=0, metrics=metrics)


def finetune(ctx: Context, tmp: Path | None, summary: dict) -> None:
    """Runs on every process; checkpoints go to a work folder that survives an interrupt (resume point)."""
    distill = None
    if ctx.cfg.distill is not None:
        distill = dataclasses.replace(ctx.cfg.distill, teacher=str(ctx.teacher_dir()))
    model = current_model(ctx)
    if ctx.has("prune"):
        masks = load_masks(ctx.stage_path("prune") / MASKS_FILE)
    else:  # a checkpoint pruned elsewhere keeps its zeros; new heads are outside the prunable set and stay dense
        from ..pruning.masks import masks_from_model

        masks = masks_from_model(model)
    out = _train(ctx, "finetune", model, masks, distill, ctx.cfg.gradual)
    if tmp is None:
        return
    _keep_training_outputs(ctx, "finetune", out, tmp, summary)
    if ctx.cfg.gradual is not None:  # the masks grew tighter while training: these are the final ones
        save_masks(out.masks, tmp / MASKS_FILE)
        summary.update(gradual=out.extras.get("gradual", []),
                       achieved_sparsity=1.0 - out.sparsity["density_after"])
    elif ctx.has("prune"):
        shutil.copy2(ctx.stage_path("prune") / MASKS_FILE, tmp / MASKS_FILE)
    if distill is not None:
        summary.update(distilled_from=ctx.folders["teacher"])


def _eval_metrics(ctx: Context, model: torch.nn.Module) -> dict[str, Any]:
    from ..finetuning.evaluation import evaluate as run_eval

    if ctx.plan.eval is None:
        return {}
    return run_eval(model, ctx.plan.eval, ctx.processor(), metrics=ctx.cfg.evaluate.metrics,
                    batch_size=ctx.cfg.evaluate.batch_size, max_length=ctx.cfg.data.max_length,
                    text_column=ctx.plan.text_column, label_column=ctx.plan.label_column or "label")


def evaluate(ctx: Context, tmp: Path | None, summary: dict) -> None:
    if ctx.plan.eval is None:
        summary.update(skipped="no evaluation split")
        if tmp is not None:
            write_json_atomic(tmp / "metrics.json", {})
        return
    metrics = _eval_metrics(ctx, current_model(ctx))
    if tmp is not None:
        write_json_atomic(tmp / "metrics.json", metrics)
    summary.update(metrics=metrics, split=ctx.plan.eval_split, examples=len(ctx.plan.eval))


def save(ctx: Context, tmp: Path, summary: dict) -> None:
    model = current_model(ctx)
    masks = None
    for name in ("finetune", "prune"):
        if ctx.has(name) and (ctx.stage_path(name) / MASKS_FILE).exists():
            masks = load_masks(ctx.stage_path(name) / MASKS_FILE)
            break
    metadata = {"report": json.loads((ctx.stage_path("prune") / "prune_report.json").read_text())} \
        if ctx.has("prune") else {}
    if metadata and ctx.cfg.gradual is not None and masks is not None:
        metadata["report"].update(final_sparsity_report(model, masks, ctx.cfg.gradual))
    if ctx.has("pcn") and metadata:  # the widths PCN chose belong with the pruning report, as hf_px.prune saves it
        metadata["report"]["pcn"] = json.loads((ctx.stage_path("pcn") / "pcn.json").read_text())
    save_model(model, tmp / "model", ctx, masks=masks, metadata=metadata, format=ctx.cfg.output.format)
    summary.update(format=ctx.cfg.output.format, **model_stats(model, tmp / "model"))
    if ctx.cfg.speed is not None:
        summary["speed"] = measure_speed(ctx, model)


def report(ctx: Context, tmp: Path, summary: dict) -> None:
    summary.update(write_report(ctx, tmp))


def card(ctx: Context, tmp: Path, summary: dict) -> None:
    copy_tree(ctx.stage_path("save") / "model", tmp / "model")
    summary.update(write_card(ctx, tmp / "model"))


def push(ctx: Context, tmp: Path, summary: dict) -> None:
    from ..export.hub import push_to_hub

    url = push_to_hub(str(ctx.stage_path("card") / "model"), ctx.cfg.push.hub_model_id,
                      private=ctx.cfg.push.private)
    write_json_atomic(tmp / "push.json", {"repo_id": ctx.cfg.push.hub_model_id, "url": url})
    summary.update(repo_id=ctx.cfg.push.hub_model_id, url=url)
