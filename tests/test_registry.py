"""A family registered through the public ``register_architecture`` works for every method and for PCN.

The family is a tiny transformers model defined here, unknown to hf_px: its names (``wq``, ``fc_in``, ``ffn_dim``,
``head``) match no registered family, so everything hf_px does with it comes from the ArchSpec below.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import BertConfig, PretrainedConfig, PreTrainedModel, ViTConfig
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

import hf_px
from hf_px import registry
from hf_px.pcn import PCNConfig, apply_pcn
from hf_px.registry import ArchSpec, HeadRef, LayerRef, OffPathGroup

VOCAB, LENGTH = 50, 8


class TinyConfig(PretrainedConfig):
    model_type = "hfpx_test_tiny"

    def __init__(self, vocab: int = VOCAB, width: int = 16, heads: int = 2, depth: int = 2, ffn_dim: int = 24,
                 **kwargs):
        self.vocab, self.width, self.heads, self.depth, self.ffn_dim = vocab, width, heads, depth, ffn_dim
        super().__init__(**kwargs)


class TinyAttention(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config, self.heads = config, config.heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(config.width, config.width) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attend(self, split(self.wq(x)), split(self.wk(x)), split(self.wv(x)), mask,
                        scaling=(d // self.heads) ** -0.5, dropout=0.0)
        return self.wo(out.reshape(b, n, d))


class TinyBlock(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.attn = TinyAttention(config)
        self.norm1, self.norm2 = nn.LayerNorm(config.width), nn.LayerNorm(config.width)
        self.fc_in, self.act, self.fc_out = nn.Linear(config.width, config.ffn_dim), nn.GELU(), \
            nn.Linear(config.ffn_dim, config.width)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(hidden_states + self.attn(hidden_states, mask))
        return self.norm2(h + self.fc_out(self.act(self.fc_in(h))))


class TinyPreTrained(PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "trunk"


class TinyModel(TinyPreTrained):
    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.embed, self.pos = nn.Embedding(config.vocab, config.width), nn.Embedding(LENGTH, config.width)
        self.stack = nn.ModuleList(TinyBlock(config) for _ in range(config.depth))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> BaseModelOutput:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = x + self.pos(torch.arange(x.shape[1])).to(x.dtype)
        mask = None
        if attention_mask is not None:
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.stack:
            x = block(x, mask)
        return BaseModelOutput(last_hidden_state=x)


class TinyForSequenceClassification(TinyPreTrained):
    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.trunk, self.head = TinyModel(config), nn.Linear(config.width, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.trunk.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                **kwargs) -> SequenceClassifierOutput:
        hidden = self.trunk(input_ids, attention_mask, inputs_embeds).last_hidden_state
        return SequenceClassifierOutput(logits=self.head(hidden[:, 0]))


TINY_SPEC = ArchSpec(
    name="hfpx_test_tiny",
    block_types=(TinyBlock,),
    blocks=lambda base: base.stack,
    layers=(LayerRef("q", "attn.wq"), LayerRef("k", "attn.wk"), LayerRef("v", "attn.wv"), LayerRef("o", "attn.wo"),
            LayerRef("ffn_in", "fc_in"), LayerRef("ffn_out", "fc_out")),
    attention="attn",
    activation="act",
    norms=("norm1", "norm2"),
    off_path=(OffPathGroup(roles=("q", "k"), follows=("v", "o")),),
    heads=(HeadRef(TinyForSequenceClassification, "first", (("head", None),)),),
    ffn_width_attr="ffn_dim",
    model_types=("hfpx_test_tiny",),
)


@pytest.fixture
def tiny_family():
    hf_px.register_architecture(TINY_SPEC)
    yield
    registry.ARCHITECTURES.pop(TINY_SPEC.name)


def _model(seed: int = 0) -> TinyForSequenceClassification:
    torch.manual_seed(seed)
    return TinyForSequenceClassification(TinyConfig(num_labels=2)).eval()


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, LENGTH, dtype=torch.long)
    mask[0, -2:] = 0
    return [{"input_ids": torch.randint(0, VOCAB, (4, LENGTH), generator=g), "attention_mask": mask,
             "labels": torch.tensor([0, 1, 0, 1])} for _ in range(2)]


def test_unregistered_family_is_refused_with_the_way_to_register_it():
    with pytest.raises(registry.UnsupportedArchitectureError, match="register_architecture"):
        hf_px.prune(_model(), _batches(), hf_px.PruneConfig(sparsity=0.5, rounds=1), progress=False)


@pytest.mark.parametrize("method", ["px", "snip", "magnitude", "wanda", "synflow", "grasp", "ntk_diag", "random"])
def test_every_method_prunes_a_family_registered_at_run_time(tiny_family, method):
    model, batches = _model(), _batches()
    result = hf_px.prune(model, batches, hf_px.PruneConfig(method=method, sparsity=0.6, rounds=2),
                         progress=False)
    assert abs(result.report["achieved_sparsity"] - 0.6) < 1e-3
    assert {lay["role"] for lay in result.report["layers"]} == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    assert int((model.trunk.stack[1].fc_in.weight == 0).sum()) > 0  # zeros baked into the family's own modules
    assert float(model.head.weight.detach().abs().min()) > 0  # the head from the ArchSpec stays dense
    if method == "px":  # Q/K follow their block's V/O density (the spec's off-path group)
        by = {(lay["block"], lay["role"]): lay["density"] for lay in result.report["layers"]}
        for b in (0, 1):
            vo = (by[(b, "v")] + by[(b, "o")]) / 2
            assert abs(by[(b, "q")] - vo) < 0.02 and abs(by[(b, "k")] - vo) < 0.02
    assert torch.isfinite(model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits).all()


def test_structured_pcn_on_a_registered_family_records_its_own_width_field(tiny_family):
    model, batches = _model(), _batches()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    report = apply_pcn(model, batches, PCNConfig(width=12))
    assert model.config.ffn_dim == 12 and [lay.width_after for lay in report.layers] == [12, 12]
    assert model.trunk.stack[0].fc_in.weight.shape == (12, 16) and model.trunk.stack[0].fc_out.weight.shape == (16, 12)
    assert torch.isfinite(model(**inputs).logits).all()
    reloaded = TinyForSequenceClassification(model.config)  # the config alone rebuilds the reduced shapes
    reloaded.load_state_dict(model.state_dict())


def test_a_config_without_a_task_class_gets_its_family_task():
    assert registry.default_task(TinyConfig()) is None  # the loader then falls back to sequence classification
    hf_px.register_architecture(dataclasses.replace(TINY_SPEC, task="causal-lm"))
    try:
        assert registry.default_task(TinyConfig()) == "causal-lm"
    finally:
        registry.ARCHITECTURES.pop(TINY_SPEC.name)
    assert registry.default_task(ViTConfig()) == "image-classification"
    assert registry.default_task(BertConfig()) is None
