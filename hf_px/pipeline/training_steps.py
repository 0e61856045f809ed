"""The stages that train or evaluate a model: teacher, finetune and evaluate, run on every process.

Under ``accelerate launch`` every process runs them and the main one writes the stage folder. The training
stages keep checkpoints in a work folder, the resume point after an interrupt; once training is complete, their
outputs are linked or copied into the stage's temp folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .context import Context
from .stage_io import (
    MASKS_FILE,
    current_model,
    load_batches,
    load_masks,
    save_masks,
    save_model,
    save_processor,
    source_model,
)
from .stages import copy_tree, link_or_copy, write_json_atomic


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
    if name == "teacher" and ctx.cfg.teacher.epochs is not None:
        config = dataclasses.replace(config, epochs=ctx.cfg.teacher.epochs, max_steps=None)
    return run_finetune(model, ctx.plan.train, ctx.plan.eval, config, tokenizer=ctx.processor(), masks=masks,
                        calibration=load_batches(ctx) if gradual is not None else None)


def _keep_training_outputs(ctx: Context, name: str, out: Any, tmp: Path, summary: dict) -> None:
    work = ctx.training_dir(name)
    # the pipeline's own work folder is deleted once the stage is complete, so its files can be linked; a
    # fine-tuning folder of the user's is copied: a later run there may rewrite its files in place
    link = work == ctx.work_dir(name)
    copy_tree(work / "model", tmp / "model", link=link)
    save_processor(ctx, tmp / "model")  # the same tokenizer files as every other stage's, so they are shared
    link_or_copy(work / "results.json", tmp / "results.json", link=link)
    if (work / "logs" / "metrics.jsonl").exists():
        link_or_copy(work / "logs" / "metrics.jsonl", tmp / "metrics.jsonl", link=link)
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
        if distill.hidden_weight > 0 and distill.hidden_layers is None:
            distill.hidden_layers = _kept_blocks(ctx)
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
        link_or_copy(ctx.stage_path("prune") / MASKS_FILE, tmp / MASKS_FILE)
    if distill is not None:
        summary.update(distilled_from=ctx.folders["teacher"])


def _kept_blocks(ctx: Context) -> list[int] | None:
    """The teacher block each student block was, when the shrink stage removed blocks (None: none removed)."""
    if not ctx.has("shrink"):
        return None
    removed = json.loads((ctx.stage_path("shrink") / "speed.json").read_text()).get("removed")
    return list(removed["kept"]) if removed else None


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
