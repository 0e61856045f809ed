"""What the pipeline's stages pass to each other through their folders: models, masks and calibration batches.

A model stage saves a ``model/`` checkpoint that the next stage loads; the prune stage keeps masks over the model
it started from instead, and :func:`pruned_model` rebuilds its model from them, checked against a hash. The
processor is saved with every model in one fixed state, so that stage folders can share its files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import torch

from .context import Context, random_init_config

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
