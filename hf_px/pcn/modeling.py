"""PCN projection-mode BERT (docs/pcn.md §6, §8): a frozen per-block basis before Q/K/V (and the FFN input).

This file is self-contained (torch + transformers only) because ``save_pretrained`` copies it next to the
weights, so ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` works without hf_px installed.
Importing ``hf_px.pcn`` registers the same classes with the Auto classes, so no remote code is needed there.

The block type stays ``BertLayer``: only ``attention.self`` and ``intermediate`` are swapped for subclasses,
so architecture registries keyed on block types still find Q/K/V at the usual paths, and the bases
(``attention.self.proj_a``, ``intermediate.proj_f``) sit outside those paths.

Example:
    >>> cfg = PCNBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                     vocab_size=100, qkv_proj_ranks=[16, 8])
    >>> model = PCNBertModel(cfg)
    >>> tuple(model.encoder.layer[1].attention.self.query.weight.shape)
    (32, 8)
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel
from transformers.models.bert.modeling_bert import BertIntermediate, BertSelfAttention

_AUTO_MAP = {
    "AutoConfig": "modeling.PCNBertConfig",
    "AutoModel": "modeling.PCNBertModel",
    "AutoModelForSequenceClassification": "modeling.PCNBertForSequenceClassification",
}


@strict
class PCNBertConfig(BertConfig):
    """BertConfig plus per-block projection ranks (``None`` entries: that block is not projected).

    ``qkv_proj_ranks[i]`` is the rank of block i's shared Q/K/V input basis, ``ffn_in_proj_ranks[i]`` the rank
    of its FFN input basis; ``train_basis`` makes the bases trainable (frozen by default, as in PCN).
    """

    model_type = "pcn_bert"

    qkv_proj_ranks: list[int | None] | None = None
    ffn_in_proj_ranks: list[int | None] | None = None
    train_basis: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(_AUTO_MAP)
        n = self.num_hidden_layers
        for name in ("qkv_proj_ranks", "ffn_in_proj_ranks"):
            ranks = getattr(self, name)
            if ranks is not None and len(ranks) != n:
                raise ValueError(f"{name} needs one entry per layer ({n}), got {len(ranks)}: {ranks}.")
            for r in ranks or []:
                if r is not None and not 1 <= int(r) <= self.hidden_size:
                    raise ValueError(f"{name} entries must be in [1, hidden_size={self.hidden_size}], got {r}.")


class PCNBasis(nn.Linear):
    """A projection z = Uᵀh − Uᵀμ. Frozen unless ``trainable``: the forward detaches the weights, because
    ``from_pretrained`` turns ``requires_grad`` back on for every loaded parameter."""

    def __init__(self, in_features: int, rank: int, trainable: bool = False):
        super().__init__(in_features, rank)
        self.trainable = trainable
        self.requires_grad_(trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainable:
            return super().forward(x)
        return nn.functional.linear(x, self.weight.detach(), self.bias.detach())


def _basis(in_dim: int, rank: int, trainable: bool) -> PCNBasis:
    return PCNBasis(in_dim, rank, trainable)


class PCNBertSelfAttention(BertSelfAttention):
    """Self-attention whose Q/K/V read ``proj_a(h)``, the centred projection of h on a rank-k basis."""

    def __init__(self, config: PCNBertConfig, rank: int, is_causal: bool = False, layer_idx: int | None = None):
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        self.proj_a = _basis(config.hidden_size, rank, config.train_basis)
        self.query = nn.Linear(rank, self.all_head_size)
        self.key = nn.Linear(rank, self.all_head_size)
        self.value = nn.Linear(rank, self.all_head_size)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(self.proj_a(hidden_states), *args, **kwargs)


class PCNBertIntermediate(BertIntermediate):
    """FFN input matrix reading ``proj_f(h)`` instead of h."""

    def __init__(self, config: PCNBertConfig, rank: int):
        super().__init__(config)
        self.proj_f = _basis(config.hidden_size, rank, config.train_basis)
        self.dense = nn.Linear(rank, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(self.proj_f(hidden_states))


def install_projections(bert: BertModel, config: PCNBertConfig) -> None:
    """Swap the projected sub-modules into a freshly built ``BertModel`` (shapes only, weights untouched)."""
    layers = bert.encoder.layer
    for i, layer in enumerate(layers):
        r_a = (config.qkv_proj_ranks or [None] * len(layers))[i]
        r_f = (config.ffn_in_proj_ranks or [None] * len(layers))[i]
        if r_a is not None:
            layer.attention.self = PCNBertSelfAttention(config, int(r_a), is_causal=config.is_decoder,
                                                        layer_idx=i)
        if r_f is not None:
            layer.intermediate = PCNBertIntermediate(config, int(r_f))


class PCNBertModel(BertModel):
    config_class = PCNBertConfig

    def __init__(self, config: PCNBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        install_projections(self, config)


class PCNBertForSequenceClassification(BertForSequenceClassification):
    config_class = PCNBertConfig

    def __init__(self, config: PCNBertConfig):
        super().__init__(config)
        install_projections(self.bert, config)


# save_pretrained copies this file and writes auto_map only for classes that name an auto class
PCNBertConfig.register_for_auto_class("AutoConfig")
PCNBertModel.register_for_auto_class("AutoModel")
PCNBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

# model class to use when converting an in-memory stock model
CONVERSIONS: dict[type, type] = {
    BertModel: PCNBertModel,
    BertForSequenceClassification: PCNBertForSequenceClassification,
}
