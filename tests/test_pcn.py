"""Tests for hf_px.pcn: PCA statistics, structured FFN selection and BERT projection mode."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from hf_px import registry
from hf_px.pcn import PCNConfig, apply_pcn
from hf_px.pcn.stats import (
    RunningMoments,
    choose_width,
    collect_input_moments,
    components_for_variance,
    explained_variance,
    pca,
)
from hf_px.pruning.targets import collect_targets

VOCAB = 100


def text_batches(n: int = 2, batch: int = 4, seq: int = 16, seed: int = 0, pad_token: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0  # one padded sequence per batch
        ids[0, seq // 2:] = pad_token
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(batch, dtype=torch.long)})
    return out


def tiny_bert(num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                                      bos_token_id=0, eos_token_id=0)).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                        bos_token_id=0, eos_token_id=0)).eval()


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, num_labels=3)).eval()


def image_batches(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(4, 1, 16, 16, generator=g)} for _ in range(n)]


MODELS = {
    "bert": (tiny_bert, text_batches, AutoModelForSequenceClassification),
    "gpt2": (tiny_gpt2, text_batches, AutoModelForCausalLM),
    "llama": (tiny_llama, text_batches, AutoModelForCausalLM),
    "vit": (tiny_vit, image_batches, AutoModelForImageClassification),
}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# ---------------------------------------------------------------- statistics, PCA and the choice of k

def test_streaming_moments_match_torch_cov_and_eigh_with_padding_excluded():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, inputs_embeds, attention_mask):
            return self.lin(inputs_embeds)

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)
    batches, real = [], []
    for b in range(3):
        x = torch.randn(2, 5, 6, generator=g) @ mix + 3.0
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, 3 - b:] = 0
        x[mask == 0] = 1e4  # padding garbage must not reach the statistics
        batches.append({"inputs_embeds": x, "attention_mask": mask})
        real.append(x[mask.bool()])
    model = Toy()
    moments, tokens = collect_input_moments(model, batches, {"lin": model.lin})
    ref_rows = torch.cat(real).double()
    assert moments["lin"].count == ref_rows.shape[0] == tokens
    ref_cov = torch.cov(ref_rows.T)
    assert torch.allclose(moments["lin"].mean, ref_rows.mean(0), atol=1e-10)
    assert torch.allclose(moments["lin"].covariance(), ref_cov, atol=1e-9)
    evals, evecs = pca(moments["lin"].covariance())
    ref_vals, ref_vecs = torch.linalg.eigh(ref_cov)
    assert torch.allclose(evals, ref_vals.flip(0), atol=1e-9)
    assert bool((evals[:-1] >= evals[1:]).all())
    # eigenvectors agree up to sign (the spectrum is generic, so no repeated eigenvalues)
    overlap = (evecs.T @ ref_vecs.flip(1)).abs()
    assert torch.allclose(torch.diagonal(overlap), torch.ones(6, dtype=torch.float64), atol=1e-6)


def test_running_moments_stable_with_large_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64) + 1e6
    m = RunningMoments(4)
    for chunk in x.split(37):
        m.update(chunk)
    assert torch.allclose(m.covariance(), torch.cov(x.T), rtol=1e-6, atol=1e-6)


def _known_spectrum_cov(evals: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=torch.Generator().manual_seed(3),
                                       dtype=torch.float64))
    return q @ torch.diag(evals) @ q.T


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8, 0.85, 0.95, 0.99, 1.0])
def test_k_for_variance_on_known_spectrum(target):
    spectrum = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.25, 0.25], dtype=torch.float64)
    evals, _ = pca(_known_spectrum_cov(spectrum))
    assert torch.allclose(evals, spectrum, atol=1e-10)
    # reference: walk the known spectrum until the running share reaches the target
    share, expected = 0.0, 0
    while share < target - 1e-12:
        share += float(spectrum[expected] / spectrum.sum())
        expected += 1
    assert components_for_variance(evals, target) == expected
    width, k = choose_width(evals, 6, target, None, multiple_of=4)
    assert k == expected and width == min(6, -(-expected // 4) * 4)
    assert explained_variance(evals, k) >= target - 1e-12
    if k > 1:
        assert explained_variance(evals, k - 1) < target


def test_explained_variance_monotone_in_k_on_model_activations():
    model = tiny_bert()
    ffn_out = registry.get_module(model.bert.encoder.layer[0], "output.dense")
    moments, _ = collect_input_moments(model, text_batches(), {"f": ffn_out})
    evals, _ = pca(moments["f"].covariance())
    shares = [explained_variance(evals, k) for k in range(1, len(evals) + 1)]
    assert all(b >= a for a, b in itertools.pairwise(shares))
    assert shares[-1] == pytest.approx(1.0)
    ks = [components_for_variance(evals, v) for v in (0.5, 0.8, 0.9, 0.99, 0.999)]
    assert ks == sorted(ks)


# ---------------------------------------------------------------- configuration and input errors

@pytest.mark.parametrize("kwargs, match", [
    ({"variance": 0.0}, "variance must be in"),
    ({"variance": 1.5}, "variance must be in"),
    ({"variance": -0.1}, "variance must be in"),
    ({"variance": 0.9, "width": 16}, "exactly one"),
    ({"variance": None}, "exactly one"),
    ({"width": 1.5}, "fraction"),
    ({"width": 0}, ">= 1"),
    ({"mode": "rotate"}, "mode"),
    ({"score": "l2"}, "score"),
    ({"multiple_of": 0}, "multiple_of"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PCNConfig(**kwargs)


def test_width_replaces_default_variance_and_to_dict():
    cfg = PCNConfig(width=0.5, mode="projection")
    assert cfg.variance is None and cfg.to_dict()["width"] == 0.5


def test_width_larger_than_layer_is_rejected():
    with pytest.raises(ValueError, match="larger than the FFN"):
        apply_pcn(tiny_bert(), text_batches(), PCNConfig(width=65))
    with pytest.raises(ValueError, match="larger than the attention input"):
        apply_pcn(tiny_bert(), text_batches(), PCNConfig(width=33, mode="projection"))


def test_unsupported_architectures_give_clear_errors(monkeypatch):
    from transformers import AlbertConfig, AlbertModel

    albert = AlbertModel(AlbertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=VOCAB, embedding_size=16))
    with pytest.raises(registry.UnsupportedArchitectureError, match="no registry entry"):
        apply_pcn(albert, text_batches(), PCNConfig())
    spec = registry.ARCHITECTURES["bert"]
    no_ffn = dataclasses.replace(spec, layers=tuple(r for r in spec.layers if not r.role.startswith("ffn")))
    monkeypatch.setitem(registry.ARCHITECTURES, "bert", no_ffn)
    with pytest.raises(ValueError, match="has no FFN"):
        apply_pcn(tiny_bert(), text_batches(), PCNConfig())
    monkeypatch.undo()
    with pytest.raises(ValueError, match="projection mode supports BERT"):
        apply_pcn(tiny_gpt2(), text_batches(), PCNConfig(mode="projection"))
    with pytest.raises(ValueError, match="at least one calibration batch"):
        apply_pcn(tiny_bert(), [], PCNConfig())


# ---------------------------------------------------------------- structured mode

@pytest.mark.parametrize("arch", sorted(MODELS))
def test_structured_full_width_is_identity(arch):
    make, batches, _ = MODELS[arch]
    model, calib = make(), batches()
    ref = logits(model, calib[0])
    report = apply_pcn(model, calib, PCNConfig(width=1.0))
    assert (logits(model, calib[0]) - ref).abs().max().item() <= 1e-5
    assert all(lr.width_after == lr.width_before for lr in report.layers)
    assert report.params_after == report.params_before


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_structured_reduces_widths_and_reloads_with_stock_classes(arch, tmp_path):
    make, batches, auto = MODELS[arch]
    model, calib = make(), batches()
    report = apply_pcn(model, calib, PCNConfig(variance=0.9, multiple_of=4))
    widths = {lr.width_after for lr in report.layers}
    assert len(widths) == 1  # uniform width
    width = widths.pop()
    assert width % 4 == 0 and width < report.layers[0].width_before
    assert all(lr.explained_variance >= 0.9 for lr in report.layers)
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    cfg = model.config
    assert getattr(cfg, "n_inner" if arch == "gpt2" else "intermediate_size") == width
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(logits(reloaded, calib[0]), logits(model, calib[0]))
    assert sum(p.numel() for p in reloaded.parameters()) == report.params_after


def test_neuron_scores_on_axis_aligned_spectrum():
    from hf_px.pcn.structured import neuron_order

    # diagonal covariance: principal directions are the neurons themselves, permuted by variance
    variances = torch.tensor([0.5, 4.0, 1.0, 2.0], dtype=torch.float64)
    evals, evecs = pca(torch.diag(variances))
    top2 = set(neuron_order(evecs, evals, variances, 2, "leverage")[:2].tolist())
    assert top2 == {1, 3}
    assert neuron_order(evecs, evals, variances, 4, "weighted").tolist() == [1, 3, 2, 0]
    # leverage is 1 for every neuron at full rank: ties go to the larger variance
    assert neuron_order(evecs, evals, variances, 4, "leverage").tolist() == [1, 3, 2, 0]
    out_norms = torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert neuron_order(evecs, evals, variances, 4, "output", out_norms)[0].item() == 0


def _ffn_outputs(model: BertForSequenceClassification, calib: list[dict]) -> torch.Tensor:
    """Layer-0 FFN output on the real (non-padding) calibration tokens."""
    outs = []
    dense = model.bert.encoder.layer[0].output.dense
    handle = dense.register_forward_hook(lambda m, a, o: outs.append(o))
    try:
        for b in calib:
            logits(model, b)
    finally:
        handle.remove()
    return torch.cat([o[b["attention_mask"].bool()] for o, b in zip(outs, calib, strict=True)])


@pytest.mark.parametrize("score", ["leverage", "l1", "weighted", "output"])
def test_mean_compensation_never_increases_calibration_mse(score):
    calib = text_batches(3)
    base = tiny_bert()
    # a shifted intermediate bias gives the neurons non-zero means worth compensating
    with torch.no_grad():
        base.bert.encoder.layer[0].intermediate.dense.bias += 1.0
    ref = _ffn_outputs(base, calib)
    errs = {}
    for comp in (True, False):
        model = copy.deepcopy(base)
        apply_pcn(model, calib, PCNConfig(width=0.25, score=score, mean_compensation=comp))
        errs[comp] = float(((_ffn_outputs(model, calib) - ref) ** 2).mean())
    assert errs[True] < errs[False]  # the shifted means make compensation matter
    assert errs[False] > 0


def test_per_layer_widths_zero_pad_and_reload(tmp_path):
    model, calib = tiny_bert(), text_batches()
    # make layer 1's FFN activations low-rank so the two layers choose different widths
    with torch.no_grad():
        layer1 = model.bert.encoder.layer[1].intermediate.dense
        layer1.weight[8:] = 0
        layer1.bias[8:] = -5.0
    ref = logits(model, calib[0])
    report = apply_pcn(model, calib, PCNConfig(variance=0.95, uniform=False, multiple_of=4))
    widths = [lr.width_after for lr in report.layers]
    assert widths[1] < widths[0]
    meta = model.config.hf_px_pcn
    assert meta["intermediate_sizes"] == widths and meta["padded_to"] == max(widths)
    assert model.config.intermediate_size == max(widths)
    out_w = model.bert.encoder.layer[1].output.dense.weight
    zero_cols = int((out_w == 0).all(0).sum())
    assert zero_cols >= max(widths) - widths[1]
    assert (logits(model, calib[0]) - ref).abs().max() > 0  # something was actually removed
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.hf_px_pcn["intermediate_sizes"] == widths
    assert torch.equal(logits(reloaded, calib[0]), logits(model, calib[0]))


def test_padding_tokens_do_not_change_the_result():
    a, b = tiny_bert(), tiny_bert()
    apply_pcn(a, text_batches(pad_token=0), PCNConfig(width=0.5))
    apply_pcn(b, text_batches(pad_token=7), PCNConfig(width=0.5))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name


def _minilm_param_count(cfg: BertConfig, ffn: int) -> int:
    """BertModel parameters from the config: embeddings, encoder, pooler."""
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    emb = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * d + 2 * d
    attn = 4 * (d * d + d) + 2 * d
    mlp = (d * ffn + ffn) + (ffn * d + d) + 2 * d
    return emb + layers * (attn + mlp) + d * d + d


def test_parameter_counts_match_arithmetic_for_minilm_shape(monkeypatch):
    # the counts do not depend on the PCA, so skip six float64 eigh(1536) calls (seconds each on 2 cores)
    import hf_px.pcn.structured as structured

    def cheap_pca(cov):
        var = torch.diagonal(cov)
        order = torch.argsort(var, descending=True)
        return var[order], torch.eye(len(var), dtype=torch.float64)[:, order]

    monkeypatch.setattr(structured, "pca", cheap_pca)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 30522, (2, 24), generator=g),
              "attention_mask": torch.ones(2, 24, dtype=torch.long)}]
    full = cfg.intermediate_size
    report = apply_pcn(model, calib, PCNConfig(width=0.5))
    half = full // 2
    assert model.config.intermediate_size == half
    assert report.params_before == _minilm_param_count(cfg, full)
    assert report.params_after == _minilm_param_count(cfg, half) == sum(p.numel() for p in model.parameters())
    assert round(report.params_after / 1e6, 2) == 19.17  # docs/pcn.md §5.5
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    # every Linear (the one FLOP count hf-px reports): the blocks and BertModel's pooler
    assert report.flops_after == 2 * (layers * (4 * d * d + 2 * d * half) + d * d)


# ---------------------------------------------------------------- projection mode (BERT)

@pytest.mark.parametrize("ffn", [False, True])
def test_projection_full_rank_is_identity(ffn):
    model, calib = tiny_bert(), text_batches()
    ref = logits(model, calib[0])
    report = apply_pcn(model, calib, PCNConfig(width=1.0, mode="projection", project_ffn_input=ffn))
    assert report.model is model and model.config.model_type == "pcn_bert"
    assert (logits(model, calib[0]) - ref).abs().max().item() <= 1e-5
    assert {lr.kind for lr in report.layers} == ({"qkv_in", "ffn_in"} if ffn else {"qkv_in"})


def test_projection_low_rank_keeps_targets_and_freezes_bases():
    model, calib = tiny_bert(), text_batches()
    report = apply_pcn(model, calib, PCNConfig(width=16, mode="projection", project_ffn_input=True))
    targets = collect_targets(model)
    by_role = {(t.block, t.role): t for t in targets}
    assert len(targets) == 12
    for b in range(2):
        for role in ("q", "k", "v", "ffn_in"):
            assert by_role[(b, role)].param.shape[1] == 16
    assert not any("proj_" in t.param_name for t in targets)
    basis = model.bert.encoder.layer[0].attention.self.proj_a
    model.train()
    out = model(**{k: v for k, v in calib[0].items()})
    out.loss.backward()
    assert basis.weight.grad is None and model.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    d, f = 32, 64
    blocks = 2 * (2 * d * 16 + 3 * 16 * d + d * d + 16 * f + f * d)
    assert report.flops_after == 2 * (blocks + d * d + d * 3)  # plus the pooler and the 3-label head


PROJ_LOAD = """
import sys, torch
from transformers import AutoModel, AutoModelForSequenceClassification
ref = torch.load(sys.argv[1] + "/ref.pt")
m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    out = m(input_ids=ref["ids"], attention_mask=ref["mask"]).logits
base = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
assert "hf_px" not in sys.modules, "remote code must not need hf_px"
print(type(m).__module__.startswith("transformers_modules"), type(base).__name__, bool(torch.equal(out, ref["out"])))
"""


def test_projection_save_reload_registered_and_remote_code(tmp_path):
    model, calib = tiny_bert(), text_batches()
    apply_pcn(model, calib, PCNConfig(variance=0.9, mode="projection", project_ffn_input=True))
    out = logits(model, calib[0])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling.py").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(logits(reloaded, calib[0]), out)
    assert reloaded.config.qkv_proj_ranks == model.config.qkv_proj_ranks
    reloaded.train()
    reloaded(**calib[0]).loss.backward()  # the bases stay frozen after from_pretrained
    assert reloaded.bert.encoder.layer[1].intermediate.proj_f.weight.grad is None
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "PCNBertModel"
    torch.save({"ids": calib[0]["input_ids"], "mask": calib[0]["attention_mask"], "out": out},
               tmp_path / "ref.pt")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PROJ_LOAD, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["True", "PCNBertModel", "True"]


def test_structured_then_projection_combine():
    model, calib = tiny_bert(), text_batches()
    apply_pcn(model, calib, PCNConfig(width=0.5))
    report = apply_pcn(model, calib, PCNConfig(width=16, mode="projection"))
    assert model.config.intermediate_size == 32 and model.config.qkv_proj_ranks == [16, 16]
    assert report.params_after < report.params_before
    text = str(report)
    assert "qkv_in" in text and "params" in text
    d = report.to_dict()
    assert {"layer", "kind", "width_before", "width_after", "explained_variance"} <= set(d["layers"][0])
    with pytest.raises(ValueError, match="already in PCN projection mode"):
        apply_pcn(model, calib, PCNConfig(width=16, mode="projection"))
