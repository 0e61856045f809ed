"""The shipped offline metric scripts and ``load_metric``'s name mapping."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from hf_px.finetuning.metrics import SHIPPED_METRICS, load_metric, metric_script


def _f1_reference(pred, ref, cls):
    tp = sum(p == cls and r == cls for p, r in zip(pred, ref, strict=True))
    fp = sum(p == cls and r != cls for p, r in zip(pred, ref, strict=True))
    fn = sum(p != cls and r == cls for p, r in zip(pred, ref, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_shipped_scripts_exist_inside_the_package():
    for name in SHIPPED_METRICS:
        path = metric_script(name)
        assert os.path.isfile(path) and path.endswith(f"{name}/{name}.py")
    with pytest.raises(ValueError, match="ships no metric"):
        metric_script("bleu")


def test_accuracy_matches_numpy_and_accumulates_batches():
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    metric = load_metric("accuracy", keep_in_memory=True)
    assert metric.compute(predictions=pred, references=ref)["accuracy"] == pytest.approx(float((pred == ref).mean()))
    metric.add_batch(predictions=pred[:20], references=ref[:20])
    metric.add_batch(predictions=pred[20:], references=ref[20:])
    assert metric.compute()["accuracy"] == pytest.approx(float((pred == ref).mean()))
    counted = load_metric("accuracy", keep_in_memory=True).compute(predictions=pred, references=ref, normalize=False)
    assert counted["accuracy"] == int((pred == ref).sum())


def test_f1_binary_macro_micro_weighted():
    rng = np.random.default_rng(1)
    metric = load_metric("f1", keep_in_memory=True)
    pred, ref = rng.integers(0, 2, 40).tolist(), rng.integers(0, 2, 40).tolist()
    assert metric.compute(predictions=pred, references=ref)["f1"] == pytest.approx(_f1_reference(pred, ref, 1))
    assert metric.compute(predictions=pred, references=ref, pos_label=0)["f1"] == \
        pytest.approx(_f1_reference(pred, ref, 0))

    pred, ref = rng.integers(0, 4, 60).tolist(), rng.integers(0, 4, 60).tolist()
    per_class = [_f1_reference(pred, ref, c) for c in range(4)]
    support = [ref.count(c) for c in range(4)]
    assert metric.compute(predictions=pred, references=ref, average="macro")["f1"] == pytest.approx(np.mean(per_class))
    assert metric.compute(predictions=pred, references=ref, average="weighted")["f1"] == \
        pytest.approx(np.dot(per_class, support) / sum(support))
    # micro-F1 over single-label classes equals accuracy
    assert metric.compute(predictions=pred, references=ref, average="micro")["f1"] == \
        pytest.approx(np.mean(np.array(pred) == np.array(ref)))
    with pytest.raises(ValueError, match="binary"):
        metric.compute(predictions=pred, references=ref)


def test_perplexity_is_exp_of_token_mean_nll_over_any_batching():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 4:] = -100  # padding: not counted
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    nll, count = (tok * valid).sum(1).tolist(), valid.sum(1).tolist()
    expected = math.exp(float(tok[valid].mean()))
    metric = load_metric("perplexity", keep_in_memory=True)
    assert metric.compute(nll_sum=nll, num_tokens=count)["perplexity"] == pytest.approx(expected, rel=1e-6)
    metric.add_batch(nll_sum=nll[:1], num_tokens=count[:1])
    metric.add_batch(nll_sum=nll[1:], num_tokens=count[1:])
    assert metric.compute()["perplexity"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        load_metric("perplexity", keep_in_memory=True).compute(nll_sum=[0.0], num_tokens=[0])


def test_other_names_fall_back_to_evaluate_load(monkeypatch):
    import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "load", lambda name, **kw: calls.append((name, kw)) or "module")
    assert load_metric("glue", keep_in_memory=True) == "module"
    assert calls == [("glue", {"keep_in_memory": True})]
    load_metric("accuracy")
    assert calls[-1][0] == metric_script("accuracy")  # shipped names never reach the Hub


def test_unknown_metric_offline_names_the_fix(monkeypatch):
    import evaluate

    def offline(name, **kw):
        raise FileNotFoundError(f"Couldn't find a module script for {name}")

    monkeypatch.setattr(evaluate, "load", offline)
    with pytest.raises(FileNotFoundError, match="shipped metric"):
        load_metric("rouge")
