"""What a fine-tuning run writes and reads back: the JSONL log, step checkpoints, the final model and results."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import torch

_CKPT_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "training_state.json"
MASKS_FILE = "masks.pt"


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


def latest_checkpoint(root: str) -> str | None:
    """The complete checkpoint with the highest step under ``root`` (temporary folders are ignored)."""
    if not os.path.isdir(root):
        return None
    best, best_step = None, -1
    for name in os.listdir(root):
        m = _CKPT_RE.match(name)
        path = os.path.join(root, name)
        if m and int(m.group(1)) > best_step and os.path.isfile(os.path.join(path, STATE_FILE)):
            best, best_step = path, int(m.group(1))
    return best


def save_checkpoint(accelerator: Any, root: str, step: int, state: dict[str, Any],
                    masks: dict[str, torch.Tensor], keep: int | None) -> str:
    """``accelerator.save_state`` into a temporary folder, then rename it to ``root/step_N`` (all processes call)."""
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp_step_{step}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(masks, os.path.join(tmp, MASKS_FILE))
        # the state file marks a checkpoint complete: written last, inside the temporary folder
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(state, fh, default=float)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            done = sorted((int(_CKPT_RE.match(n).group(1)), n) for n in os.listdir(root) if _CKPT_RE.match(n))
            for _, name in done[:-keep]:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint_meta(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        state = json.load(fh)
    masks = torch.load(os.path.join(path, MASKS_FILE), map_location="cpu")
    return state, masks


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
            from .serialization import save_pretrained

            save_pretrained(output.model, model_dir, masks=masks, tokenizer=tokenizer,
                            metadata={"finetune": results})
        tmp = os.path.join(config.output_dir, ".results.json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2, default=str)
        os.replace(tmp, os.path.join(config.output_dir, "results.json"))
    accelerator.wait_for_everyone()
