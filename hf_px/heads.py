"""Task heads: the dense layers after the trunk, replayed in every surrogate mode.

Heads keep their raw signed weights in both auxiliary passes (docs/px.md §5.6): entered as all-ones they would make
every output's data term equal and the ranking independent of the data. Their activations are gated like the
trunk's (g² in A, identity in B). Heads are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.bert import modeling_bert as _bert
from transformers.models.distilbert import modeling_distilbert as _distilbert
from transformers.models.gpt2 import modeling_gpt2 as _gpt2
from transformers.models.llama import modeling_llama as _llama
from transformers.models.roberta import modeling_roberta as _roberta
from transformers.models.vit import modeling_vit as _vit

from .surrogate import secant_gate

_ACTS = {"tanh": nn.Tanh(), "relu": nn.ReLU()}


@dataclass
class HeadSpec:
    pooling: str  # "first" token, "last" non-pad token, "mean" over real tokens, or "none" (every position)
    layers: list[tuple[nn.Module, str | None]]  # (Linear, activation after it)
    task: str = "classification"  # or "causal-lm", "features"


def head_spec(model: nn.Module) -> HeadSpec | None:
    """Head layout of a known task class; None when the model class is not known."""
    if isinstance(model, (_bert.BertForSequenceClassification,)):
        return HeadSpec("first", [(model.bert.pooler.dense, "tanh"), (model.classifier, None)])
    if isinstance(model, _roberta.RobertaForSequenceClassification):
        return HeadSpec("first", [(model.classifier.dense, "tanh"), (model.classifier.out_proj, None)])
    if isinstance(model, _distilbert.DistilBertForSequenceClassification):
        return HeadSpec("first", [(model.pre_classifier, "relu"), (model.classifier, None)])
    if isinstance(model, _vit.ViTForImageClassification):
        return HeadSpec("first", [(model.classifier, None)])
    if isinstance(model, (_gpt2.GPT2ForSequenceClassification, _llama.LlamaForSequenceClassification)):
        return HeadSpec("last", [(model.score, None)])
    if isinstance(model, (_gpt2.GPT2LMHeadModel, _llama.LlamaForCausalLM)):
        return HeadSpec("none", [(model.lm_head, None)], task="causal-lm")
    if model is getattr(model, "base_model", None):
        return HeadSpec("mean", [], task="features")
    return None


def pool(spec: HeadSpec, hidden: torch.Tensor, batch: dict, pad_token_id: int | None) -> torch.Tensor:
    """Pick the positions the head reads, exactly as the task classes of transformers do."""
    if spec.pooling == "first":
        return hidden[:, 0]
    if spec.pooling == "last":
        ids = batch.get("input_ids")
        if ids is None or pad_token_id is None:
            return hidden[:, -1]
        positions = torch.arange(ids.shape[-1], device=ids.device)
        last = (positions * (ids != pad_token_id).int()).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if spec.pooling == "mean":
        mask = batch.get("attention_mask")
        if mask is None:
            return hidden.mean(1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    return hidden


def run_head(spec: HeadSpec, pooled: torch.Tensor, mode: str, gates: dict | None = None) -> torch.Tensor:
    """Apply the head in ``mode``: real (records gates into ``gates``), A (raw weights, g², no bias), B."""
    x = pooled
    for i, (linear, act) in enumerate(spec.layers):
        weight = linear.weight.to(x.dtype)
        if mode in ("real", "record"):
            x = nn.functional.linear(x, weight, None if linear.bias is None else linear.bias.to(x.dtype))
            if act is not None:
                if gates is not None:
                    gates[i] = secant_gate(_ACTS[act], x.detach())
                x = _ACTS[act](x)
        else:
            x = nn.functional.linear(x, weight)
            if act is not None and mode == "A":
                g = gates[i].to(x.dtype)
                x = x * g * g
    return x
