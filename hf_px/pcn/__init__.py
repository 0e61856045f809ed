"""PCN width reduction: PCA of calibration activations, then structured FFN neuron selection (default) or
frozen per-block input projections (docs/pcn.md §5, §6).

Importing this package registers the ``pcn_bert`` projection-mode classes with ``AutoConfig``,
``AutoModel`` and ``AutoModelForSequenceClassification``.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_px.pcn import PCNConfig, apply_pcn
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> batches = [{"input_ids": torch.randint(0, 100, (4, 16)), "attention_mask": torch.ones(4, 16)}]
    >>> report = apply_pcn(model, batches, PCNConfig(width=0.5))
    >>> model.config.intermediate_size, report.params_after < report.params_before
    (32, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from ..registry import get_arch
from .config import FLOPS_DEFINITION, PCNConfig, PCNLayerReport, PCNReport
from .modeling import PCNBertConfig, PCNBertForSequenceClassification, PCNBertModel
from .projection import projection_pcn
from .structured import count_params, linear_flops, measured_width, structured_pcn

__all__ = ["FLOPS_DEFINITION", "PCNConfig", "PCNLayerReport", "PCNReport", "apply_pcn", "linear_flops",
           "measured_width", "PCNBertConfig", "PCNBertModel", "PCNBertForSequenceClassification"]


def _register() -> None:
    AutoConfig.register("pcn_bert", PCNBertConfig, exist_ok=True)
    AutoModel.register(PCNBertConfig, PCNBertModel, exist_ok=True)
    AutoModelForSequenceClassification.register(PCNBertConfig, PCNBertForSequenceClassification, exist_ok=True)


_register()


def apply_pcn(model: nn.Module, batches: list[Mapping[str, torch.Tensor]], config: PCNConfig) -> PCNReport:
    """Reduce widths of ``model`` in place from PCA statistics of ``batches`` (list of model-input dicts).

    ``labels`` are dropped from the batches; padding (``attention_mask == 0``) is left out of the statistics.
    Every real token is one sample of each layer's PCA: a layer that keeps as many components as there are
    tokens (or more) gets a rank-deficient PCA whose explained variance is 1.0 whatever the layer does; that is
    warned about and flagged in ``report.undersampled``. Give at least
    ``config.calibration_factor`` x :func:`measured_width` tokens (``hf-px run`` draws them).
    Structured mode keeps the model's class (stock ``from_pretrained`` reloads it); projection mode turns a
    BERT model into its ``pcn_bert`` class (``report.model`` is the same object). Run structured mode first
    and projection mode second to combine them.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100))
        >>> report = apply_pcn(model, [{"input_ids": torch.randint(0, 100, (2, 8))}], PCNConfig(width=16))
        >>> model.config.n_inner, [lr.width_after for lr in report.layers]
        (16, [16, 16])
    """
    if not isinstance(config, PCNConfig):
        raise TypeError(f"config must be an hf_px.pcn.PCNConfig, got {type(config).__name__}.")
    if not batches:
        raise ValueError("apply_pcn needs at least one calibration batch (a dict of model-input tensors).")
    spec = get_arch(model)
    report = PCNReport(config=config, params_before=count_params(model), flops_before=linear_flops(model))
    if config.mode == "structured":
        layers, tokens = structured_pcn(model, list(batches), config, spec)
    else:
        layers, tokens = projection_pcn(model, list(batches), config, spec)
    report.layers, report.calibration_tokens, report.model = layers, tokens, model
    report.params_after, report.flops_after = count_params(model), linear_flops(model)
    short = report.undersampled_layers()
    report.undersampled = bool(short)
    if short:
        keep = max(max(lr.width_after, lr.components) for lr in layers)
        widest = max(lr.width_before for lr in layers)
        warnings.warn(
            f"PCN had {tokens:,} calibration tokens but keeps up to {keep:,} components (layers {short}): with "
            f"fewer tokens than components the PCA is rank-deficient and its explained variance (1.0) says "
            f"nothing about the layer. Give at least {config.calibration_factor:g} x {widest:,} = "
            f"{int(config.calibration_factor * widest):,} tokens (more or longer calibration examples).",
            UserWarning, stacklevel=2)
    return report
