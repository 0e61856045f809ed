"""``hf-px run`` / ``hf_px.run``: the whole pipeline on a tiny random BERT, stage folders, resume, push."""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import hf_px
from hf_px.pipeline import ConfigError, RunConfig, RunError
from hf_px.pipeline import run as run_pipeline

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the tokenizer comes from the packaged MiniLM

TINY = {
    "model": {"from_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
                              "hidden_dropout_prob": 0.0},
              "tokenizer": "builtin:minilm", "task": "sequence-classification"},
    "data": {"dataset": "builtin:rotten_tomatoes", "max_train_samples": 64, "max_eval_samples": 32,
             "per_class": 8, "max_length": 24},
    "pcn": {"width": 32},
    "prune": {"method": "px", "sparsity": 0.75, "rounds": 3},
    "finetune": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "eval_every": 4, "save_every": 2,
                 "log_every": 1, "progress_bar": False},
}


def tiny_config(out: Path, **sections) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["output"] = {"output_dir": str(out)}
    for key, value in sections.items():
        cfg[key] = value
    return cfg


def manifests(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/manifest.json"))}


def prunable_zeros(model) -> tuple[int, int]:
    from hf_px.pruning.targets import collect_targets

    targets = collect_targets(model)
    return sum(int((t.param == 0).sum()) for t in targets), sum(t.param.numel() for t in targets)


def test_full_pipeline_through_the_test_hub(tmp_path, fake_hub):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    cfg = tiny_config(out, push={"enabled": True, "hub_model_id": "tester/tiny-run"})
    result = hf_px.run(cfg, progress=False)
    assert result.stages == {"teacher": "off", "shrink": "off",
                             **{s: "ran" for s in ("calibrate", "pcn", "prune", "finetune", "evaluate", "save",
                                                   "report", "card", "push")}}
    names = sorted(p.name for p in out.iterdir())
    assert names == ["01-calibrate", "02-pcn", "04-prune", "05-finetune", "06-evaluate", "07-save", "08-report",
                     "09-card", "10-push", "report.json", "report.md", "run.json"]
    # every stage folder is covered by its manifest, hashes included
    for folder, man in manifests(out).items():
        files = {p.relative_to(out / folder).as_posix() for p in (out / folder).rglob("*") if p.is_file()}
        assert files - {"manifest.json"} == set(man["files"]), folder

    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["achieved_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert [lay["width_after"] for lay in report["pcn"]["layers"]] == [32, 32]
    assert report["size"]["after"]["flops_per_token"] < 0.3 * report["size"]["before"]["flops_per_token"]
    assert set(report["evaluate"]) == {"eval_loss", "eval_accuracy"}
    assert any(r.get("event") == "eval" for r in report["finetune"]["history"])
    for plot in ("density", "pcn_variance", "curves", "sizes"):
        assert (out / report["plots"][plot]).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Pruning" in md and "08-report/plots/density.png" in md

    final = result.model_dir
    card = (final / "README.md").read_text()
    assert "![per-layer density after pruning](plots/density.png)" in card and (final / "plots/density.png").exists()
    # stock transformers reloads the shipped folder; the PX masks survived fine-tuning
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.intermediate_size == 32
    zeros, total = prunable_zeros(model)
    assert zeros == round(0.75 * total) or abs(zeros - 0.75 * total) <= 1
    # evaluation numbers are those of the saved model
    from transformers import AutoTokenizer

    from hf_px.pipeline.checks import check_run

    plan = check_run(RunConfig.from_dict(cfg))
    again = hf_px.evaluate(model, plan.eval, AutoTokenizer.from_pretrained(final), max_length=24)
    assert again["eval_accuracy"] == pytest.approx(report["evaluate"]["eval_accuracy"])
    # the push went through the Hub protocol and the card downloads with the plots it links
    push = json.loads((out / "10-push" / "push.json").read_text())
    assert push["repo_id"] == "tester/tiny-run"
    assert ("model", "tester/tiny-run") in fake_hub.repos
    assert ModelCard.load("tester/tiny-run").data.pipeline_tag == "text-classification"
    pulled = AutoModelForSequenceClassification.from_pretrained("tester/tiny-run", cache_dir=tmp_path / "cache")
    batch = {"input_ids": torch.tensor([[101, 2307, 3185, 102]])}
    with torch.no_grad():
        assert torch.equal(pulled(**batch).logits, model(**batch).logits)


def test_rerun_skips_complete_stages_and_redoes_what_changed(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, pcn=None, finetune={"max_steps": 2, "batch_size": 16, "progress_bar": False})
    first = run_pipeline(cfg, progress=False)
    assert first.stages["pcn"] == "off" and first.stages["prune"] == "ran"
    before = manifests(out)
    second = run_pipeline(cfg, progress=False)
    assert set(second.stages.values()) == {"skipped", "off"}
    assert manifests(out) == before  # nothing rewritten
    # a new sparsity redoes pruning and everything after it, not the calibration
    third = run_pipeline(cfg, progress=False, overrides={"prune.sparsity": 0.5})
    assert third.stages["calibrate"] == "skipped"
    assert all(third.stages[s] == "ran" for s in ("prune", "finetune", "evaluate", "save", "report", "card"))
    assert third.report["prune"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # a damaged file makes its stage (and the ones after) run again; --force redoes all
    masks = out / "04-prune" / "masks.safetensors"  # the prune stage keeps masks over the model it started from
    data = bytearray(masks.read_bytes())
    data[-1] ^= 0xFF
    masks.write_bytes(bytes(data))
    fourth = run_pipeline(cfg, progress=False, overrides={"prune.sparsity": 0.5})
    assert fourth.stages["calibrate"] == "skipped" and fourth.stages["prune"] == "ran"
    forced = run_pipeline(cfg, progress=False, overrides={"prune.sparsity": 0.5}, force=True)
    assert set(forced.stages.values()) == {"ran", "off"}


def test_pipeline_from_a_local_checkpoint_folder(tmp_path):
    from tiny_models import save_tiny_checkpoint

    src = save_tiny_checkpoint(tmp_path / "ckpt")
    cfg = tiny_config(tmp_path / "run", model={"name_or_path": str(src)}, pcn=None,
                      finetune=None, output={"output_dir": str(tmp_path / "run"), "format": "sparse"})
    result = run_pipeline(cfg, progress=False)
    assert result.stages["finetune"] == "off" and result.stages["prune"] == "ran"
    size = result.report["size"]
    assert size["before"]["file_bytes"] == (src / "model.safetensors").stat().st_size
    assert size["after"]["file_bytes"] < size["before"]["file_bytes"]  # the sparse format packs the kept weights
    assert size["after"]["nonzero_params"] < size["before"]["nonzero_params"]
    reloaded = hf_px.load(str(result.model_dir))
    zeros, total = prunable_zeros(reloaded)
    assert abs(zeros - 0.75 * total) <= 1


def test_causal_lm_on_a_text_file(tmp_path):
    words = "the a cat dog sat on mat ran fast slow big small red blue".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=g)) for _ in range(120)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    cfg = {"model": {"from_config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                     "n_positions": 64}, "tokenizer": "builtin:minilm", "task": "causal-lm"},
           "data": {"dataset": str(tmp_path / "corpus.txt"), "label_column": None, "per_class": None,
                    "num_batches": 2, "calibration_batch_size": 8, "max_length": 16, "eval_holdout": 0.2},
           "prune": {"sparsity": 0.5, "rounds": 2},
           "finetune": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "progress_bar": False},
           "output": {"output_dir": str(tmp_path / "run")}}
    result = run_pipeline(cfg, progress=False)
    assert set(result.metrics) == {"eval_loss", "eval_perplexity"}
    assert result.report["stages"]["evaluate"]["summary"]["examples"] == 24  # 20% of 120 held out
    assert "text-generation" in (result.model_dir / "README.md").read_text()


def test_vit_on_an_image_folder(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, mean in (("cat", 60), ("dog", 190)):
            (tmp_path / "images" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(mean, 40, (32, 32, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(tmp_path / "images" / split / c / f"{i}.png")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "proc")
    cfg = {"model": {"from_config": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32,
                                     "patch_size": 8}, "tokenizer": str(tmp_path / "proc"),
                     "task": "image-classification"},
           "data": {"dataset": str(tmp_path / "images"), "per_class": 4, "calibration_batch_size": 8},
           "pcn": {"width": 32}, "prune": {"sparsity": 0.8, "rounds": 2},
           "finetune": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "progress_bar": False},
           "output": {"output_dir": str(tmp_path / "run")}}
    result = run_pipeline(cfg, progress=False)
    assert result.report["calibration"]["num_examples"] == 8
    # the reported accuracy is the saved model's: recomputed here from its own predictions on the 8 test images
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(result.model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(result.model_dir)
    images = sorted((tmp_path / "images" / "test").glob("*/*.png"))
    pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(-1).tolist()
    accuracy = sum(model.config.id2label[i] == p.parent.name for i, p in zip(predicted, images, strict=True)) / len(images)
    stage = json.loads(next((tmp_path / "run").glob("*-evaluate/metrics.json")).read_text())
    assert result.report["evaluate"]["eval_accuracy"] == pytest.approx(accuracy)
    assert stage["eval_accuracy"] == pytest.approx(accuracy)
    assert result.report["prune"]["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert (result.model_dir / "preprocessor_config.json").exists()
    assert "image-classification" in (result.model_dir / "README.md").read_text()


def _final_state(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(result.model_dir / "model.safetensors"))


def test_interrupted_fine_tuning_resumes_to_the_same_result(tmp_path, monkeypatch):
    import hf_px.finetuning.outputs as U

    reference = run_pipeline(tiny_config(tmp_path / "ref"), progress=False)
    out = tmp_path / "run"
    real_save = U.save_checkpoint

    def save_then_interrupt(accelerator, root, step, *args, **kwargs):
        real_save(accelerator, root, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(U, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_config(out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["01-calibrate", "02-pcn", "04-prune", "05-finetune.work",
                                                     "run.json"]
    monkeypatch.setattr(U, "save_checkpoint", real_save)
    resumed = run_pipeline(tiny_config(out), progress=False)
    assert resumed.stages["prune"] == "skipped" and resumed.stages["finetune"] == "ran"
    assert json.loads((out / "05-finetune" / "manifest.json").read_text())["summary"]["resumed_from"] == "step_4"
    assert not (out / "05-finetune.work").exists()
    ref, got = _final_state(reference), _final_state(resumed)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert resumed.metrics == pytest.approx(reference.metrics, rel=1e-5)


def test_sigint_stops_cleanly_and_the_next_run_resumes(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, finetune={"epochs": 40, "batch_size": 16, "save_every": 2, "progress_bar": False})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "hf_px", "run", str(path), "--no-progress"]
    # a child inherits an ignored SIGINT (Python then keeps ignoring it): whatever earlier tests left in this
    # process, the run under test gets the default disposition, as from a shell
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpts = out / "05-finetune.work" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(ckpts.glob("step_*")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted during stage 'finetune'" in err and "run the same command again" in err.lower()
    assert not list(out.glob(".*tmp*")) and not (out / "05-finetune").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "05-finetune" / "manifest.json").read_text())["summary"]
    assert summary["resumed_from"] is not None and summary["steps"] == 40 * 4


def test_disk_full_while_saving_leaves_no_half_written_stage(tmp_path, monkeypatch):
    import hf_px.pipeline.steps as steps

    out = tmp_path / "run"
    cfg = tiny_config(out, pcn=None, finetune=None)

    def full_disk(model, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)  # the part that fit
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(steps, "save_model", full_disk)
    with pytest.raises(RunError, match="disk full while writing stage 'prune'.*free some space"):
        run_pipeline(cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["01-calibrate", "run.json"]
    monkeypatch.undo()
    result = run_pipeline(cfg, progress=False)
    assert result.stages["calibrate"] == "skipped" and result.stages["save"] == "ran"


def test_cli_flags_override_the_file_and_check_writes_nothing(tmp_path, capsys):
    from hf_px.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "never")))
    assert main(["run", str(path), "--check", "--prune.sparsity", "0.9", "--set", "data.max_train_samples=50"]) == 0
    assert "50 training examples" in capsys.readouterr().out
    assert not (tmp_path / "never").exists()
    assert main(["run", str(path), "--check", "--prune.sparsity", "1.5"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


def test_example_configs_are_valid():
    configs = sorted((ROOT / "scripts" / "configs").glob("*.yaml"))
    runs = [p for p in configs if not p.name.startswith("accelerate_")]
    assert len(runs) >= 5
    for path in runs:
        cfg = RunConfig.from_file(path)
        assert cfg.output.output_dir and cfg.model is not None, path


def test_unknown_keys_name_the_closest_valid_one():
    with pytest.raises(ConfigError, match="unknown key prune.sparsty. Did you mean 'sparsity'"):
        RunConfig.from_dict({"model": {"name_or_path": "x"}, "prune": {"sparsty": 0.8}})
    with pytest.raises(ConfigError, match="unknown section 'finetuning'. Did you mean 'finetune'"):
        RunConfig.from_dict({"model": {"name_or_path": "x"}, "finetuning": {}})
    with pytest.raises(ConfigError, match="finetune.metrics is set by the pipeline from evaluate.metrics"):
        RunConfig.from_dict({"model": {"name_or_path": "x"}, "finetune": {"metrics": ["f1"]}})
    with pytest.raises(ConfigError, match="finetune.max_length is set by the pipeline from data.max_length"):
        RunConfig.from_dict({"model": {"name_or_path": "x"}, "finetune": {"max_length": 64}})


def test_misspelt_flags_name_the_closest_valid_one(tmp_path, capsys):
    from hf_px.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "never")))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(path), "--check", "--prune.sparsty", "0.8", "--finetune.learnin_rate=1e-4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --prune.sparsty 0.8 --finetune.learnin_rate=1e-4" in err
    assert "--prune.sparsity instead of --prune.sparsty" in err
    assert "--finetune.learning_rate instead of --finetune.learnin_rate" in err
    assert not (tmp_path / "never").exists()


def test_run_is_the_pipeline_function_and_python_m_hf_px_is_the_command_line():
    import importlib.util

    assert hf_px.run is run_pipeline and importlib.util.find_spec("hf_px.run") is None  # no module to shadow it
    with pytest.raises(ConfigError, match="config file .* not found"):
        hf_px.run("does-not-exist.yaml")
    proc = subprocess.run([sys.executable, "-m", "hf_px", "run", "does-not-exist.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "hf-px run: error: config file 'does-not-exist.yaml' not found" in proc.stderr


def test_accelerate_launch_runs_the_pipeline_on_two_processes(tmp_path):
    out = tmp_path / "run"
    # gradual pruning too: both ranks must prune alike while training (fixed masks on 2 ranks: tests/test_train.py)
    cfg = tiny_config(out, finetune={"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "progress_bar": False},
                      gradual={"initial_sparsity": 0.5, "every": 2, "end": 0.5})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "hf_px", "run", str(path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "terminate called" in proc.stderr + proc.stdout:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # gloo teardown
    assert proc.returncode == 0, proc.stderr[-3000:]
    ft = json.loads((out / "05-finetune" / "manifest.json").read_text())["summary"]
    assert ft["world_size"] == 2
    assert ft["steps"] == 2 * 4  # 64 examples, 8 per rank and 2 ranks
    assert ft["sparsity"]["density_before"] == pytest.approx(0.5, abs=2e-3)  # one-shot to the start, then gradual
    assert ft["sparsity"]["density_after"] == pytest.approx(0.25, abs=2e-3) and ft["sparsity"]["pruned_all_zero"]
    assert [e["step"] for e in ft["gradual"]] == [0, 2, 4]
    assert (out / "report.md").exists() and (out / "09-card" / "model" / "README.md").exists()
    assert proc.stdout.count("[hf-px run] 04-prune: running") == 1  # the main process prunes, once
