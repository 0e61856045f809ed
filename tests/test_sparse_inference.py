"""Opt-in CSR inference for very sparse Linear layers."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_px.export.sparse_inference import CSRLinear, densify, sparsify_for_cpu
from hf_px.pruning.masks import apply_masks
from hf_px.pruning.targets import prunable_parameters


def pruned(sparsity: float) -> BertForSequenceClassification:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32)).eval()
    masks = {n: torch.rand(p.shape) >= sparsity for n, p in prunable_parameters(model).items()}
    apply_masks(model, masks)
    return model


def test_csr_model_matches_dense_and_densify_restores_it():
    model = pruned(0.9)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sparsify_for_cpu(model, min_sparsity=0.8, timing=False)
    converted = [m for m in model.modules() if isinstance(m, CSRLinear)]
    assert len(converted) == len(report) == 12 and all(r["converted"] for r in report.values())
    assert all(r["sparsity"] >= 0.8 for r in report.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-6)
    densify(model)
    assert not any(isinstance(m, CSRLinear) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layers_below_the_threshold_stay_dense():
    model = pruned(0.5)
    assert sparsify_for_cpu(model, min_sparsity=0.8, timing=False) == {}
    assert not any(isinstance(m, CSRLinear) for m in model.modules())


def test_timing_mode_reports_both_kernels():
    model = pruned(0.95)
    report = sparsify_for_cpu(model, min_sparsity=0.9, tokens=64, repeats=2)
    assert report and all(r["dense_ms"] > 0 and r["csr_ms"] > 0 for r in report.values())
    n_csr = sum(isinstance(m, CSRLinear) for m in model.modules())
    assert n_csr == sum(r["converted"] for r in report.values())


def test_pruning_a_model_with_csr_layers_names_the_fix():
    import pytest

    import hf_px

    model = pruned(0.9)
    sparsify_for_cpu(model, min_sparsity=0.8, timing=False)
    batches = [{"input_ids": torch.randint(0, 100, (2, 8)), "labels": torch.tensor([0, 1])}]
    with pytest.raises(ValueError, match=r"CSRLinear.*hf_px.densify"):
        hf_px.prune(model, batches, hf_px.PruneConfig(method="magnitude", sparsity=0.5, rounds=1))
    densify(model)
    assert hf_px.prune(model, batches, hf_px.PruneConfig(method="magnitude", sparsity=0.95, rounds=1)).model is model
