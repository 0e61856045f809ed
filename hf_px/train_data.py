"""Fine-tuning data: the task of a model, tokenized datasets and the padding collator."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels")


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
