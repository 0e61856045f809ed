"""Fine-tuning data: tokenized datasets and the padding collator."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..modeling import CLASSIFICATION_TASKS, Task, task_of

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels")


def prepare_dataset(dataset: Any, tokenizer: Any, config: Any, task: Task, role: str) -> Any:
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
    from ..data import encode_dataset

    label_column = None if task is Task.CAUSAL_LM else config.label_column
    return encode_dataset(dataset, tokenizer, text_column=config.text_column, label_column=label_column,
                          max_length=config.max_length)


def prepare_datasets(train_dataset: Any, eval_dataset: Any, tokenizer: Any, config: Any, task: Task,
                     model: nn.Module) -> tuple[Any, Any]:
    """Both splits as model inputs, their labels encoded with one map (see ``align_labels``)."""
    if task is not Task.CAUSAL_LM:
        train_dataset, eval_dataset = align_labels(train_dataset, eval_dataset, config.label_column, model)
    train = prepare_dataset(train_dataset, tokenizer, config, task, "train")
    evals = prepare_dataset(eval_dataset, tokenizer, config, task, "eval") if eval_dataset is not None else None
    return train, evals


def align_labels(reference: Any, evals: Any, label_column: str, model: nn.Module,
                 write_config: bool = True) -> tuple[Any, Any]:
    """``reference`` (the training split) and ``evals`` with labels as ids of one map: the model's own
    ``id2label`` when it names the reference's classes, else the reference's classes; the map goes into the
    model's config (``write_config``). Labels the model's head cannot hold are refused here, before training,
    instead of failing as an IndexError in the loss."""
    import datasets

    from ..data.labels import checkpoint_label_names, encode_labels, infer_num_labels, set_label_names

    def scalar_labels(ds: Any) -> str | None:
        if not isinstance(ds, datasets.Dataset):
            return None  # a torch-style dataset: trusted as model inputs
        col = next((c for c in (label_column, "labels") if c in ds.column_names), None)
        scalar = col is not None and isinstance(ds.features[col], (datasets.ClassLabel, datasets.Value))
        return col if scalar else None  # per-token label lists are left alone

    column = scalar_labels(reference)
    if column is None:
        return reference, evals
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    head = task_of(model) in CLASSIFICATION_TASKS
    labels = infer_num_labels(reference, column, evals if scalar_labels(evals) == column else None,
                              num_labels=config.num_labels if head else None,
                              names=checkpoint_label_names(config) if head else None, setting="num_labels")
    if write_config and head:
        set_label_names(config, labels)
    encoded = encode_labels(evals, labels) if scalar_labels(evals) == column else evals
    return encode_labels(reference, labels), encoded


def _collate(examples: list[dict], pad_token_id: int, causal: bool) -> dict[str, torch.Tensor]:
    from ..data import collate

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


def make_collate(tokenizer: Any, model: nn.Module, task: Task):
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    return functools.partial(_collate, pad_token_id=int(pad), causal=task is Task.CAUSAL_LM)


EXAMPLE_ID = "example_id"  # not a model input: consumers pop it before the forward pass


class _WithExampleIds(torch.utils.data.Dataset):
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], EXAMPLE_ID: index}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # the DataLoader fetches a whole batch through this when it exists: keep datasets' fast batched read
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return [{**item, EXAMPLE_ID: i} for item, i in zip(items, indices, strict=True)]


def with_example_ids(dataset: Any) -> torch.utils.data.Dataset:
    """``dataset`` whose examples also carry their position as ``example_id`` (collated into a 1-D tensor).

    A stable per-example key that survives shuffling, sharding over processes and resumes (the teacher-logit
    cache of distillation uses it). Length, order and the other columns are unchanged, so the sampler draws the
    same batches as for ``dataset`` itself.
    """
    return _WithExampleIds(dataset)


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """A seeded shuffle in which neighbouring ``batch_size`` slices hold examples of similar length.

    Each epoch draws a random permutation, cuts it into windows of ``batch_size * window`` examples, sorts every
    window by length and shuffles the order of the resulting batches. Padding then costs little (each batch is
    padded to its own longest example) while the data order stays random at the scale of windows. The order is a
    function of (seed, epoch) only, so every process and a resumed run see the same batches.

    Example:
        >>> s = LengthGroupedSampler([5, 1, 4, 2, 8, 3], batch_size=2, window=3, seed=0)
        >>> batches = [sorted(list(s)[i:i + 2]) for i in range(0, 6, 2)]
        >>> sorted(tuple(b) for b in batches)
        [(0, 4), (1, 3), (2, 5)]
    """

    def __init__(self, lengths: list[int], batch_size: int, window: int = 50, seed: int = 0) -> None:
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size, self.window, self.seed, self.epoch = batch_size, window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g)
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(perm), span):
            chunk = perm[start:start + span]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches.extend(chunk.split(self.batch_size))
        # a short batch stays last, so every other batch is full (what BatchSampler and the process shards expect)
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        order = torch.randperm(len(full), generator=g).tolist()
        for b in [full[i] for i in order] + short:
            yield from b.tolist()


def sequence_lengths(dataset: Any) -> list[int]:
    """Token count of every example of a tokenized dataset (its ``input_ids``)."""
    names = getattr(dataset, "column_names", None) or []
    if "input_ids" not in names:
        raise ValueError("group_by_length needs tokenized text (an input_ids column); this dataset has "
                         f"{', '.join(names) or 'no named columns'}. Turn group_by_length off for it.")
    return [len(ids) for ids in dataset["input_ids"]]
