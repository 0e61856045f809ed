"""The work of each pipeline stage: read the previous stages' folders, write into this stage's temp folder.

Every function takes a :class:`Context` and the stage's temp folder and fills ``summary`` (which goes into the
manifest). Model-bearing stages save a ``model/`` checkpoint that the next stage loads, except the prune stage,
which keeps its masks over the model it started from (rebuilt and checked against a hash on load); nothing is
passed in memory, so a re-run can start at any stage. Files equal to an earlier stage's are hard links to it
(:mod:`hf_px.pipeline.stages`), so writers here create new files and never write into existing ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .context import Context, random_init_config
from .stages import copy_tree, link_or_copy, write_json_atomic
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
    if ctx.has("prune") and folder == ctx.stage_path("prune") / "model" and not folder.exists():
        return pruned_model(ctx)
    from ..export.serialization import load

    return load(str(folder), trust_remote_code=ctx.cfg.model.trust_remote_code).eval()


def _before_prune(ctx: Context) -> Context:
    """``ctx`` as the prune stage saw it: the stages before it, so ``current_model`` gives what it pruned."""
    return dataclasses.replace(ctx, stages={k: v for k, v in ctx.stages.items() if k not in ("prune", "finetune")})


def pruned_model(ctx: Context) -> torch.nn.Module:
    """The prune stage's model, rebuilt: the model it started from with its masks applied.

    The prune stage stores masks rather than a second copy of the weights (the run folder would hold three
    models: PCN's, the pruned one, the fine-tuned one). The rebuilt weights must hash to what the stage recorded:
    a starting model that changed since (a model folder edited outside the run) is an error, never a silently
    different pruned model.
    """
    from ..pruning.masks import apply_masks

    model = current_model(_before_prune(ctx))
    apply_masks(model, load_masks(ctx.stage_path("prune") / MASKS_FILE))
    want = ctx.stages["prune"].summary().get("model_sha256")
    if want is not None and state_digest(model) != want:
        from .runner import RunError

        raise RunError(f"{ctx.stage_path('prune').name} stores masks for the model it pruned, and that model has "
                       f"changed since (its masks applied to {_base_name(ctx)} no longer give the pruned weights). "
                       "Run the same command again with --force.")
    return model


def _base_name(ctx: Context) -> str:
    folder = _before_prune(ctx).latest_model_dir()
    return f"{folder.parent.name}/{folder.name}" if folder is not None else "the starting model"


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's state dict (-0.0 counted as 0.0)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        if t.is_floating_point():
            t = t + 0  # a weight zeroed by a mask can be -0.0 or 0.0 depending on the order of multiplications
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def plain_processor(ctx: Context) -> object:
    """``ctx.processor()`` in the state it is saved in: no padding, truncation at ``data.max_length``.

    A fast tokenizer's backend keeps the padding and truncation of its last call and writes them into
    ``tokenizer.json``, so without this each stage would save a slightly different tokenizer (depending on what
    ran before it in this process), which could not be shared between stage folders and would ship by accident.
    """
    proc = ctx.processor()
    tok = getattr(proc, "tokenizer", proc)  # multimodal processors wrap a tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.enable_truncation(max_length=ctx.cfg.data.max_length, stride=0,
                                  direction=getattr(tok, "truncation_side", "right"))
    return proc


def save_processor(ctx: Context, folder: Path) -> None:
    """Write the processor's files into ``folder``, each renamed over any file of that name (which may be a hard
    link to another stage's file, so it must not be written into)."""
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".processor-") as scratch:
        plain_processor(ctx).save_pretrained(scratch)
        for p in Path(scratch).iterdir():
            if p.is_file():
                os.replace(p, folder / p.name)


def save_model(model: torch.nn.Module, folder: Path, ctx: Context, masks: dict | None = None,
               metadata: dict | None = None, format: str = "dense") -> None:
    from ..export.serialization import save_pretrained

    save_pretrained(model, folder, format=format, masks=masks, tokenizer=plain_processor(ctx), card=False,
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


def pcn_batches(ctx: Context, model: torch.nn.Module) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """PCN's calibration sample: at least ``pcn.calibration_factor`` x the widest layer it measures in tokens.

    The pruning sample (``data.per_class`` examples per class, a few hundred tokens) is far too small for the PCA
    of a layer hundreds or thousands wide: with fewer tokens than the width, every width explains all the
    variance. PCN draws its own seeded sample of the training split instead, doubling it until it holds enough
    tokens (or is the whole split); with ``calibration_factor: 0``, or when the pruning sample is large enough,
    it uses the pruning sample.
    """
    from ..data import calibration_batches
    from ..pcn import measured_width

    cfg, plan, d = ctx.cfg.pcn, ctx.plan, ctx.cfg.data
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
    # links: the card stage adds files (README.md, plots/) and never writes into the ones it links
    copy_tree(ctx.stage_path("save") / "model", tmp / "model")
    summary.update(write_card(ctx, tmp / "model"))


def push(ctx: Context, tmp: Path, summary: dict) -> None:
    from ..export.hub import push_to_hub

    url = push_to_hub(str(ctx.stage_path("card") / "model"), ctx.cfg.push.hub_model_id,
                      private=ctx.cfg.push.private)
    write_json_atomic(tmp / "push.json", {"repo_id": ctx.cfg.push.hub_model_id, "url": url})
    summary.update(repo_id=ctx.cfg.push.hub_model_id, url=url)
