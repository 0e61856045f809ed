"""``hf-px run`` with a gradual section: one-shot to the starting sparsity, the rest while fine-tuning."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from test_run import tiny_config

import hf_px
from hf_px.errors import ConfigError
from hf_px.pipeline import RunConfig

pytestmark = pytest.mark.slow  # the tokenizer comes from the packaged MiniLM


def _cfg(out, gradual, **sections):
    base = dict(pcn=None, prune={"method": "px", "sparsity": 0.8, "rounds": 2},
                finetune={"max_steps": 6, "batch_size": 16, "progress_bar": False, "save_every": 2})
    return tiny_config(out, gradual=gradual, **{**base, **sections})


def _sparsity(masks: dict) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    return 1 - kept / sum(m.numel() for m in masks.values())


def test_the_shipped_model_has_the_final_sparsity_and_the_report_says_how(tmp_path):
    out = tmp_path / "run"
    result = hf_px.run(_cfg(out, {"initial_sparsity": 0.4, "every": 2, "end": 0.5}), progress=False)
    assert result.stages["prune"] == "ran" and result.stages["finetune"] == "ran"
    assert _sparsity(load_file(str(out / "04-prune" / "masks.safetensors"))) == pytest.approx(0.4, abs=2e-3)
    final = load_file(str(out / "05-finetune" / "masks.safetensors"))
    assert _sparsity(final) == pytest.approx(0.8, abs=2e-3)
    ft = json.loads((out / "05-finetune" / "manifest.json").read_text())["summary"]
    assert [e["step"] for e in ft["gradual"]] == [0, 2, 3]

    shipped = hf_px.load(str(out / "09-card" / "model"))
    report = hf_px.sparsity_report(shipped, generic=False)
    assert report["achieved_sparsity"] == pytest.approx(0.8, abs=2e-3)
    run_report = json.loads((out / "report.json").read_text())
    assert run_report["prune"]["achieved_sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert run_report["prune"]["initial_sparsity"] == pytest.approx(0.4, abs=2e-3)
    densities = {lay["name"]: lay["density"] for lay in run_report["prune"]["layers"]}
    assert sum(densities.values()) / len(densities) < 0.5  # the table shows the final masks, not 04-prune's
    assert "Gradual: one-shot to" in (out / "report.md").read_text()

    # a changed schedule redoes fine-tuning, not the one-shot pruning
    again = hf_px.run(_cfg(out, {"initial_sparsity": 0.4, "every": 3, "end": 0.5}), progress=False)
    assert again.stages["prune"] == "skipped" and again.stages["finetune"] == "ran"


@pytest.mark.parametrize("gradual, sections, match", [
    ({"initial_sparsity": 0.9}, {}, "initial_sparsity"),
    ({}, {"prune": None}, "prune and the finetune"),
    ({}, {"finetune": None}, "prune and the finetune"),
    ({"prune": {"sparsity": 0.5}}, {}, "set by the pipeline"),
])
def test_gradual_config_errors(tmp_path, gradual, sections, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(_cfg(tmp_path / "x", gradual, **sections))
