"""Hostile and broken inputs: nothing of the user's is deleted, resources stay bounded, errors are one line.

Every refusal is checked for its message (one line) and for leaving every file outside the output folder as it
was (a snapshot of names and hashes of the test's whole folder before and after).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import save_tiny_checkpoint, tiny, tiny_batches

import hf_px
from hf_px.cli import main
from hf_px.folders import folder_lock
from hf_px.pipeline import ConfigError, RunConfig
from hf_px.pipeline import run as run_pipeline

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 3 * 2**30  # address space for the subprocess tests: the unbounded code needed 12 GB and more


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and folder under ``root`` (``skip`` excluded) with the sha256 of files."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def one_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "bert")


@pytest.fixture
def work(tmp_path, ckpt) -> tuple[Path, Path]:
    """(model folder copy, csv file), both inside this test's folder so the snapshot covers them."""
    model = tmp_path / "inputs" / "model"
    shutil.copytree(ckpt, model)
    data = tmp_path / "inputs" / "data.csv"
    data.write_text("text,label\n" + "".join(f"a {'fine' if i % 2 else 'dull'} film {i},{i % 2}\n" for i in range(24)))
    return model, data


@pytest.fixture
def no_model_loading(monkeypatch):
    """A refusal must come before any model is loaded: loading one fails the test."""
    import hf_px.modeling as modeling

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folder was checked")

    monkeypatch.setattr(modeling, "load_model", boom)


def prune_args(model: Path, data: Path, out: Path | str, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--dataset", str(data), "--per-class", "2", "--rounds", "1",
            "--sparsity", "0.5", "--no-progress", "--output-dir", str(out), *extra]


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--dataset", str(data), "--eval-split", "train", "--max-steps", "1",
            "--batch-size", "4", "--no-progress", "--output-dir", str(out), *extra]


def refused_cli(argv: list[str], match: str, capsys, tmp_path: Path) -> str:
    before = snapshot(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = one_line(err)
    assert match in line, line
    assert snapshot(tmp_path) == before, "a refused command changed files"
    return line


# ------------------------------------------------------------------------------------- prune --overwrite
def test_prune_overwrite_into_the_input_model_folder_is_refused(work, tmp_path, capsys, no_model_loading):
    model, data = work
    refused_cli(prune_args(model, data, model, "--overwrite"), "is or contains the input", capsys, tmp_path)


def test_prune_overwrite_into_a_parent_of_the_input_is_refused(work, tmp_path, capsys, no_model_loading):
    model, data = work
    refused_cli(prune_args(model, data, model.parent, "--overwrite"), "is or contains the input", capsys, tmp_path)


def test_prune_overwrite_of_the_filesystem_root_is_refused(work, tmp_path, capsys, no_model_loading):
    model, data = work
    refused_cli(prune_args(model, data, "/", "--overwrite"), "is the file-system root", capsys, tmp_path)


def test_prune_overwrite_of_home_or_the_current_folder_is_refused(work, tmp_path, capsys, monkeypatch,
                                                                  no_model_loading):
    model, data = work
    home, here = tmp_path / "home", tmp_path / "projects" / "here"
    here.mkdir(parents=True)
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    refused_cli(prune_args(model, data, home, "--overwrite"), "your home folder", capsys, tmp_path)
    refused_cli(prune_args(model, data, here.parent, "--overwrite"), "the current folder", capsys, tmp_path)
    refused_cli(prune_args(model, data, ".", "--overwrite"), "the current folder", capsys, tmp_path)


def test_prune_overwrite_refuses_a_folder_hf_px_did_not_write(work, tmp_path, capsys, no_model_loading):
    model, data = work
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    refused_cli(prune_args(model, data, out, "--overwrite"), "holds no hf-px checkpoint (hf_px.json)", capsys,
                tmp_path)


def test_prune_overwrite_replaces_an_earlier_hf_px_output(work, tmp_path, capsys):
    model, data = work
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "hf_px.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old")
    refused_cli(prune_args(model, data, out), "pass --overwrite to replace it", capsys, tmp_path)
    before = snapshot(tmp_path, skip=out)
    assert main(prune_args(model, data, out, "--overwrite")) == 0
    assert snapshot(tmp_path, skip=out) == before
    assert json.loads((out / "hf_px.json").read_text())["metadata"]["report"]["achieved_sparsity"] > 0.4
    assert (out / "model.safetensors").stat().st_size > 100


# --------------------------------------------------------------------------------------------- finetune
def test_finetune_refuses_a_folder_with_the_users_files(work, tmp_path, capsys, no_model_loading):
    model, data = work
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"my own model")
    for extra in ((), ("--resume",)):
        refused_cli(finetune_args(model, data, out, *extra), "holds no hf-px fine-tune run", capsys, tmp_path)


def test_finetune_refuses_the_input_folder(work, tmp_path, capsys, no_model_loading):
    model, data = work
    refused_cli(finetune_args(model, data, model.parent), "is or contains the input", capsys, tmp_path)


def test_finetune_reuses_its_own_run_only_with_resume(work, tmp_path, capsys, monkeypatch, no_model_loading):
    import hf_px.modeling as modeling
    from hf_px import HfPxError

    model, data = work
    out = tmp_path / "ft"
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    refused_cli(finetune_args(model, data, out), "pass --resume to continue it", capsys, tmp_path)

    def reached(*args, **kwargs):
        raise HfPxError("reached model loading")

    monkeypatch.setattr(modeling, "load_model", reached)
    assert main(finetune_args(model, data, out, "--resume")) == 2
    assert "reached model loading" in capsys.readouterr().err  # the folder check let it through


# -------------------------------------------------------------------------------------------- hf-px run
def run_config(model: Path, data: Path, out: Path, **sections) -> dict:
    cfg = {"model": {"name_or_path": str(model)}, "data": {"dataset": str(data), "per_class": 2},
           "prune": {"sparsity": 0.5, "rounds": 1}, "finetune": {"max_steps": 1, "batch_size": 4},
           "report": {"plots": False}, "output": {"output_dir": str(out)}}
    cfg.update(sections)
    return cfg


def test_run_refuses_an_output_folder_that_holds_the_input(work, tmp_path):
    model, data = work
    (model.parent / "run.json").write_text("{}")  # looks like an earlier run, but the model lives inside it
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="is or contains the input") as info:
        run_pipeline(run_config(model, data, model.parent), progress=False)
    one_line(str(info.value))
    assert snapshot(tmp_path) == before


def test_a_second_run_on_a_locked_folder_is_refused(work, tmp_path, capsys):
    model, data = work
    out = tmp_path / "run"
    (out / ".04-prune.tmp-0123abcd").mkdir(parents=True)  # the first run's stage in progress
    (out / ".04-prune.tmp-0123abcd" / "partial.bin").write_bytes(b"x")
    (out / "05-finetune.work" / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(model, data, out)))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from hf_px.folders import folder_lock\n"
         "with folder_lock(Path(sys.argv[1])):\n    print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = refused_cli(["run", str(cfg_path), "--no-progress"], f"{out} is in use by another hf-px run", capsys,
                           tmp_path)
        assert f"(PID {holder.pid})" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # a killed holder's lock dies with it: its leftover file blocks nobody
    assert (out / ".lock").exists()
    with folder_lock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_switching_a_stage_off_keeps_the_earlier_runs_folders(tmp_path):
    cfg = yaml.safe_load((ROOT / "scripts" / "configs" / "tiny-smoke.yaml").read_text())
    cfg["data"].update(max_train_samples=48, max_eval_samples=16, per_class=4)
    cfg["prune"]["rounds"] = 2
    cfg["finetune"].update(epochs=1, max_steps=2, eval_every=None, save_every=None, progress_bar=False)
    cfg["report"] = {"plots": False}
    out = tmp_path / "run"
    cfg["output"]["output_dir"] = str(out)
    first = run_pipeline(cfg, progress=False)
    assert first.stages["prune"] == "ran"
    pruned = snapshot(out / "04-prune")
    second_cfg = copy.deepcopy(cfg)
    second_cfg["prune"] = None
    second = run_pipeline(second_cfg, progress=False)
    assert second.stages["prune"] == "off" and second.stages["finetune"] == "ran"
    assert second.stages["calibrate"] == "skipped" and second.stages["pcn"] == "skipped"
    assert snapshot(out / "04-prune") == pruned  # the earlier pruned model is still there, untouched
    assert json.loads((out / "run.json").read_text())["stages_off"] == ["teacher", "shrink", "prune", "push"]
    # the fine-tuned model is the PCN model (narrow, dense), not the earlier pruned one
    final = hf_px.load(str(second.model_dir))
    assert final.config.intermediate_size == 32
    assert hf_px.sparsity_report(final)["achieved_sparsity"] < 0.01
    assert "prune" not in second.report or not second.report["prune"]


# -------------------------------------------------------------------------------------- bounded resources
def run_bounded(code: str) -> dict:
    """Run ``code`` in a Python whose address space is capped; it prints one JSON line with its results."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_billion_rounds_are_refused_and_the_schedule_is_lazy(tmp_path):
    out = tmp_path / "out"
    got = run_bounded(f"""
        import io, json, contextlib, resource
        from hf_px.config import PruneConfig
        from hf_px.pruning.masks import density_schedule
        from hf_px.cli import main
        try:
            PruneConfig(rounds=10**9)
            message = None
        except ValueError as err:
            message = str(err)
        schedule = density_schedule(0.1, 10**9)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["prune", "--model", "x", "--rounds", "1000000000", "--output-dir", {str(out)!r}])
        print(json.dumps({{"message": message, "len": len(schedule), "last": schedule[-1], "first": schedule[0],
                          "rc": rc, "cli": err.getvalue(), "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
    """)
    assert "rounds must be at most 10,000" in one_line(got["message"])
    assert got["len"] == 10**9 and got["last"] == pytest.approx(0.1) and 0.99 < got["first"] < 1
    assert got["rc"] == 2 and "rounds must be at most 10,000" in one_line(got["cli"])
    assert got["maxrss_kb"] < 1.5 * 2**20
    assert not out.exists()
    with pytest.raises(ConfigError, match="prune: rounds must be at most 10,000") as info:
        RunConfig.from_dict({"model": {"name_or_path": "x"}, "prune": {"rounds": 10**9}})
    one_line(str(info.value))


def alias_bomb(levels: int = 9) -> str:
    """Billion laughs: 9 aliases of 9 aliases ... of a short string, ~10^9 strings once expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join("      " + x for x in lines)


@pytest.mark.parametrize("where", ["from_config", "string_field"])
def test_a_yaml_alias_bomb_is_refused_with_bounded_memory(tmp_path, where):
    if where == "from_config":  # a dict field: passes the type checks, then reaches run.json
        text = f"model:\n  tokenizer: builtin:minilm\n  from_config:\n    model_type: bert\n    junk:\n{alias_bomb()}\n"
    else:  # a string field: the type error's message repr()s the value
        text = f"model:\n  name_or_path: x\ndata:\n  dataset:\n    bomb:\n{alias_bomb()}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    got = run_bounded(f"""
        import io, json, contextlib
        from hf_px.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["run", {str(path)!r}, "--output-dir", {str(out)!r}, "--no-progress"])
        print(json.dumps({{"rc": rc, "err": err.getvalue()}}))
    """)
    assert got["rc"] == 2
    line = one_line(got["err"])
    assert "expands to more than 1,000,000 characters" in line and len(line) < 400
    assert not out.exists()


def test_shared_references_in_a_config_dict_and_long_values_give_short_errors():
    bomb: list = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9
    with pytest.raises(ConfigError, match="model.from_config expands to more than") as info:
        RunConfig.from_dict({"model": {"from_config": {"model_type": "bert", "junk": bomb},
                                       "tokenizer": "builtin:minilm"}})
    one_line(str(info.value))
    with pytest.raises(ConfigError, match="expands to more than"):
        RunConfig.from_dict({"model": {"name_or_path": "x"}, "data": {"dataset": bomb}})
    for section, key, value in (("prune", "method", "x" * 500_000), ("data", "dataset", list(range(10_000))),
                                ("model", "task", "y" * 100_000)):
        raw: dict = {"model": {"name_or_path": "x"}}
        raw.setdefault(section, {})[key] = value
        with pytest.raises(ConfigError) as info:
            RunConfig.from_dict(raw)
        message = one_line(str(info.value))
        assert f"{section}" in message and "..." in message and len(message) < 400, message


def test_a_sparsity_that_empties_a_matrix_is_refused_with_the_largest_usable_one():
    from hf_px.pruning.targets import collect_targets

    model = tiny("bert")
    batches = tiny_batches(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"fewer than one per prunable matrix .*at most ([0-9.]+)\.$") as info:
        hf_px.prune(model, batches, hf_px.PruneConfig(method="magnitude", sparsity=0.999999, rounds=1),
                    progress=False)
    message = one_line(str(info.value))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any pruning
    largest = float(message.rsplit("at most ", 1)[1].rstrip("."))
    result = hf_px.prune(model, batches, hf_px.PruneConfig(method="magnitude", sparsity=largest, rounds=1),
                         progress=False)
    targets = collect_targets(model)
    assert all(int(t.view(result.masks[t.param_name]).sum()) >= 1 for t in targets)
    assert result.report["kept_params"] == len(targets)


# ------------------------------------------------------------------------------------------ one-line errors
@pytest.mark.parametrize(("key", "value", "match"), [
    ("learning_rate", math.inf, "learning_rate must be a finite number > 0"),
    ("learning_rate", math.nan, "learning_rate must be a finite number > 0"),
    ("learning_rate", -1e-3, "learning_rate must be a finite number > 0"),
    ("weight_decay", math.inf, "weight_decay must be a finite number >= 0"),
    ("warmup_ratio", math.nan, "warmup_ratio must be in [0, 1)"),
])
def test_non_finite_finetune_settings_are_refused_with_the_config(key, value, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace(")", r"\)")) as info:
        hf_px.FinetuneConfig(**{key: value})
    one_line(str(info.value))
    with pytest.raises(ConfigError, match=f"finetune: {match[:20]}") as info:
        RunConfig.from_dict({"model": {"name_or_path": "x"}, "finetune": {key: value}})
    one_line(str(info.value))


def test_learning_rate_inf_from_yaml_and_the_cli(work, tmp_path, capsys, no_model_loading):
    model, data = work
    path = tmp_path / "inf.yaml"
    path.write_text(f"model: {{name_or_path: {model}}}\nfinetune: {{learning_rate: .inf}}\n")
    with pytest.raises(ConfigError, match="learning_rate must be a finite number > 0, got inf"):
        RunConfig.from_file(path)
    refused_cli(finetune_args(model, data, tmp_path / "ft", "--learning-rate", "inf"),
                "learning_rate must be a finite number > 0", capsys, tmp_path)


@pytest.mark.parametrize("value", [0, -1, True, "8"])
def test_evaluate_batch_size_is_validated_with_the_config(value):
    raw = {"model": {"name_or_path": "x"}, "evaluate": {"batch_size": value}}
    with pytest.raises(ConfigError, match="evaluate.batch_size must be") as info:
        RunConfig.from_dict(raw)
    one_line(str(info.value))


@pytest.mark.parametrize("repo_id", ["../x", "user/../x", "x", "user/name/extra", "-user/name", "user/na--me"])
def test_a_bad_hub_repo_id_is_refused_before_any_work(work, tmp_path, capsys, no_model_loading, repo_id):
    model, data = work
    push = ("--push-to-hub", f"--hub-model-id={repo_id}")  # "=": argparse reads "-user/name" as a flag
    refused_cli(prune_args(model, data, tmp_path / "out", *push), "is not a Hub repo id", capsys, tmp_path)
    refused_cli(finetune_args(model, data, tmp_path / "ft", *push), "is not a Hub repo id", capsys, tmp_path)
    cfg = run_config(model, data, tmp_path / "run", push={"enabled": True, "hub_model_id": repo_id})
    with pytest.raises(ConfigError, match="push.hub_model_id .* is not a Hub repo id") as info:
        run_pipeline(cfg, progress=False)
    one_line(str(info.value))
    assert not (tmp_path / "run").exists()


def test_lfs_uploads_that_keep_failing_end_in_a_hub_push_error(tmp_path, fake_hub, monkeypatch):
    import hf_px.export.hub as hub_mod
    from hf_px.export.hub import HubPushError

    waits: list[float] = []
    monkeypatch.setattr(hub_mod.time, "sleep", waits.append)  # also huggingface_hub's own backoff
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(fake_hub.lfs_threshold + 1))
    before = snapshot(tmp_path)
    fake_hub.lfs_put_status = 500
    with pytest.raises(HubPushError, match=r"upload .*model\.safetensors.*kept failing \(HTTP 500\)") as info:
        hub_mod.push_to_hub(folder, "tester/lfs-down", max_retries=1)
    one_line(str(info.value))
    puts = [path for method, path in fake_hub.requests if method == "PUT"]
    assert len(puts) >= 2 and waits  # retried, then gave up
    assert snapshot(tmp_path) == before
    fake_hub.lfs_put_status = None  # the same push goes through once storage is back
    assert "/commit/" in hub_mod.push_to_hub(folder, "tester/lfs-down")


def test_python_save_pretrained_replaces_only_an_earlier_hf_px_save(tmp_path):
    from hf_px.export.serialization import save_pretrained

    model = tiny("bert")
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="did not write") as err:
        save_pretrained(model, users)
    one_line(str(err.value))
    assert snapshot(tmp_path) == before  # nothing created beside it, nothing deleted in it

    out = save_pretrained(model, tmp_path / "out")
    assert save_pretrained(model, out) == out and (out / "hf_px.json").is_file()  # its own save: replaced
