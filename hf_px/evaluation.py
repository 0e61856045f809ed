"""``hf_px.evaluate``: loss and ``evaluate`` metrics of a model on a dataset, on 1 or N processes.

Example:
    >>> import datasets
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> ds = datasets.Dataset.from_dict({"input_ids": [[1, 5, 7, 2]] * 8, "attention_mask": [[1] * 4] * 8,
    ...                                  "label": [0, 1] * 4})
    >>> sorted(evaluate(model, ds))
    ['eval_accuracy', 'eval_loss']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import train_utils as U


def evaluate(
    model: nn.Module,
    dataset: Any,
    tokenizer: Any = None,
    metrics: tuple[str, ...] | list[str] | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    text_column: str | None = None,
    label_column: str = "label",
    accelerator: Any = None,
) -> dict[str, float]:
    """``eval_loss`` plus ``eval_<metric>`` for every metric (default: accuracy, or perplexity for causal LMs).

    Raw text is tokenized with ``tokenizer``; with several processes the data are sharded and the results
    gathered (every process gets the same numbers).
    """
    from .train import FinetuneConfig, _make_accelerator

    config = FinetuneConfig(batch_size=batch_size, max_length=max_length, text_column=text_column,
                            label_column=label_column, progress_bar=False, metrics=metrics)
    accelerator = accelerator or _make_accelerator(config)
    task = U.task_of(model)
    names = tuple(metrics) if metrics else (("perplexity",) if task == "causal_lm" else ("accuracy",))
    ds = U.prepare_dataset(dataset, tokenizer, config, task, "eval")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         collate_fn=U.make_collate(tokenizer, model, task))
    prepared, loader = accelerator.prepare(model, loader)
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
    result = U.evaluate_model(accelerator, prepared, loader, task, U.load_metrics(names, accelerator), num_labels)
    return result
