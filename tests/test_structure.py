"""hf_px.structure: block and head removal that stock from_pretrained rebuilds, and the rankings that choose them."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny, tiny_batches
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from hf_px.errors import ConfigError, HfPxError
from hf_px.registry import base_model_of, get_arch, get_module, supported_architectures
from hf_px.structure import collapsed_blocks, rank_blocks, rank_heads, remove_blocks, remove_heads

AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification,
        "roberta": AutoModelForSequenceClassification, "distilbert": AutoModelForSequenceClassification,
        "vit": AutoModelForImageClassification}
COUNT_ATTR = {"llama": "num_hidden_layers", "gpt2": "n_layer", "bert": "num_hidden_layers",
              "roberta": "num_hidden_layers", "distilbert": "n_layers", "vit": "num_hidden_layers"}


def deeper(family: str, layers: int = 3, seed: int = 1, **config) -> torch.nn.Module:
    """A tiny model of ``family`` (tests/tiny_models.py sizes) with ``layers`` blocks."""
    model = tiny(family)
    cfg = model.config
    cfg.num_hidden_layers = layers  # attribute_map: n_layer / n_layers
    for name, value in config.items():
        setattr(cfg, name, value)
    torch.manual_seed(seed)
    return type(model)(cfg).eval()


def inputs(model: torch.nn.Module) -> dict:
    batch = dict(tiny_batches(model)[0])  # holds a right-padded row
    batch.pop("labels")
    return batch


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def reload(model: torch.nn.Module, family: str, tmp_path) -> torch.nn.Module:
    model.save_pretrained(tmp_path / "m")
    return AUTO[family].from_pretrained(tmp_path / "m").eval()


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    return get_arch(model).blocks(base_model_of(model))


@torch.no_grad()
def zero_residual_writers(model: torch.nn.Module, block: int) -> None:
    spec = get_arch(model)
    for ref in spec.layers:
        if ref.role in spec.residual_roles:
            module = get_module(blocks_of(model)[block], ref.path)
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()


def layer_indices(model: torch.nn.Module) -> list[int]:
    return [m.layer_idx for blk in blocks_of(model) for m in blk.modules() if isinstance(getattr(m, "layer_idx", None), int)]


# --- remove_blocks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "roberta", "distilbert", "vit"])
def test_remove_blocks_reloads_with_stock_classes(family, tmp_path):
    model = deeper(family)
    spec = get_arch(model)
    last_q = get_module(blocks_of(model)[2], spec.layers[0].path).weight.detach().clone()
    params = sum(p.numel() for p in model.parameters())

    record = remove_blocks(model, [1])

    assert record["removed"] == [1] and record["kept"] == [0, 2]
    assert (record["layers_before"], record["layers_after"]) == (3, 2)
    assert record["config"] == {COUNT_ATTR[family]: 2}
    assert record["params_removed"] == params - sum(p.numel() for p in model.parameters()) > 0
    assert len(blocks_of(model)) == 2
    assert torch.equal(get_module(blocks_of(model)[1], spec.layers[0].path).weight, last_q)  # old block 2 moved up
    batch = inputs(model)
    reloaded = reload(model, family, tmp_path)
    assert getattr(reloaded.config, COUNT_ATTR[family]) == 2
    if family == "distilbert":  # the trunk copies the count at construction
        assert model.distilbert.transformer.n_layers == 2
    assert len(blocks_of(reloaded)) == 2
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_remove_blocks_shortens_per_layer_lists(tmp_path):
    model = deeper("llama")
    model.config.layer_types = ["full_attention"] * 3
    model.config.hf_px_pcn = {"mode": "structured", "intermediate_sizes": [48, 40, 32], "padded_to": 48}

    record = remove_blocks(model, [1])

    assert record["config"]["layer_types"] == ["full_attention"] * 2
    reloaded = reload(model, "llama", tmp_path)
    assert reloaded.config.layer_types == ["full_attention"] * 2
    assert reloaded.config.hf_px_pcn == {"mode": "structured", "intermediate_sizes": [48, 32], "padded_to": 48}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zeroed_block_on_pre_norm_family_is_found_ranked_first_and_removed_exactly(family, tmp_path):
    model = deeper(family)
    zero_residual_writers(model, 1)
    batch = inputs(model)
    before = logits(model, batch)

    assert [(c["block"], c["identity"], c["nonzero_bias"]) for c in collapsed_blocks(model)] == [(1, True, [])]
    ranking = rank_blocks(model, tiny_batches(model), method="px")
    assert [r["block"] for r in ranking][0] == 1
    assert ranking[0]["score"] == 0.0 and ranking[0]["share"] == 0.0
    assert all(r["score"] > 0 for r in ranking[1:])
    assert sum(r["share"] for r in ranking) == pytest.approx(1.0)

    remove_blocks(model, [c["block"] for c in collapsed_blocks(model)])
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(reload(model, family, tmp_path), batch), before, atol=1e-6, rtol=0)
    assert collapsed_blocks(model) == []


def test_collapsed_block_with_a_live_bias_is_not_an_identity():
    model = deeper("gpt2")
    zero_residual_writers(model, 2)
    with torch.no_grad():  # GPT-2's Conv1D always has a bias; a non-zero one still adds a constant
        blocks_of(model)[2].mlp.c_proj.bias.fill_(0.1)

    (found,) = collapsed_blocks(model)
    assert found["block"] == 2 and found["bias"] == ["o", "ffn_out"]
    assert found["nonzero_bias"] == ["ffn_out"] and found["identity"] is False


def test_zeroed_block_on_post_norm_bert_only_applies_its_norms(tmp_path):
    model = deeper("bert")
    zero_residual_writers(model, 1)
    block = blocks_of(model)[1]
    seen = {}
    handle = block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out[0] if isinstance(out, tuple) else out))
    logits(model, inputs(model))
    handle.remove()

    # post-norm: LN2(LN1(x + 0) + 0), not the identity, so removal is not exact here
    (found,) = collapsed_blocks(model)
    assert found["block"] == 1 and found["identity"] is False
    with torch.no_grad():
        expected = block.output.LayerNorm(block.attention.output.LayerNorm(seen["x"]))
    torch.testing.assert_close(seen["y"], expected, atol=1e-6, rtol=0)
    assert rank_blocks(model, tiny_batches(model), method="px")[0]["block"] == 1

    batch = inputs(model)
    remove_blocks(model, [1])
    torch.testing.assert_close(logits(reload(model, "bert", tmp_path), batch), logits(model, batch), atol=1e-6, rtol=0)


def test_gpt2_inverse_layer_scaling_follows_the_new_index(tmp_path):
    model = deeper("gpt2", scale_attn_by_inverse_layer_idx=True)
    zero_residual_writers(model, 0)
    batch = inputs(model)
    before = logits(model, batch)

    remove_blocks(model, [0])  # the kept blocks move from positions 1, 2 to 0, 1: their score divisor changes

    assert [blk.attn.scaling for blk in blocks_of(model)] == [16 ** -0.5 / 1, 16 ** -0.5 / 2]  # head size 32 / 2
    torch.testing.assert_close(logits(model, batch), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(reload(model, "gpt2", tmp_path), batch), logits(model, batch), atol=1e-6, rtol=0)


def greedy(model: torch.nn.Module, use_cache: bool) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 33, 8], [41, 9, 60, 11]])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_with_cache_after_block_removal(family, tmp_path):
    model = deeper(family)
    remove_blocks(model, [0])

    assert layer_indices(model) == [0, 1]  # the KV cache is indexed by layer_idx
    cached = greedy(model, use_cache=True)
    assert cached.shape == (2, 10)
    assert torch.equal(cached, greedy(model, use_cache=False))
    assert torch.equal(greedy(reload(model, family, tmp_path), use_cache=True), cached)


# --- remove_heads ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def zero_head_outputs(model: torch.nn.Module, heads: dict[int, list[int]]) -> None:
    hd = model.config.head_dim
    for b, hs in heads.items():
        for h in hs:
            model.model.layers[b].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0


@pytest.mark.parametrize(("heads", "kv", "query_heads", "after"), [
    ({0: [1], 1: [0]}, True, {0: [2, 3], 1: [0, 1]}, (2, 1)),  # one KV head and its query group per block
    ({0: [1, 3], 1: [0, 2]}, False, {0: [1, 3], 1: [0, 2]}, (2, 2)),  # one query head from each group
])
@pytest.mark.parametrize("bias", [False, True])
def test_remove_heads_preserves_zeroed_heads_and_reloads(heads, kv, query_heads, after, bias, tmp_path):
    model = tiny("llama", attention_bias=bias)  # 4 query heads over 2 KV heads, head_dim 8
    zero_head_outputs(model, query_heads)
    batch = inputs(model)
    before = logits(model, batch)

    record = remove_heads(model, heads, kv_heads=kv)

    assert record["removed"] == query_heads
    assert (record["heads_after"], record["kv_heads_after"]) == after
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (*after, 8)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (after[0] * 8, 32) and attn.k_proj.weight.shape == (after[1] * 8, 32)
    assert attn.o_proj.weight.shape == (32, after[0] * 8) and attn.num_key_value_groups == after[0] // after[1]
    if bias:
        assert attn.q_proj.bias.shape == (after[0] * 8,) and attn.v_proj.bias.shape == (after[1] * 8,)
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)
    reloaded = reload(model, "llama", tmp_path)
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == after
    torch.testing.assert_close(logits(reloaded, batch), before, atol=1e-6, rtol=0)
    cached = greedy(model, use_cache=True)
    assert torch.equal(cached, greedy(model, use_cache=False))
    assert torch.equal(greedy(reloaded, use_cache=True), cached)


def test_generation_with_cache_after_block_and_head_removal(tmp_path):
    model = deeper("llama")
    remove_blocks(model, [1])
    remove_heads(model, {0: [0], 1: [1]}, kv_heads=True)

    assert layer_indices(model) == [0, 1]
    cached = greedy(model, use_cache=True)
    assert torch.equal(cached, greedy(model, use_cache=False))
    assert torch.equal(greedy(reload(model, "llama", tmp_path), use_cache=True), cached)


def test_rank_heads_puts_zeroed_heads_first():
    model = tiny("llama")
    zero_head_outputs(model, {0: [2, 3], 1: [0, 1]})  # KV group 1 of block 0, group 0 of block 1
    by_kv = rank_heads(model, tiny_batches(model), method="px", kv_heads=True)
    assert {(r["block"], r["kv_head"]) for r in by_kv[:2]} == {(0, 1), (1, 0)}
    assert [r["score"] for r in by_kv[:2]] == [0.0, 0.0] and all(r["score"] > 0 for r in by_kv[2:])
    assert by_kv[0]["heads"] in ([2, 3], [0, 1])

    model = tiny("llama")
    zero_head_outputs(model, {0: [1], 1: [2]})
    score = {(r["block"], r["head"]): r["score"] for r in rank_heads(model, tiny_batches(model), method="px")}
    assert len(score) == 8
    # a head that writes nothing keeps only its share of the group's V, below the partner sharing that V
    assert score[(0, 1)] < score[(0, 0)] and score[(1, 2)] < score[(1, 3)]


def test_rank_heads_covers_fused_gpt2_attention():
    model = deeper("gpt2", layers=2)
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[16:32] = 0  # head 1's input rows of the (in, out) Conv1D
    rows = rank_heads(model, tiny_batches(model), method="px")
    assert (rows[0]["block"], rows[0]["head"], rows[0]["score"]) == (1, 1, 0.0)


# --- errors ----------------------------------------------------------------------------------------------------------

def test_remove_blocks_errors():
    model = deeper("llama")
    with pytest.raises(ConfigError, match=r"block index 3 is out of range: there are 3 blocks, numbered 0\.\.2"):
        remove_blocks(model, [3])
    with pytest.raises(ConfigError, match=r"block index -1 is out of range"):
        remove_blocks(model, [-1])
    with pytest.raises(ConfigError, match=r"block indices \[1\] are given more than once"):
        remove_blocks(model, [1, 1])
    with pytest.raises(ConfigError, match="would remove all 3 blocks; keep at least one"):
        remove_blocks(model, [0, 1, 2])
    assert len(blocks_of(model)) == 3 and model.config.num_hidden_layers == 3


def test_unregistered_architecture_names_the_supported_ones():
    model = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=32))
    for call in (lambda: remove_blocks(model, [0]), lambda: collapsed_blocks(model),
                 lambda: remove_heads(model, {0: [0], 1: [0]})):
        with pytest.raises(HfPxError, match="'mistral' is not one. Supported families: "
                                            + ", ".join(supported_architectures())) as info:
            call()
        assert isinstance(info.value, ConfigError)
        assert "llama" in str(info.value) and "gpt2" in str(info.value)


def test_remove_blocks_refuses_a_config_the_stock_class_rejects():
    model = deeper("llama")
    model.config.layer_types = ["full_attention"] * 4  # not one per block: not shortened, reload would fail
    with pytest.raises(ConfigError, match=r"stock LlamaConfig refuses the new config .*layer_types"):
        remove_blocks(model, [0])
    assert len(blocks_of(model)) == 3 and model.config.num_hidden_layers == 3


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "vit"])
def test_remove_heads_refuses_derived_head_size(family):
    model = tiny(family)
    with pytest.raises(ConfigError, match=r"derives the head size from hidden_size / num_attention_heads \(32 / 2\), "
                                          r"so the stock config cannot express fewer heads.*PCN widths.*remove_blocks"):
        remove_heads(model, {0: [0], 1: [0]})


@pytest.mark.parametrize(("heads", "kv", "message"), [
    ({0: [0, 1]}, False, r"remove the same number of heads in every block \(query heads removed per block: "
                         r"\{0: 2, 1: 0\}\)"),
    ({0: [0], 1: [1]}, False, r"block 0 would leave key/value groups with different numbers of query heads "
                              r"\(group 0: 1, group 1: 2\)"),
    ({0: [0, 1], 1: [0, 2]}, False, r"blocks would keep different numbers of key/value heads \(\{0: 1, 1: 2\}\)"),
    ({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, False, "would remove all 4 heads of every block; remove whole blocks"),
    ({0: [0, 1], 1: [0, 1]}, True, "would remove all 4 heads of every block"),
    ({0: [4], 1: [0]}, False, r"head index 4 in block 0 is out of range: there are 4 heads in block 0"),
    ({0: [2], 1: [0]}, True, r"key/value head index 2 in block 0 is out of range: there are 2 key/value heads"),
    ({0: [1, 1], 1: [0, 2]}, False, r"head indices \[1\] in block 0 are given more than once"),
    ({2: [0]}, False, r"block index 2 is out of range: there are 2 blocks"),
])
def test_remove_heads_errors(heads, kv, message):
    model = tiny("llama")
    with pytest.raises(ConfigError, match=message):
        remove_heads(model, heads, kv_heads=kv)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    assert model.config.num_attention_heads == 4


def test_remove_heads_refuses_head_count_the_stock_config_rejects():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=48))
    # 3 heads of size 8 are a valid model, but LlamaConfig requires hidden_size % num_attention_heads == 0
    with pytest.raises(ConfigError, match=r"stock LlamaConfig refuses the new config .*hidden size \(32\) is not a "
                                          r"multiple of the number of attention heads \(3\)"):
        remove_heads(model, {0: [0], 1: [3]})
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)


def test_rankings_need_calibration_batches():
    model = tiny("llama")
    with pytest.raises(ConfigError, match="rank_blocks with method 'px' needs calibration batches"):
        rank_blocks(model, [])
    with pytest.raises(ConfigError, match="rank_heads with method 'snip' needs calibration batches"):
        rank_heads(model, None, method="snip")
