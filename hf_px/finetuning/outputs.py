"""What a fine-tuning run writes and reads back: the JSONL log, step checkpoints, the final model and results."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from typing import Any

import torch

from ..export.checkpoint_files import CheckpointFileError
from . import checkpoints

_CKPT_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = checkpoints.STATE_FILE
MASKS_FILE = checkpoints.MASKS_FILE


class JsonlLogger:
    """Appends one JSON object per event to ``path`` (main process only; a no-op with ``path=None``)."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}, default=float) + "\n")


def _step_folders(root: str) -> list[tuple[int, str]]:
    """(step, path) of the ``step_N`` folders under ``root``, newest first (temporary folders are ignored)."""
    if not root or not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _CKPT_RE.match(n))]
    return sorted((s, p) for s, p in found if os.path.isdir(p))[::-1]


def latest_checkpoint(root: str) -> str | None:
    """The newest checkpoint under ``root`` whose files are all present and intact (None: there is none)."""
    return next((path for _, path in _step_folders(root) if checkpoints.problem(path) is None), None)


def find_resume_point(root: str, warn: bool = True) -> str | None:
    """The newest intact checkpoint; newer broken ones are skipped with a warning, pickle-based ones refused.

    Raises:
        CheckpointFileError: the newest checkpoint that could be used is an old Accelerate (pickle) checkpoint.
    """
    for _, path in _step_folders(root):
        why = checkpoints.problem(path)
        if why is None:
            return path
        if why == "legacy":
            raise CheckpointFileError(f"{path} is an old Accelerate checkpoint made of pickle files, which can run "
                                      f"code when loaded, so hf_px does not read it: delete {root} (or choose another "
                                      "finetune.output_dir) and start a fresh run.")
        if warn:
            warnings.warn(f"skipping checkpoint {path}: {why}; trying an older one.", stacklevel=3)
    return None


def require_shared_folder(folder: str) -> None:
    """Raise on every process unless every process sees ``folder``, which the main process has just created.

    Each process writes its own RNG state into a checkpoint and reads the checkpoint back on resume, so across
    machines the output folder must be on a shared filesystem. Without this check the processes of the other
    machines fail alone and the main process waits for them in the next collective until it times out.
    """
    import torch.distributed as dist

    seen = os.path.isdir(folder)
    for _ in range(20):  # a network filesystem may show a new folder to other machines a moment late
        if seen:
            break
        time.sleep(0.25)
        seen = os.path.isdir(folder)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(flags, seen)
    else:
        flags = [seen]
    blind = [rank for rank, ok in enumerate(flags) if not ok]
    if blind:
        raise RuntimeError(f"process(es) {blind} cannot see {folder}, which the main process created: "
                           "finetune.output_dir must be on a filesystem that every machine shares (NFS, Lustre, ...) "
                           "for checkpoints and resume.")


def save_checkpoint(accelerator: Any, root: str, step: int, state: dict[str, Any], masks: dict[str, torch.Tensor],
                    keep: int | None, model: Any, optimizer: Any, scheduler: Any) -> str:
    """Everything a resume needs, in a temporary folder renamed to ``root/step_N`` (all processes call)."""
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp_step_{step}")
    main = accelerator.is_main_process
    if main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    require_shared_folder(tmp)
    checkpoints.write_rng(tmp, accelerator.process_index)  # every process draws its own dropout masks
    # DDP replicates the model and the optimizer: the main process writes them (every process gathers FSDP shards)
    checkpoints.write_model(accelerator.unwrap_model(model), os.path.join(tmp, checkpoints.MODEL_FILE), main)
    checkpoints.write_object(tmp, "optimizer", optimizer.state_dict(), main)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # code, rebuilt by the run
    checkpoints.write_object(tmp, "scheduler", sched, main)
    if accelerator.scaler is not None:
        checkpoints.write_object(tmp, "scaler", accelerator.scaler.state_dict(), main)
    accelerator.wait_for_everyone()
    if main:
        checkpoints.write_masks(masks, os.path.join(tmp, MASKS_FILE))
        checkpoints.write_state(tmp, {**state, "world_size": accelerator.num_processes,
                                      "accelerator_step": accelerator.step})
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for _, path in _step_folders(root)[keep:]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint_meta(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The data position (``training_state.json``) and the masks of a checkpoint checked by :func:`checkpoints.problem`."""
    return checkpoints.read_state(path), checkpoints.read_masks(os.path.join(path, MASKS_FILE))


def load_checkpoint_state(path: str, accelerator: Any, model: Any, optimizer: Any, scheduler: Any) -> None:
    """Weights, optimizer, schedule, loss scale and this process's RNG states, from safetensors and JSON only."""
    state = checkpoints.read_state(path)
    checkpoints.read_model(accelerator.unwrap_model(model), os.path.join(path, checkpoints.MODEL_FILE))
    checkpoints.read_optimizer(optimizer, path)
    sched = checkpoints.read_object(path, "scheduler")
    # load_state_dict copies every key onto the scheduler: accept only the attributes it saves itself
    if not isinstance(sched, dict) or not set(sched) <= set(scheduler.state_dict()):
        raise ValueError(f"{path}/scheduler.json is not this run's scheduler state; delete that checkpoint folder.")
    if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: the schedule functions come from this run's code
        sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    if accelerator.scaler is not None and os.path.exists(os.path.join(path, "scaler.json")):
        accelerator.scaler.load_state_dict(checkpoints.read_object(path, "scaler"))
    accelerator.step = int(state.get("accelerator_step", 0))  # the gradient-accumulation phase
    saved = int(state.get("world_size", 1))
    if saved != accelerator.num_processes and accelerator.is_main_process:
        warnings.warn(f"{path} was written by {saved} processes, this run has {accelerator.num_processes}: "
                      "random streams and data order differ from an uninterrupted run.", stacklevel=3)
    if accelerator.process_index < saved:
        checkpoints.read_rng(path, accelerator.process_index)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 (DTensor) parameters: each process then has only a slice of each weight."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def gathered_copy(model: torch.nn.Module, keep: bool) -> torch.nn.Module | None:
    """A plain copy of an FSDP2-sharded model with whole tensors on the CPU (``keep=False``: None).

    Every process must call it: each parameter is gathered with a collective, one at a time, so only the
    process that keeps the copy (the one that saves) ever holds the whole model. The copy is built from the
    model's class and config on the meta device, then given the gathered tensors, so it carries no FSDP hooks:
    ``save_pretrained`` and stock ``from_pretrained`` see an ordinary model. Tied weights stay tied: every
    module that holds a tied placeholder gets the same gathered parameter.
    """
    from torch.distributed.fsdp import FSDPModule

    from .fixed_masks import _clean  # activation checkpointing's wrappers rename parameters

    plain_cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    if not hasattr(model, "config"):  # every process raises, before any gather
        raise TypeError(f"cannot rebuild an unsharded {plain_cls.__name__} to save: only transformers models "
                        "(with a .config) are saved from FSDP2 shards.")
    plain = None
    if keep:
        with torch.device("meta"):
            plain = plain_cls(model.config)
        if getattr(model, "generation_config", None) is not None:  # loaded with the model, not part of config
            plain.generation_config = model.generation_config
        placeholders = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        whole = _whole(param)
        if plain is not None:
            # a new Parameter rather than .data: a meta placeholder cannot take a CPU tensor in place
            _replace(plain, placeholders[_clean(name)], torch.nn.Parameter(whole, requires_grad=param.requires_grad))
    for name, buf in model.named_buffers():  # FSDP2 keeps buffers whole; non-persistent ones are copied too
        whole = _whole(buf)
        if plain is not None:
            owner, _, attr = _clean(name).rpartition(".")
            plain.get_submodule(owner)._buffers[attr] = whole
    if plain is None:
        return None
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{len(left)} tensors of the unsharded copy were not filled (e.g. {left[0]!r}).")
    plain.train(model.training)
    return plain


def _whole(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "full_tensor"):
        return t.full_tensor().cpu()  # a collective; the gathered tensor is already a new one
    return t.cpu().clone()


def _replace(root: torch.nn.Module, placeholder: torch.Tensor, value: torch.nn.Parameter) -> None:
    for module in root.modules():
        for attr, held in list(module._parameters.items()):
            if held is placeholder:
                module._parameters[attr] = value


def save_outputs(accelerator: Any, output: Any, config: Any, masks: dict[str, torch.Tensor] | None,
                 tokenizer: Any) -> None:
    """The final model (``output_dir/model``) and ``results.json``, written by the main process.

    An FSDP2-sharded model is first gathered into a plain copy on the main process (every process takes part),
    so the folder holds whole tensors and reloads with stock ``from_pretrained``; the model itself stays sharded.
    """
    accelerator.wait_for_everyone()
    to_save = output.model
    if is_sharded(to_save):
        if hasattr(to_save, "peft_config"):  # checked on every process, so none is left waiting in a gather
            raise NotImplementedError("saving unmerged LoRA adapters from an FSDP2-sharded model is not supported; "
                                      "set merge_lora, or fine-tune with DDP.")
        to_save = gathered_copy(to_save, keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        results = {"metrics": output.metrics, "global_step": output.global_step, "sparsity": output.sparsity,
                   "world_size": output.world_size, "resumed_from": output.resumed_from, "config": config.to_dict(),
                   **output.extras}
        model_dir = os.path.join(config.output_dir, "model")
        if hasattr(output.model, "peft_config"):  # adapters only (merge_lora=False)
            tmp_dir = model_dir + ".tmp"
            shutil.rmtree(tmp_dir, ignore_errors=True)
            output.model.save_pretrained(tmp_dir)
            shutil.rmtree(model_dir, ignore_errors=True)
            os.replace(tmp_dir, model_dir)
        else:
            from ..export.serialization import save_pretrained

            save_pretrained(to_save, model_dir, masks=masks, tokenizer=tokenizer,
                            metadata={"finetune": results})
        tmp = os.path.join(config.output_dir, ".results.json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2, default=str)
        os.replace(tmp, os.path.join(config.output_dir, "results.json"))
    accelerator.wait_for_everyone()
