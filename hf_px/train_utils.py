"""Helpers of the fine-tuning loop (``hf_px.train``): data, masks, logging, checkpoints and evaluation."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import time
from typing import Any

import torch
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels")
_CKPT_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "training_state.json"
MASKS_FILE = "masks.pt"


# ---------------------------------------------------------------------------------------------- task and data


def task_of(model: nn.Module) -> str:
    """``causal_lm`` for next-token models, else ``classification`` (sequence, token or image labels)."""
    name = type(getattr(model, "get_base_model", lambda: model)()).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    return "classification"


def prepare_dataset(dataset: Any, tokenizer: Any, config: Any, task: str, role: str) -> Any:
    """A dataset of model inputs: already-tokenized data are trimmed to the model columns, raw text is encoded."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{role}_dataset is a DatasetDict with splits {', '.join(dataset)}; pass one split, "
                         f"e.g. dd['train'].")
    if not isinstance(dataset, datasets.Dataset):
        if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            return dataset  # a torch-style dataset of dicts: trusted as model inputs
        raise TypeError(f"{role}_dataset must be a datasets.Dataset (or a sized torch dataset of dicts), "
                        f"got {type(dataset).__name__}.")
    cols = dataset.column_names
    if "input_ids" in cols or "pixel_values" in cols:
        if config.label_column in cols and config.label_column != "labels" and "labels" not in cols:
            dataset = dataset.rename_column(config.label_column, "labels")
        keep = [c for c in dataset.column_names if c in MODEL_INPUTS]
        dataset = dataset.select_columns(keep)
        dataset.set_format("torch")
        return dataset
    if tokenizer is None:
        raise ValueError(f"{role}_dataset holds raw columns ({', '.join(cols)}) and no tokenizer was given: pass "
                         "tokenizer=AutoTokenizer.from_pretrained(...) (or a PruneResult with .tokenizer), or "
                         "tokenize it first (input_ids, attention_mask, labels).")
    from .data import encode_dataset

    label_column = None if task == "causal_lm" else config.label_column
    return encode_dataset(dataset, tokenizer, text_column=config.text_column, label_column=label_column,
                          max_length=config.max_length)


def _collate(examples: list[dict], pad_token_id: int, causal: bool) -> dict[str, torch.Tensor]:
    from .data import collate

    seq_labels = None
    if examples and "labels" in examples[0] and torch.as_tensor(examples[0]["labels"]).dim() == 1:
        seq_labels = [torch.as_tensor(ex["labels"]) for ex in examples]
        examples = [{k: v for k, v in ex.items() if k != "labels"} for ex in examples]
    batch = collate(examples, pad_token_id=pad_token_id)
    if seq_labels is not None:  # per-token labels: pad with -100 so padding never counts in the loss
        width = max(v.numel() for v in seq_labels)
        labels = torch.full((len(seq_labels), width), -100, dtype=torch.long)
        for i, v in enumerate(seq_labels):
            labels[i, : v.numel()] = v
        batch["labels"] = labels
    elif causal and "input_ids" in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return batch


def make_collate(tokenizer: Any, model: nn.Module, task: str):
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    return functools.partial(_collate, pad_token_id=int(pad), causal=task == "causal_lm")


# ---------------------------------------------------------------------------------------------- masks


def resolve_masks(model: nn.Module, result_masks: Any, masks: dict[str, torch.Tensor] | None) -> dict:
    """Masks given explicitly, else those of a PruneResult, else read from the model's zeros."""
    from .masks import masks_from_model

    chosen = masks if masks is not None else result_masks
    if chosen is None:
        chosen = masks_from_model(model)
    params = dict(model.named_parameters())
    out = {}
    for name, mask in chosen.items():
        if name not in params:
            raise ValueError(f"mask for {name!r} matches no parameter of the model; masks must be keyed by "
                             "model.named_parameters() names (as hf_px.prune returns them).")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                             f"{tuple(params[name].shape)}.")
        out[name] = mask.detach().to(torch.bool).cpu()
    return out


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def bind_masks(model: nn.Module, masks_by_name: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask on its device) pairs of a prepared model; works through DDP and FSDP2 (DTensor)."""
    pairs = []
    found = set()
    for name, param in model.named_parameters():
        key = _clean(name)
        if key not in masks_by_name:
            continue
        mask = masks_by_name[key]
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            from torch.distributed.tensor import distribute_tensor

            mask = distribute_tensor(mask.to(param.device_mesh.device_type), param.device_mesh, param.placements)
        elif tuple(param.shape) != tuple(mask.shape):
            raise ValueError(f"parameter {key!r} has shape {tuple(param.shape)} after accelerator.prepare but its "
                             f"mask {tuple(mask.shape)}: flattened FSDP parameters cannot hold masks. Use FSDP2 "
                             "(fsdp_version: 2, as in scripts/configs/accelerate_fsdp.yaml) or DDP.")
        else:
            mask = mask.to(param.device)
        pairs.append((param, mask))
        found.add(key)
    missing = set(masks_by_name) - found
    if missing:
        raise ValueError(f"{len(missing)} masked parameters were not found in the prepared model (e.g. "
                         f"{sorted(missing)[0]!r}); masks must name parameters of the model being trained.")
    return pairs


@torch.no_grad()
def zero_masked_grads(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, mask in pairs:
        if param.grad is not None:
            param.grad.mul_(mask.to(param.grad.dtype))


@torch.no_grad()
def reapply_masks(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, mask in pairs:
        param.mul_(mask.to(param.dtype))


# ---------------------------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------- logging


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


# ---------------------------------------------------------------------------------------------- checkpoints


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


# ---------------------------------------------------------------------------------------------- evaluation


def load_metrics(names: tuple[str, ...], accelerator: Any) -> dict[str, Any]:
    from .metrics import load_metric

    out = {}
    with accelerator.main_process_first():  # the first load copies the script into the modules cache
        for name in names:
            out[name] = load_metric(name, keep_in_memory=True)
    return out


def _compute(metric: Any, name: str, num_labels: int, **kwargs: Any) -> dict[str, float]:
    if name == "f1" and num_labels > 2:
        kwargs["average"] = "macro"
    return {k: float(v) for k, v in metric.compute(**kwargs).items()}


@torch.no_grad()
def evaluate_model(accelerator: Any, model: nn.Module, loader: Any, task: str, metrics: dict[str, Any],
                   num_labels: int = 0) -> dict[str, float]:
    """Loss and metrics over the whole evaluation set, gathered across processes (duplicates dropped)."""
    was_training = model.training
    model.eval()
    losses, preds, refs, nll, ntok = [], [], [], [], []
    for batch in loader:
        with accelerator.autocast():
            out = model(**batch)
        logits = out.logits.float()
        labels = batch["labels"]
        if task == "causal_lm":
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            tok = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                                    ignore_index=-100, reduction="none")
            valid = shift_labels != -100
            seq = torch.stack([(tok * valid).sum(1).double(), valid.sum(1).double()], dim=1)
            seq = accelerator.gather_for_metrics(seq)
            nll.append(seq[:, 0].cpu())
            ntok.append(seq[:, 1].cpu())
            continue
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                                 ignore_index=-100, reduction="none").view(labels.shape[0], -1)
        pred = logits.argmax(-1)
        if labels.dim() > 1:  # per-token labels: ranks may have padded to different widths
            pred = accelerator.pad_across_processes(pred, dim=1, pad_index=0)
            loss = accelerator.pad_across_processes(loss, dim=1, pad_index=0)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
        pred_g, lab_g, loss_g = accelerator.gather_for_metrics((pred, labels, loss))
        keep = lab_g != -100
        preds.append(pred_g[keep].cpu())
        refs.append(lab_g[keep].cpu())
        losses.append(loss_g[keep].cpu())
    model.train(was_training)
    result: dict[str, float] = {}
    if task == "causal_lm":
        total_nll, total_tok = torch.cat(nll), torch.cat(ntok)
        result["eval_loss"] = float(total_nll.sum() / total_tok.sum().clamp(min=1))
        for name, metric in metrics.items():
            kw = {"nll_sum": total_nll.tolist(), "num_tokens": total_tok.long().tolist()} if name == "perplexity" \
                else None
            if kw is None:
                raise ValueError(f"metric {name!r} does not apply to a causal LM; use metrics=('perplexity',).")
            result.update({f"eval_{k}": v for k, v in _compute(metric, name, 0, **kw).items() if k != "loss"})
        return result
    p, r = torch.cat(preds), torch.cat(refs)
    result["eval_loss"] = float(torch.cat(losses).mean()) if len(p) else math.nan
    if len(p):
        num_labels = max(num_labels, int(max(int(p.max()), int(r.max())) + 1))
    for name, metric in metrics.items():
        if name == "perplexity":
            raise ValueError("perplexity applies to causal LMs only; use accuracy or f1 for classification.")
        result.update({f"eval_{k}": v for k, v in
                       _compute(metric, name, num_labels, predictions=p.tolist(), references=r.tolist()).items()})
    return result


# ---------------------------------------------------------------------------------------------- results


def _full(param: torch.Tensor) -> torch.Tensor:
    param = param.detach()
    # FSDP2 leaves DTensor shards; the check needs whole tensors (a collective: every rank runs it)
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def check_sparsity(model: nn.Module, masks: dict[str, torch.Tensor], kept_before: int, total: int) -> dict:
    """Counts before/after; raises if any pruned weight became non-zero (a bug, never expected)."""
    info = {"masked_params": total, "kept_before": kept_before, "density_before": kept_before / max(total, 1)}
    if not masks:
        return info
    params = {n: _full(p) for n, p in model.named_parameters() if n in masks}
    leaked = sum(int((params[n][~m.to(params[n].device)] != 0).sum()) for n, m in masks.items())
    if leaked:
        raise RuntimeError(f"{leaked} pruned weights are non-zero after fine-tuning; masks were not held fixed.")
    kept_after = sum(int((p != 0).sum()) for p in params.values())
    info.update({"nonzero_after": kept_after, "density_after": kept_after / max(total, 1), "pruned_all_zero": True})
    return info


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
