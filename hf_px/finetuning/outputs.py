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


def save_outputs(accelerator: Any, output: Any, config: Any, masks: dict[str, torch.Tensor] | None,
                 tokenizer: Any) -> None:
    """The final model (``output_dir/model``) and ``results.json``, written by the main process."""
    accelerator.wait_for_everyone()
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

            save_pretrained(output.model, model_dir, masks=masks, tokenizer=tokenizer,
                            metadata={"finetune": results})
        tmp = os.path.join(config.output_dir, ".results.json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2, default=str)
        os.replace(tmp, os.path.join(config.output_dir, "results.json"))
    accelerator.wait_for_everyone()
