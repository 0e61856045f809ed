"""``hf-px run`` with a dense teacher: the teacher stage, distillation from it, ``prune.source`` and the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run import tiny_config

import hf_px
from hf_px.pipeline import ConfigError, RunConfig

pytestmark = pytest.mark.slow  # the tokenizer comes from the packaged MiniLM


def _summary(out: Path, folder: str) -> dict:
    return json.loads((out / folder / "manifest.json").read_text())["summary"]


def _head(model_dir: Path) -> torch.Tensor:
    return load_file(str(model_dir / "model.safetensors"))["classifier.weight"]


def _teacher_with_masks_digest(out: Path) -> str:
    """The digest of the teacher's model with the prune stage's masks applied (what PX pruned from the teacher)."""
    from hf_px.pipeline.steps import load_masks, state_digest
    from hf_px.pruning.masks import apply_masks

    model = hf_px.load(str(out / "00-teacher" / "model")).eval()
    apply_masks(model, load_masks(out / "04-prune" / "masks.safetensors"))
    return state_digest(model)


def test_teacher_is_the_baseline_the_distillation_source_and_what_is_pruned(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, teacher={}, distill={"alpha": 0.5, "temperature": 2.0}, pcn=None,
                      prune={"method": "px", "sparsity": 0.75, "rounds": 3, "source": "teacher"})
    result = hf_px.run(cfg, progress=False)
    assert result.stages["teacher"] == "ran" and result.stages["finetune"] == "ran"
    teacher = _summary(out, "00-teacher")
    assert teacher["steps"] == _summary(out, "05-finetune")["steps"] > 0  # the same recipe
    assert _summary(out, "05-finetune")["distilled_from"] == "00-teacher"
    # the pruned model is the teacher's (its trained head, not a fresh one) with the masks applied: the prune
    # stage stores the masks over the teacher's folder, and the fine-tuned model starts from that head
    assert _summary(out, "04-prune")["model"] == "masks over 00-teacher/model"
    assert not (out / "04-prune" / "model").exists()
    assert _summary(out, "04-prune")["model_sha256"] == _teacher_with_masks_digest(out)
    assert not torch.equal(_head(out / "05-finetune" / "model"), _head(out / "00-teacher" / "model"))  # trained on

    report = json.loads((out / "report.json").read_text())
    dense, final = report["teacher"]["metrics"], report["evaluate"]
    rows = {r["metric"]: r for r in report["baseline"]}
    assert rows["eval_accuracy"]["dense"] == dense["eval_accuracy"] == teacher["metrics"]["eval_accuracy"]
    assert rows["eval_accuracy"]["retained"] == pytest.approx(final["eval_accuracy"] / dense["eval_accuracy"])
    assert rows["eval_loss"]["retained"] is None  # lower is better: a ratio is no share kept
    md = (out / "report.md").read_text()
    assert "dense baseline vs this model" in md and f"{100 * rows['eval_accuracy']['retained']:.1f}%" in md
    card = (out / "09-card" / "model" / "README.md").read_text()
    assert "share of dense kept" in card and f"{100 * rows['eval_accuracy']['retained']:.1f}%" in card

    # a changed distillation mix redoes fine-tuning onward, never the teacher or the pruning
    again = hf_px.run(cfg, progress=False, overrides={"distill.alpha": 0.9})
    assert [again.stages[s] for s in ("teacher", "calibrate", "prune", "finetune")] == \
        ["skipped", "skipped", "skipped", "ran"]

    # a given teacher checkpoint is evaluated, not trained, and gives the same baseline
    given = tiny_config(tmp_path / "given", teacher={"checkpoint": str(out / "00-teacher" / "model")},
                        distill={"alpha": 0.5}, pcn=None, prune={"method": "px", "sparsity": 0.75, "rounds": 3})
    second = hf_px.run(given, progress=False)
    assert second.stages["teacher"] == "ran"
    summary = _summary(tmp_path / "given", "00-teacher")
    assert summary["steps"] == 0
    assert summary["metrics"]["eval_accuracy"] == pytest.approx(dense["eval_accuracy"])


def test_source_pretrained_prunes_the_starting_model_not_the_teacher(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, teacher={}, pcn=None,
                      prune={"method": "px", "sparsity": 0.75, "rounds": 2, "source": "pretrained"},
                      finetune={"max_steps": 2, "batch_size": 16, "progress_bar": False})
    result = hf_px.run(cfg, progress=False)
    assert result.stages["teacher"] == "ran"
    assert _summary(out, "04-prune")["model"] == "masks over the starting model"
    assert _summary(out, "04-prune")["model_sha256"] != _teacher_with_masks_digest(out)
    assert "distilled_from" not in _summary(out, "05-finetune")  # a teacher without distill: baseline only
    assert json.loads((out / "report.json").read_text())["baseline"]

    # the default, source: auto, prunes the teacher once there is one: only the pruning onward is redone
    auto = hf_px.run(cfg, progress=False, overrides={"prune.source": "auto"})
    assert auto.stages["teacher"] == "skipped" and auto.stages["prune"] == "ran"
    assert _summary(out, "04-prune")["model_sha256"] == _teacher_with_masks_digest(out)


def test_source_auto_without_a_teacher_prunes_the_starting_model(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(tmp_path / "run", pcn=None))
    assert cfg.prune.source == "auto" and cfg.teacher is None  # auto does not switch a teacher stage on


def test_teacher_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="finetune section is off"):
        RunConfig.from_dict(tiny_config(tmp_path / "a", distill={}, finetune=None))
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        RunConfig.from_dict(tiny_config(tmp_path / "a", teacher={}, finetune=None))
    assert RunConfig.from_dict(tiny_config(tmp_path / "a", distill={})).teacher is not None  # distill needs one
    with pytest.raises(ConfigError, match="distill.teacher is set by the pipeline"):
        RunConfig.from_dict(tiny_config(tmp_path / "a", distill={"teacher": "x"}))
    with pytest.raises(ConfigError, match="source"):
        RunConfig.from_dict(tiny_config(tmp_path / "a", prune={"source": "finetuned"}))
    missing = tiny_config(tmp_path / "b", teacher={"checkpoint": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="teacher.checkpoint .* does not exist"):
        hf_px.run(missing, progress=False)
    assert not (tmp_path / "b").exists()


def test_a_teacher_checkpoint_for_other_labels_is_refused_before_anything_runs(tmp_path):
    from tiny_models import tiny

    folder = tmp_path / "teacher3"
    tiny("bert").save_pretrained(folder)  # a 3-label head; rotten tomatoes has 2 classes
    cfg = tiny_config(tmp_path / "run", teacher={"checkpoint": str(folder)})
    with pytest.raises(ConfigError, match="3 labels but the data have 2"):
        hf_px.run(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_new_stage_is_one_entry_in_the_stage_table(tmp_path, monkeypatch):
    from hf_px.pipeline import table

    def count_words(ctx, tmp, summary):  # reads the calibration stage's output, writes its own file
        batches = (ctx.stage_path("calibrate") / "batches.safetensors").stat().st_size
        (tmp / "count.json").write_text(json.dumps({"calibration_bytes": batches}))
        summary.update(calibration_bytes=batches)

    extra = table.StageSpec("count", count_words, inputs=lambda d: d["data"]["per_class"])
    stages = list(table.STAGES)
    stages.insert([s.name for s in stages].index("calibrate") + 1, extra)
    monkeypatch.setattr(table, "STAGES", tuple(stages))
    out = tmp_path / "run"
    cfg = tiny_config(out, pcn=None, prune={"method": "magnitude", "sparsity": 0.5, "rounds": 1},
                      finetune={"max_steps": 1, "batch_size": 16, "progress_bar": False})
    first = hf_px.run(cfg, progress=False)
    assert first.stages["count"] == "ran" and (out / "02-count" / "count.json").is_file()
    assert _summary(out, "02-count")["calibration_bytes"] > 0
    assert (out / "03-pcn").exists() is False and (out / "05-prune").is_dir()  # later stages shift by one
    again = hf_px.run(cfg, progress=False)
    assert again.stages["count"] == "skipped"
    assert hf_px.run(cfg, progress=False, overrides={"data.per_class": 4}).stages["count"] == "ran"


def test_teacher_epochs_give_only_the_student_the_longer_recovery(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, teacher={"epochs": 1}, distill={}, pcn=None,
                      prune={"method": "magnitude", "sparsity": 0.5, "rounds": 1})
    hf_px.run(cfg, progress=False)
    teacher, student = _summary(out, "00-teacher")["steps"], _summary(out, "05-finetune")["steps"]
    assert teacher > 0 and student == 2 * teacher  # finetune.epochs is 2 in the tiny config
    report = (out / "report.md").read_text()
    assert f"same recipe but {teacher} steps, against this model's {student}" in report
    with pytest.raises(ConfigError, match="teacher.epochs"):
        RunConfig.from_dict(tiny_config(out, teacher={"epochs": 0}))
