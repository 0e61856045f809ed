"""``hf_px.evaluate``: loss and ``evaluate`` metrics of a model on a dataset, on 1 or N processes.

The fine-tuning loop runs the same evaluation pass (:func:`evaluate_model`).

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

import math
from typing import Any

import torch
from torch import nn

from ..config import FinetuneConfig
from ..errors import ConfigError
from ..modeling import Task, task_of
from .accelerator import make_accelerator
from .data import align_labels, make_collate, prepare_dataset
from .metrics import load_metric


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
    config = FinetuneConfig(batch_size=batch_size, max_length=max_length, text_column=text_column,
                            label_column=label_column, progress_bar=False, metrics=metrics)
    accelerator = accelerator or make_accelerator(config)
    task = task_of(model)
    names = tuple(metrics) if metrics else (("perplexity",) if task is Task.CAUSAL_LM else ("accuracy",))
    if task is not Task.CAUSAL_LM:  # string labels take the ids the model's id2label gives them
        dataset, _ = align_labels(dataset, None, label_column, model, write_config=False)
    ds = prepare_dataset(dataset, tokenizer, config, task, "eval")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         collate_fn=make_collate(tokenizer, model, task))
    prepared, loader = accelerator.prepare(model, loader)
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
    result = evaluate_model(accelerator, prepared, loader, task, load_metrics(names, accelerator), num_labels)
    return result


def load_metrics(names: tuple[str, ...], accelerator: Any) -> dict[str, Any]:
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
def evaluate_model(accelerator: Any, model: nn.Module, loader: Any, task: Task, metrics: dict[str, Any],
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
        if task is Task.CAUSAL_LM:
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
    if task is Task.CAUSAL_LM:
        total_nll, total_tok = torch.cat(nll), torch.cat(ntok)
        result["eval_loss"] = float(total_nll.sum() / total_tok.sum().clamp(min=1))
        for name, metric in metrics.items():
            kw = {"nll_sum": total_nll.tolist(), "num_tokens": total_tok.long().tolist()} if name == "perplexity" \
                else None
            if kw is None:
                raise ConfigError(f"metric {name!r} does not apply to a causal LM; set evaluate.metrics: [perplexity].")
            result.update({f"eval_{k}": v for k, v in _compute(metric, name, 0, **kw).items() if k != "loss"})
        return result
    p, r = torch.cat(preds), torch.cat(refs)
    result["eval_loss"] = float(torch.cat(losses).mean()) if len(p) else math.nan
    if len(p):
        num_labels = max(num_labels, int(max(int(p.max()), int(r.max())) + 1))
    for name, metric in metrics.items():
        if name == "perplexity":
            raise ConfigError("perplexity applies to causal LMs only; set evaluate.metrics to accuracy or f1 for "
                              "classification.")
        result.update({f"eval_{k}": v for k, v in
                       _compute(metric, name, num_labels, predictions=p.tolist(), references=r.tolist()).items()})
    return result


# metrics where lower is better: a ratio to the dense model's value is no "share kept"
_LOWER_IS_BETTER = ("loss", "perplexity")


def retained(name: str, value: Any, dense: Any) -> float | None:
    """The share of the dense model's score a compressed model keeps: ``value / dense``.

    Only for higher-is-better metrics (accuracy, F1, ...); ``None`` for losses and perplexity, for missing values
    and for a dense score of 0.

    Example:
        >>> retained("eval_accuracy", 0.86, 0.88), retained("eval_loss", 0.4, 0.3)
        (0.9772727272727273, None)
    """
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, dense))
    if not numbers or not dense or any(word in name for word in _LOWER_IS_BETTER):
        return None
    return float(value) / float(dense)


def baseline_rows(metrics: dict[str, Any] | None, dense: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per metric the two runs share: ``{"metric", "dense", "value", "retained"}``."""
    metrics, dense = metrics or {}, dense or {}
    return [{"metric": k, "dense": dense[k], "value": metrics[k], "retained": retained(k, metrics[k], dense[k])}
            for k in metrics if k in dense]
