"""Architecture registry: where the blocks, prunable matrices, norms, activations and heads of a model live.

One entry per architecture family, matched by module *type* (never by parameter-name substrings), and the only
place in hf_px that knows families: each entry reaches, from a block module, the Linear/Conv1D layers every
method may prune and the modules the PX surrogate has to intercept, and names the task heads, the config field
of the FFN width and what the model reads. A family added with :func:`register_architecture` therefore works
for every scoring method and for structured PCN. Every other module of the model is kept dense.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_px.registry import get_arch
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64))
    >>> get_arch(model).name
    'bert'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.models.bert import modeling_bert as _bert
from transformers.models.distilbert import modeling_distilbert as _distilbert
from transformers.models.gpt2 import modeling_gpt2 as _gpt2
from transformers.models.llama import modeling_llama as _llama
from transformers.models.resnet import modeling_resnet as _resnet
from transformers.models.roberta import modeling_roberta as _roberta
from transformers.models.vit import modeling_vit as _vit
from transformers.pytorch_utils import Conv1D

from .errors import HfPxError


class UnsupportedArchitectureError(HfPxError, ValueError):
    """Raised when a model has no registry entry and generic mode was not requested."""


def is_transposed(module: nn.Module) -> bool:
    """Whether the weight is stored (in, out): transformers' ``Conv1D`` (GPT-2); Linear stores (out, in)."""
    return isinstance(module, Conv1D)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear/Conv1D as (out, in), a view."""
    return module.weight.T if is_transposed(module) else module.weight


# Roles of prunable matrices. Q/K (and a gated MLP's gate) are "off-path" for PX: with the attention
# probabilities / gate values frozen they carry no path, so they follow the density of a reference group.
ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("ffn_gate", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class LayerRef:
    """One prunable matrix inside a block.

    ``split`` selects a part of a fused weight (GPT-2 ``c_attn`` holds Q|K|V as column thirds of a Conv1D weight
    of shape (in, 3*out)): a tuple (dim, index, parts) meaning part ``index`` of ``parts`` along ``dim``.
    """

    role: str
    path: str  # attribute path relative to the block, e.g. "attention.self.query"
    split: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class OffPathGroup:
    """Roles that PX cannot score, and the on-path roles of the same block whose density they follow."""

    roles: tuple[str, ...]
    follows: tuple[str, ...]


@dataclass(frozen=True)
class HeadRef:
    """The task head of one model class: the dense layers after the trunk (never pruned; PX replays them raw).

    ``layers`` are (path from the task model, activation after it: "tanh", "relu" or None); ``pooling`` is
    which positions the head reads: "first" token, "last" non-pad token, "mean" over real tokens or "none"
    (every position, e.g. a language-model head).
    """

    model_class: type  # matched with isinstance
    pooling: str
    layers: tuple[tuple[str, str | None], ...]
    task: str = "classification"  # or "causal-lm"


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family. Paths are dotted attribute paths relative to a block unless noted."""

    name: str
    block_types: tuple[type, ...]
    blocks: Callable[[nn.Module], nn.ModuleList]  # base model -> ModuleList of repeated blocks
    layers: tuple[LayerRef, ...]
    attention: str  # path of the module that calls the attention interface
    activation: str  # path of the FFN activation module
    norms: tuple[str, ...]  # paths of the norms inside a block
    final_norm: str | None = None  # path (relative to the base model) of a norm after the last block
    gated_mlp: bool = False  # act(gate(x)) * up(x)
    causal: bool = False
    norm_kind: str = "layernorm"  # or "rmsnorm"
    off_path: tuple[OffPathGroup, ...] = field(default_factory=tuple)
    heads: tuple[HeadRef, ...] = ()  # task classes PX can score (a base model alone needs none)
    ffn_width_attr: str = "intermediate_size"  # config field PCN rewrites with the new FFN width
    ffn_bias_attr: str | None = None  # config flag that gives every MLP matrix a bias (PCN's mean compensation)
    model_types: tuple[str, ...] = ()  # config.model_type values of the family
    task: str | None = None  # task of a checkpoint whose config names no task class (None: sequence-classification)
    inputs: str = "input_ids"  # what the model reads: "input_ids" or "pixel_values"
    # Structural removal (hf_px.structure). Config names are the standard transformers names; a config's
    # attribute_map resolves them (GPT-2 stores num_hidden_layers as n_layer, DistilBERT as n_layers).
    layers_attr: str = "num_hidden_layers"  # config field holding the number of blocks
    residual_roles: tuple[str, ...] = ("o", "ffn_out")  # roles whose output is added to the residual stream
    pre_norm: bool = False  # norms before each branch: a block whose residual writers are all zero is an identity
    heads_attr: str = "num_attention_heads"  # config field holding the number of query heads
    kv_heads_attr: str | None = None  # config field of the key/value head count (grouped-query attention)
    head_dim_attr: str | None = None  # config field fixing the head size; None: hidden_size / heads (no fewer heads)
    # called as reindex(block, old, new) after remove_blocks renumbers a block whose computation depends on its
    # position (GPT-2's scale_attn_by_inverse_layer_idx); must leave the block computing what it computed before
    reindex: Callable[[nn.Module, int, int], None] | None = None

    def block_modules(self, base: nn.Module) -> list[nn.Module]:
        return list(self.blocks(base))


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted attribute path (structural access, e.g. ``attention.self.query``)."""
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


_QK_FOLLOW_VO = OffPathGroup(roles=("q", "k"), follows=("v", "o"))


@torch.no_grad()
def _gpt2_reindex(block: nn.Module, old: int, new: int) -> None:
    """Keep a renumbered GPT-2 block's attention scores when they are divided by (layer_idx + 1).

    The divisor is baked into ``attn.scaling`` at construction, and a reload builds it from the new index, so the
    new scaling is set here and the queries are multiplied by (new + 1) / (old + 1) to cancel the change exactly
    in exact arithmetic (the scores are bilinear in the queries).
    """
    for attn in block.modules():
        if not isinstance(attn, _gpt2.GPT2Attention) or not attn.scale_attn_by_inverse_layer_idx or old == new:
            continue
        factor = (new + 1) / (old + 1)
        if attn.is_cross_attention:
            attn.q_attn.weight.mul_(factor)
            attn.q_attn.bias.mul_(factor)
        else:  # c_attn is Q|K|V along its output columns
            attn.c_attn.weight[:, :attn.split_size].mul_(factor)
            attn.c_attn.bias[:attn.split_size].mul_(factor)
        scaling = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0  # as GPT2Attention.__init__ computes it
        attn.scaling = scaling / float(new + 1)


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Add an architecture family to the registry (later entries may override earlier ones)."""
    ARCHITECTURES[spec.name] = spec
    return spec


register_architecture(ArchSpec(
    name="bert",
    block_types=(_bert.BertLayer, _roberta.RobertaLayer),
    blocks=lambda base: base.encoder.layer,
    layers=(
        LayerRef("q", "attention.self.query"), LayerRef("k", "attention.self.key"),
        LayerRef("v", "attention.self.value"), LayerRef("o", "attention.output.dense"),
        LayerRef("ffn_in", "intermediate.dense"), LayerRef("ffn_out", "output.dense"),
    ),
    attention="attention.self",
    activation="intermediate.intermediate_act_fn",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    off_path=(_QK_FOLLOW_VO,),
    heads=(HeadRef(_bert.BertForSequenceClassification, "first", (("bert.pooler.dense", "tanh"), ("classifier", None))),
           HeadRef(_roberta.RobertaForSequenceClassification, "first",
                   (("classifier.dense", "tanh"), ("classifier.out_proj", None)))),
    model_types=("bert", "roberta"),
))

register_architecture(ArchSpec(
    name="distilbert",
    block_types=(_distilbert.TransformerBlock,),
    blocks=lambda base: base.transformer.layer,
    layers=(
        LayerRef("q", "attention.q_lin"), LayerRef("k", "attention.k_lin"),
        LayerRef("v", "attention.v_lin"), LayerRef("o", "attention.out_lin"),
        LayerRef("ffn_in", "ffn.lin1"), LayerRef("ffn_out", "ffn.lin2"),
    ),
    attention="attention",
    activation="ffn.activation",
    norms=("sa_layer_norm", "output_layer_norm"),
    off_path=(_QK_FOLLOW_VO,),
    heads=(HeadRef(_distilbert.DistilBertForSequenceClassification, "first",
                   (("pre_classifier", "relu"), ("classifier", None))),),
    ffn_width_attr="hidden_dim",
    model_types=("distilbert",),
))

register_architecture(ArchSpec(
    name="gpt2",
    block_types=(_gpt2.GPT2Block,),
    blocks=lambda base: base.h,
    layers=(
        LayerRef("q", "attn.c_attn", split=(1, 0, 3)), LayerRef("k", "attn.c_attn", split=(1, 1, 3)),
        LayerRef("v", "attn.c_attn", split=(1, 2, 3)), LayerRef("o", "attn.c_proj"),
        LayerRef("ffn_in", "mlp.c_fc"), LayerRef("ffn_out", "mlp.c_proj"),
    ),
    attention="attn",
    activation="mlp.act",
    norms=("ln_1", "ln_2"),
    final_norm="ln_f",
    pre_norm=True,
    reindex=_gpt2_reindex,
    causal=True,
    off_path=(_QK_FOLLOW_VO,),
    heads=(HeadRef(_gpt2.GPT2ForSequenceClassification, "last", (("score", None),)),
           HeadRef(_gpt2.GPT2LMHeadModel, "none", (("lm_head", None),), task="causal-lm")),
    ffn_width_attr="n_inner",
    model_types=("gpt2",),
))

register_architecture(ArchSpec(
    name="llama",
    block_types=(_llama.LlamaDecoderLayer,),
    blocks=lambda base: base.layers,
    layers=(
        LayerRef("q", "self_attn.q_proj"), LayerRef("k", "self_attn.k_proj"),
        LayerRef("v", "self_attn.v_proj"), LayerRef("o", "self_attn.o_proj"),
        LayerRef("ffn_gate", "mlp.gate_proj"), LayerRef("ffn_in", "mlp.up_proj"),
        LayerRef("ffn_out", "mlp.down_proj"),
    ),
    attention="self_attn",
    activation="mlp.act_fn",
    norms=("input_layernorm", "post_attention_layernorm"),
    final_norm="norm",
    pre_norm=True,
    kv_heads_attr="num_key_value_heads",
    head_dim_attr="head_dim",
    gated_mlp=True,
    causal=True,
    norm_kind="rmsnorm",
    off_path=(_QK_FOLLOW_VO, OffPathGroup(roles=("ffn_gate",), follows=("ffn_in", "ffn_out"))),
    heads=(HeadRef(_llama.LlamaForSequenceClassification, "last", (("score", None),)),
           HeadRef(_llama.LlamaForCausalLM, "none", (("lm_head", None),), task="causal-lm")),
    ffn_bias_attr="mlp_bias",
    model_types=("llama",),
))

register_architecture(ArchSpec(
    name="vit",
    block_types=(_vit.ViTLayer,),
    blocks=lambda base: base.layers,
    layers=(
        LayerRef("q", "attention.q_proj"), LayerRef("k", "attention.k_proj"),
        LayerRef("v", "attention.v_proj"), LayerRef("o", "attention.o_proj"),
        LayerRef("ffn_in", "mlp.fc1"), LayerRef("ffn_out", "mlp.fc2"),
    ),
    attention="attention",
    activation="mlp.activation_fn",
    norms=("layernorm_before", "layernorm_after"),
    final_norm="layernorm",
    pre_norm=True,
    off_path=(_QK_FOLLOW_VO,),
    heads=(HeadRef(_vit.ViTForImageClassification, "first", (("classifier", None),)),),
    model_types=("vit",),
    task="image-classification",
    inputs="pixel_values",
))


def _resnet_convs(base: nn.Module) -> nn.ModuleList:
    """Every conv of a ResNet trunk in forward order: the stem, each stage's branch convs and its shortcuts."""
    return nn.ModuleList([m for m in base.modules() if isinstance(m, (_resnet.ResNetConvLayer, _resnet.ResNetShortCut))])


# A BatchNorm ConvNet (norm_kind "batchnorm"): PX scores it with the exact path network of
# hf_px.pruning.scoring.path_network (docs/px.md §4.3), not with the transformer surrogate, so the
# attention/activation/norm paths below are descriptive only. Each "block" is one conv layer (ResNetConvLayer or
# the 1x1 projection ResNetShortCut); the classifier stays dense and enters PX with raw weights.
register_architecture(ArchSpec(
    name="resnet",
    block_types=(_resnet.ResNetConvLayer, _resnet.ResNetShortCut),
    blocks=_resnet_convs,
    layers=(LayerRef("conv", "convolution"),),
    attention="",  # no attention
    activation="activation",
    norms=("normalization",),
    norm_kind="batchnorm",
    heads=(HeadRef(_resnet.ResNetForImageClassification, "mean", (("classifier.1", None),)),),
    ffn_width_attr="hidden_sizes",
    layers_attr="depths",
    residual_roles=(),
    model_types=("resnet",),
    task="image-classification",
    inputs="pixel_values",
))

def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformer trunk (``model.base_model`` for Hugging Face models)."""
    return getattr(model, "base_model", model)


def find_arch(model: nn.Module) -> ArchSpec | None:
    """Registry entry whose block type occurs in ``model``, or None."""
    block_types = {type(m) for m in model.modules()}
    for spec in ARCHITECTURES.values():
        if any(t in block_types for t in spec.block_types):
            return spec
    return None


def default_task(config: object) -> str | None:
    """The task a family's checkpoints load for when ``config.architectures`` names none (ViT: image-classification)."""
    model_type = getattr(config, "model_type", None)
    return next((s.task for s in ARCHITECTURES.values() if model_type in s.model_types and s.task), None)


def get_arch(model: nn.Module) -> ArchSpec:
    """Registry entry for ``model``; raises a clear error listing the supported families."""
    spec = find_arch(model)
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedArchitectureError(
            f"hf_px has no registry entry for model type {model_type!r}. Supported families: "
            f"{', '.join(supported_architectures())} (BERT covers RoBERTa and MiniLM). Set prune.generic: true "
            "(PruneConfig(generic=True)) to prune every nn.Linear inside the repeated blocks, scored by the exact NTK "
            "diagonal, or register an ArchSpec with hf_px.registry.register_architecture."
        )
    return spec


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


@dataclass
class HeadSpec:
    """A :class:`HeadRef` resolved on one model: the head's modules themselves."""

    pooling: str
    layers: list[tuple[nn.Module, str | None]]  # (Linear, activation after it)
    task: str = "classification"  # or "causal-lm", "features"


def head_spec(model: nn.Module) -> HeadSpec | None:
    """The head of ``model`` from its family's ``heads``; a bare trunk is mean-pooled features; else None."""
    spec = find_arch(model)
    for ref in spec.heads if spec is not None else ():
        if isinstance(model, ref.model_class):
            return HeadSpec(ref.pooling, [(get_module(model, path), act) for path, act in ref.layers], ref.task)
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
