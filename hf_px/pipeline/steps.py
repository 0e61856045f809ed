"""The work of each pipeline stage: read the previous stages' folders, write into this stage's temp folder.

Every function takes a :class:`Context` and the stage's temp folder and fills ``summary`` (which goes into the
manifest). Model-bearing stages save a ``model/`` checkpoint that the next stage loads, except the prune stage,
which keeps its masks over the model it started from (rebuilt and checked against a hash on load); nothing is
passed in memory, so a re-run can start at any stage. Files equal to an earlier stage's are hard links to it
(:mod:`hf_px.pipeline.stages`), so writers here create new files and never write into existing ones.

Reading and writing those models, masks and batches is :mod:`.stage_io`'s job; the stages that run on every
process (teacher, finetune, evaluate) are in :mod:`.training_steps` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .context import Context
from .stage_io import (
    BATCHES_FILE,
    MASKS_FILE,
    _base_name,
    current_model,
    load_batches,
    load_masks,
    save_masks,
    save_model,
    source_model,
    state_digest,
)
from .stages import copy_tree, write_json_atomic
from .summary import model_stats, write_card, write_report
from .training_steps import evaluate, finetune, teacher

# every stage's function, in run order (STAGES in :mod:`hf_px.pipeline.table` names them as ``steps.NAME``)
__all__ = ["calibrate", "pcn", "shrink", "prune", "teacher", "finetune", "evaluate", "save", "report", "card", "push"]


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


def batch_tokens(batch: dict[str, torch.Tensor], config: Any = None) -> int:
    """Positions a batch gives a PCA: real tokens (attention mask), else every input id, else images x patches."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    images = len(next(iter(batch.values())))
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        return images * ((size // patch) ** 2 + 1)  # ViT-style: one position per patch plus the class token
    return images


def pcn_batches(ctx: Context, model: torch.nn.Module, cfg: Any = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """PCN's calibration sample: at least ``pcn.calibration_factor`` x the widest layer it measures in tokens.

    The pruning sample (``data.per_class`` examples per class, a few hundred tokens) is far too small for the PCA
    of a layer hundreds or thousands wide: with fewer tokens than the width, every width explains all the
    variance. PCN draws its own seeded sample of the training split instead, doubling it until it holds enough
    tokens (or is the whole split); with ``calibration_factor: 0``, or when the pruning sample is large enough,
    it uses the pruning sample. ``cfg`` is the PCN config to size the sample for (default: the run's ``pcn``).
    """
    from ..data import calibration_batches
    from ..pcn import measured_width

    cfg, plan, d = cfg or ctx.cfg.pcn, ctx.plan, ctx.cfg.data
    base = load_batches(ctx)
    have = sum(batch_tokens(b, model.config) for b in base)
    want = int(math.ceil(cfg.calibration_factor * measured_width(model, cfg)))
    info: dict[str, Any] = {"tokens_wanted": want, "calibration_factor": cfg.calibration_factor}
    if have >= want:
        return base, {**info, "sample": "pruning calibration batches"}
    examples = sum(len(next(iter(b.values()))) for b in base)
    per_example = max(have / max(examples, 1), 1.0)
    total = len(plan.train)
    n = min(total, max(examples, int(math.ceil(1.1 * want / per_example))))
    while True:
        batches = calibration_batches(plan.train, ctx.processor(), per_class=None,
                                      num_batches=int(math.ceil(n / d.calibration_batch_size)),
                                      batch_size=d.calibration_batch_size, text_column=plan.text_column,
                                      label_column=plan.label_column, image_column=plan.image_column,
                                      max_length=d.max_length, seed=d.seed)
        got = sum(batch_tokens(b, model.config) for b in batches)
        if got >= want or n >= total:
            break
        n = min(total, 2 * n)
    return batches, {**info, "sample": "drawn for PCN", "examples": sum(len(next(iter(b.values()))) for b in batches)}


def pcn(ctx: Context, tmp: Path, summary: dict) -> None:
    from ..pcn import apply_pcn

    model = current_model(ctx)  # the starting model, or the teacher with prune.source: teacher
    batches, sample = pcn_batches(ctx, model)
    report = apply_pcn(model, batches, ctx.cfg.pcn)
    model = report.model if report.model is not None else model
    record = {**report.to_dict(), "calibration": sample}
    save_model(model, tmp / "model", ctx, metadata={"pcn": record})
    write_json_atomic(tmp / "pcn.json", record)
    summary.update(params_before=report.params_before, params_after=report.params_after,
                   flops_before=report.flops_before, flops_after=report.flops_after,
                   calibration_tokens=report.calibration_tokens, undersampled=report.undersampled)


def shrink(ctx: Context, tmp: Path, summary: dict) -> None:
    """Plan block removal and FFN width toward ``speed.target_speedup`` by timing on this machine, then apply it."""
    from ..pcn import PCNConfig
    from ..speed.plan import apply_plan, plan_speed

    model = current_model(ctx)
    plan = plan_speed(model, ctx.cfg.speed)
    prune_cfg = ctx.cfg.prune
    # the narrowing is a PCA of FFN activations: it gets PCN's own, larger sample (the run's pcn settings when it
    # has a pcn section), not the few pruning examples that rank the blocks
    factor = ctx.cfg.pcn.calibration_factor if ctx.cfg.pcn is not None else PCNConfig().calibration_factor
    narrow, sample = None, None
    if plan.ffn_fraction < 1:
        narrow, sample = pcn_batches(ctx, model, PCNConfig(width=plan.ffn_width, mode="structured",
                                                           calibration_factor=factor))
    model, record = apply_plan(model, plan, load_batches(ctx), method=prune_cfg.method if prune_cfg else "px",
                               options=prune_cfg.options if prune_cfg else None, pcn_batches=narrow)
    if sample is not None:
        record["pcn_calibration"] = sample
    save_model(model, tmp / "model", ctx, metadata={"speed": record})
    write_json_atomic(tmp / "speed.json", record)
    summary.update(blocks_removed=plan.blocks_removed, num_blocks=plan.num_blocks, ffn_width=plan.ffn_width,
                   ffn_fraction=plan.ffn_fraction, planned_speedups=plan.speedups, target_met=plan.met)


def final_sparsity_report(model: torch.nn.Module, masks: dict, gradual: Any) -> dict[str, Any]:
    """The pruning report's numbers after gradual pruning: per-matrix densities of the final masks."""
    from ..pruning.report import masks_report

    report = masks_report(model, masks, generic=gradual.prune.generic)
    del report["prunable_params"]
    return {**report, "target_sparsity": gradual.prune.sparsity,
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
    masks, report = result.masks, result.report
    save_model(model, tmp / "model", ctx, masks=masks, metadata={"report": report.to_dict()})
    save_masks(masks, tmp / MASKS_FILE)
    write_json_atomic(tmp / "prune_report.json", report.to_dict())
    summary.update(method=config.method, target_sparsity=config.sparsity,
                   achieved_sparsity=report["achieved_sparsity"], time_s=report["time_s"])
    digest = state_digest(model)
    del model, result  # the check below loads a second model; never two in memory
    _keep_masks_only(ctx, tmp, summary, digest, masks)


def _keep_masks_only(ctx: Context, tmp: Path, summary: dict, digest: str, masks: dict) -> None:
    """Drop the pruned model's copy when the model pruning started from, with the masks applied, rebuilds it bit
    for bit (pruning only zeroes weights): the run folder then holds the masks, not a second set of weights.

    The check rebuilds the model as the next stage will (:func:`pruned_model`), one model in memory at a time;
    where it differs (a starting model that cannot be rebuilt the same, e.g. a random head that does not follow
    the seed) the copy stays.
    """
    from ..pruning.masks import apply_masks

    rebuilt = current_model(ctx)  # the prune stage is not complete yet: this is the model it started from
    apply_masks(rebuilt, masks)
    if state_digest(rebuilt) == digest:
        shutil.rmtree(tmp / "model")
        summary.update(model=f"masks over {_base_name(ctx)}", model_sha256=digest)
    else:
        warnings.warn(f"the pruned model could not be rebuilt from {_base_name(ctx)} and its masks; the prune "
                      "stage keeps a full copy of it.", stacklevel=2)
        summary.update(model="model/")


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
    # links: the card stage adds files (README.md, plots/) and never writes into the ones it links
    copy_tree(ctx.stage_path("save") / "model", tmp / "model")
    summary.update(write_card(ctx, tmp / "model"))


def push(ctx: Context, tmp: Path, summary: dict) -> None:
    from ..export.hub import push_to_hub

    url = push_to_hub(str(ctx.stage_path("card") / "model"), ctx.cfg.push.hub_model_id,
                      private=ctx.cfg.push.private)
    write_json_atomic(tmp / "push.json", {"repo_id": ctx.cfg.push.hub_model_id, "url": url})
    summary.update(repo_id=ctx.cfg.push.hub_model_id, url=url)
