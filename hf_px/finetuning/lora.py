"""LoRA adapters on a sparse model whose merge keeps the sparsity.

A plain LoRA delta ``B @ A`` is dense: merging it would refill every pruned weight. Here the adapters sit on
exactly the prunable matrices of the architecture registry, and each adapted layer adds the *masked* delta
``(scale * B @ A) * mask`` both in its forward pass and when merged, so training sees the same function that
:func:`merge_lora` produces and every pruned weight of the merged model is exactly zero.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_px.pruning.masks import masks_from_model
    >>> from hf_px.finetuning.lora import apply_lora, merge_lora
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> peft_model = apply_lora(model, masks_from_model(model), r=4)
    >>> merged = merge_lora(peft_model)   # a plain transformers model again, pruned weights still zero
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.targets import collect_targets

_MASK_ATTR = "_hf_px_delta_mask"


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full module names of the prunable matrices (registry targets), each once (fused weights included)."""
    names = [t.param_name.rsplit(".", 1)[0] for t in collect_targets(model)]
    return list(dict.fromkeys(names))


def _task_type(model: nn.Module) -> str | None:
    """peft's task type, which also keeps a classification head trainable (``modules_to_save``)."""
    from ..modeling import Task, task_of

    return {Task.SEQUENCE_CLASSIFICATION: "SEQ_CLS", Task.CAUSAL_LM: "CAUSAL_LM"}.get(task_of(model))


def _masked_lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft ``lora.Linear.forward`` with the delta masked (vanilla LoRA; other cases use peft's own path)."""
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    out_dtype = result.dtype
    mask = getattr(self, _MASK_ATTR)
    weight = self.get_base_layer().weight
    if mask.device != weight.device:
        mask = mask.to(weight.device)
        setattr(self, _MASK_ATTR, mask)
    # the mask is stored in the base weight's layout; F.linear wants (out, in)
    mask_oi = mask.T if self.fan_in_fan_out else mask
    for adapter in self.active_adapters:
        if adapter not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        delta = (lora_b @ lora_a) * self.scaling[adapter]
        xd = self.lora_dropout[adapter](x.to(lora_a.dtype))
        result = result + F.linear(xd, delta * mask_oi.to(delta.dtype))
    return result.to(out_dtype)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def apply_lora(
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None = None,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    task_type: str | None = None,
) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on its prunable matrices, deltas masked by ``masks``.

    Args:
        model: a (pruned) transformers model from the registry.
        masks: parameter name -> bool mask, as returned by ``hf_px.prune``; None reads them from the zeros.
        r, alpha, dropout: LoRA rank, scaling numerator (scale = alpha / r) and dropout on the adapter input.
        target_modules: module names to adapt; default: every registry target (:func:`lora_target_modules`).
        task_type: peft task type; default from the model class (SEQ_CLS also trains the classifier head).

    Returns:
        The ``peft.PeftModel``; only the adapters (and a classification head) are trainable.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from ..pruning.masks import masks_from_model

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}.")
    if masks is None:
        masks = masks_from_model(model)
    if target_modules is None:
        target_modules = lora_target_modules(model)
    if not target_modules:
        raise ValueError("no LoRA target modules: the model has no prunable matrices in the registry.")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    mask_of_weight: dict[int, torch.Tensor] = {}
    for name in target_modules:
        if name not in modules:
            raise ValueError(f"LoRA target module {name!r} is not in the model; pass names from "
                             "hf_px.finetuning.lora.lora_target_modules(model).")
        wname = f"{name}.weight"
        mask = masks.get(wname)
        if mask is None:
            mask = params[wname].detach() != 0
        mask_of_weight[id(params[wname])] = mask.detach().to(torch.bool).cpu()
    fan_in_fan_out = any(isinstance(modules[n], Conv1D) for n in target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
        task_type=task_type or _task_type(model), fan_in_fan_out=fan_in_fan_out, bias="none",
    )
    peft_model = get_peft_model(model, config)
    for layer in _lora_layers(peft_model):
        weight = layer.get_base_layer().weight
        if id(weight) not in mask_of_weight:
            continue
        if not isinstance(layer.get_base_layer(), (nn.Linear, Conv1D)):
            raise ValueError(f"masked LoRA supports Linear and Conv1D layers, not {type(layer.get_base_layer())}.")
        setattr(layer, _MASK_ATTR, mask_of_weight[id(weight)])
        # bound per instance: peft's class-level forward stays untouched for other models
        layer.forward = types.MethodType(_masked_lora_forward, layer)
    return peft_model


@torch.no_grad()
def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Add each adapter's masked delta into its base weight and return the plain model (adapters removed).

    Every weight that was zero under the mask stays exactly zero. The trained classification head (peft
    ``modules_to_save``) replaces the original head.
    """
    for layer in _lora_layers(peft_model):
        mask = getattr(layer, _MASK_ATTR, None)
        base = layer.get_base_layer()
        if mask is None:
            mask = base.weight != 0
        mask = mask.to(device=base.weight.device, dtype=base.weight.dtype)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta = layer.get_delta_weight(adapter)  # already in the base weight's layout
                base.weight.add_(delta.to(base.weight.dtype) * mask)
    return peft_model.unload()
