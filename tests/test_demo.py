"""``hf-px demo`` end to end on the packaged MiniLM, with tiny data: the summary and the saved pruned model."""

from __future__ import annotations

import json

import pytest

from hf_px.cli import build_parser
from hf_px.commands import demo


@pytest.mark.slow
def test_demo_summary_and_reloadable_pruned_model(tmp_path, capsys):
    out = tmp_path / "demo-out"
    args = build_parser().parse_args([
        "demo", "--output-dir", str(out), "--train-examples", "32", "--eval-examples", "32", "--per-class", "4",
        "--rounds", "1", "--batch-size", "16", "--max-length", "16", "--latency-runs", "1", "--sparsity", "0.6",
        "--no-progress"])
    assert args.distill and args.source == "pretrained" and args.schedule == "gradual"
    demo.run(args)
    summary = json.loads((out / demo.SUMMARY_FILE).read_text())
    dense, pruned = summary["dense"], summary["pruned"]
    assert 0 < dense["accuracy"] <= 1 and 0 <= pruned["accuracy"] <= 1
    assert summary["kept_pct"] == pytest.approx(100 * pruned["accuracy"] / dense["accuracy"])
    assert 0 < summary["majority_class_accuracy"] < 1
    assert pruned["nonzero_params"] < dense["nonzero_params"]
    assert pruned["sparse_format_bytes"] < pruned["dense_format_bytes"]
    assert summary["settings"]["distill"] is True
    # gradual pruning: the saved report (and the card built from it) describe the final masks, not the start
    report = json.loads((out / "hf_px.json").read_text())["metadata"]["report"]
    assert report["gradual"]["every"] == 5 and report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert sum(lay["density"] for lay in report["layers"]) / len(report["layers"]) < 0.6

    from transformers import AutoModelForSequenceClassification

    from hf_px.pruning.report import sparsity_report

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert sparsity_report(model)["achieved_sparsity"] == pytest.approx(pruned["sparsity"])
    assert pruned["sparsity"] == pytest.approx(0.6, abs=0.01)
    printed = capsys.readouterr().out
    assert "% of dense accuracy kept" in printed and f"{summary['kept_pct']:.1f}%" in printed


@pytest.mark.slow
def test_demo_one_shot_schedule_prunes_before_fine_tuning(tmp_path):
    out = tmp_path / "demo-out"
    args = build_parser().parse_args([
        "demo", "--output-dir", str(out), "--train-examples", "32", "--eval-examples", "16", "--per-class", "4",
        "--rounds", "1", "--batch-size", "16", "--max-length", "16", "--latency-runs", "1", "--sparsity", "0.5",
        "--schedule", "oneshot", "--no-distill", "--no-progress"])
    demo.run(args)
    summary = json.loads((out / demo.SUMMARY_FILE).read_text())
    assert summary["settings"]["schedule"] == "oneshot"
    assert summary["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    report = json.loads((out / "hf_px.json").read_text())["metadata"]["report"]
    assert "gradual" not in report and report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
