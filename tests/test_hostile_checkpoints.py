"""Booby-trapped pickles in every place hf_px reads, and broken checkpoints: no code runs, resumes recover."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_train import _assert_masks_hold, _pruned, _sentiment_rows, _tokenized, _word_tokenizer
from tiny_models import tiny

from hf_px.cli import main
from hf_px.finetuning.loop import FinetuneConfig, finetune

# what old Accelerate checkpoints held, and what a careless loader would unpickle
TRAP_NAMES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "masks.pt",
              "pytorch_model.bin", "scaler.pt")


class _Trap:
    """Unpickling this writes ``marker``: the stand-in for arbitrary code in a crafted file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _plant(folder: Path, marker: Path, names: tuple[str, ...] = TRAP_NAMES) -> None:
    for name in names:
        if name.endswith(".pkl"):
            (folder / name).write_bytes(pickle.dumps(_Trap(marker)))
        else:
            torch.save({"state": _Trap(marker)}, folder / name)


def test_the_trap_fires_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    _plant(tmp_path, marker, ("a.pkl", "b.bin"))
    pickle.loads((tmp_path / "a.pkl").read_bytes())
    assert marker.exists()  # so the assertions below that it never appears mean something
    marker.unlink()
    torch.load(tmp_path / "b.bin", weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- model folder


@pytest.fixture
def csv_data(tmp_path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"{s},{y}\n" for s, y in _sentiment_rows(48)))
    return path


def test_finetune_refuses_a_pickle_only_model_folder(tmp_path, csv_data, capsys):
    model_dir, marker = tmp_path / "model", tmp_path / "marker"
    tiny("bert").config.save_pretrained(model_dir)
    _plant(model_dir, marker, ("pytorch_model.bin",))
    rc = main(["finetune", "--model", str(model_dir), "--dataset", str(csv_data), "--output-dir",
               str(tmp_path / "ft"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "pickle" in err and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "ft").exists()


def test_finetune_never_falls_back_to_a_bin_beside_stray_safetensors(tmp_path, csv_data, capsys):
    model_dir, marker = tmp_path / "model", tmp_path / "marker"
    tiny("bert").config.save_pretrained(model_dir)
    _plant(model_dir, marker, ("pytorch_model.bin",))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(model_dir / "adapter.safetensors"))  # passes the folder check
    rc = main(["finetune", "--model", str(model_dir), "--dataset", str(csv_data), "--output-dir",
               str(tmp_path / "ft"), "--no-progress"])
    assert rc == 2 and "model.safetensors" in capsys.readouterr().err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- --resume


def _cli_run(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["finetune", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
                 "--max-steps", "6", "--save-every", "2", "--batch-size", "8", "--learning-rate", "5e-3",
                 "--warmup-ratio", "0", "--log-every", "1", "--no-progress", *extra])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from hf_px.export.serialization import load

    return dict(load(str(folder)).named_parameters())


@pytest.fixture
def finished_run(tmp_path, csv_data) -> tuple[Path, Path, dict]:
    """A 6-step CLI fine-tune of a dropout model with checkpoints at steps 2, 4 and 6, and its final weights."""
    from hf_px.export.serialization import save_pretrained

    tok = _word_tokenizer()
    model, masks = _pruned(vocab_size=len(tok), num_labels=2, hidden_dropout_prob=0.1)
    save_pretrained(model, tmp_path / "model", masks=masks, tokenizer=tok)
    assert _cli_run(tmp_path / "model", csv_data, tmp_path / "ref") == 0
    assert sorted(os.listdir(tmp_path / "ref" / "checkpoints")) == ["step_2", "step_4", "step_6"]
    return tmp_path / "model", tmp_path / "ref", _weights(tmp_path / "ref" / "model")


def _interrupted_copy(ref: Path, dst: Path) -> Path:
    shutil.copytree(ref, dst)
    shutil.rmtree(dst / "checkpoints" / "step_6")  # as if killed between steps 4 and 6
    return dst / "checkpoints"


def test_resume_ignores_pickles_beside_the_real_state(tmp_path, csv_data, finished_run):
    model_dir, ref, want = finished_run
    marker = tmp_path / "marker"
    ckpts = _interrupted_copy(ref, tmp_path / "ft")
    _plant(ckpts / "step_4", marker)
    assert _cli_run(model_dir, csv_data, tmp_path / "ft", "--resume") == 0
    assert not marker.exists()
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["resumed_from"].endswith("step_4")
    for name, p in _weights(tmp_path / "ft" / "model").items():
        torch.testing.assert_close(p, want[name], atol=1e-6, rtol=1e-5)


def test_resume_skips_a_checkpoint_whose_state_was_swapped_for_pickles(tmp_path, csv_data, finished_run):
    model_dir, ref, want = finished_run
    marker = tmp_path / "marker"
    ckpts = _interrupted_copy(ref, tmp_path / "ft")
    for name in os.listdir(ckpts / "step_4"):
        if name != "training_state.json" and name != "model.safetensors":
            os.remove(ckpts / "step_4" / name)
    _plant(ckpts / "step_4", marker)
    with pytest.warns(UserWarning, match=r"step_4: masks\.safetensors is missing"):
        assert _cli_run(model_dir, csv_data, tmp_path / "ft", "--resume") == 0
    assert not marker.exists()
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["resumed_from"].endswith("step_2")
    for name, p in _weights(tmp_path / "ft" / "model").items():
        torch.testing.assert_close(p, want[name], atol=1e-6, rtol=1e-5)


def test_an_old_accelerate_checkpoint_is_refused(tmp_path, csv_data, finished_run, capsys):
    model_dir, ref, _ = finished_run
    marker = tmp_path / "marker"
    ckpts = _interrupted_copy(ref, tmp_path / "ft")
    shutil.rmtree(ckpts / "step_2")
    old = ckpts / "step_4"
    shutil.rmtree(old)
    old.mkdir()
    _plant(old, marker)
    (old / "training_state.json").write_text(json.dumps({"global_step": 4, "epoch": 0, "batches_in_epoch": 4}))
    assert _cli_run(model_dir, csv_data, tmp_path / "ft", "--resume") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not progress bars
    assert len(errors) == 1 and str(old) in errors[0] and "pickle" in errors[0] and "fresh run" in errors[0]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- broken files


class _Killed(Exception):
    pass


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _garble_same_size(path: Path) -> None:
    path.write_bytes(b"\xff" * path.stat().st_size)


@pytest.mark.parametrize("file, damage", [
    ("model.safetensors", _truncate),
    ("optimizer.safetensors", _garble_same_size),
    ("scheduler.json", _garble_same_size),
    ("rng_rank0.safetensors", os.remove),
])
def test_a_broken_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, file, damage):
    data = _tokenized(40)
    cfg = dict(epochs=3, batch_size=8, learning_rate=5e-3, weight_decay=0.1, progress_bar=False)
    ref = finetune(_pruned(hidden_dropout_prob=0.1)[0], data, config=FinetuneConfig(**cfg))
    cfg.update(save_every=3, output_dir=str(tmp_path))

    def kill(step, record):
        if step == 7:
            raise _Killed

    with pytest.raises(_Killed):
        finetune(_pruned(hidden_dropout_prob=0.1)[0], data, config=FinetuneConfig(**cfg), on_step=kill)
    damage(tmp_path / "checkpoints" / "step_6" / file)
    model, masks = _pruned(hidden_dropout_prob=0.1)
    with pytest.warns(UserWarning, match=rf"step_6: {file.replace('.', '[.]')}"):
        resumed = finetune(model, data, config=FinetuneConfig(resume=True, **cfg))
    assert resumed.resumed_from.endswith("step_3") and resumed.global_step == ref.global_step == 15
    _assert_masks_hold(resumed.model, masks)
    ref_params = dict(ref.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=1e-5)


def test_no_usable_checkpoint_starts_over(tmp_path):
    data = _tokenized(16)
    cfg = dict(max_steps=4, batch_size=8, save_every=2, progress_bar=False, output_dir=str(tmp_path))
    finetune(_pruned()[0], data, config=FinetuneConfig(**cfg))
    for step in (2, 4):
        _truncate(tmp_path / "checkpoints" / f"step_{step}" / "model.safetensors")
    with pytest.warns(UserWarning) as caught:
        out = finetune(_pruned()[0], data, config=FinetuneConfig(resume=True, **cfg))
    messages = " ".join(str(w.message) for w in caught)
    assert "step_2: model.safetensors has" in messages and "step_4: model.safetensors has" in messages
    assert "starting from step 0" in messages
    assert out.resumed_from is None and out.global_step == 4


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    from safetensors import safe_open

    from hf_px.finetuning import checkpoints

    model = tiny("gpt2")  # lm_head.weight is transformer.wte.weight
    checkpoints.write_model(model, str(tmp_path / "m.safetensors"), write=True)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        assert "lm_head.weight" not in set(fh.keys())
    other = tiny("gpt2", seed=3)
    checkpoints.read_model(other, str(tmp_path / "m.safetensors"))
    assert other.lm_head.weight is other.transformer.wte.weight
    want = model.state_dict()
    for name, t in other.state_dict().items():
        assert torch.equal(t, want[name]), name


# ---------------------------------------------------------------------------------------------- hf-px run


@pytest.mark.slow  # the pipeline's tokenizer is the packaged MiniLM
def test_pipeline_rerun_never_unpickles_its_work_folder(tmp_path, monkeypatch):
    from test_run import tiny_config

    import hf_px.finetuning.outputs as U
    from hf_px.pipeline import run as run_pipeline

    out, marker = tmp_path / "run", tmp_path / "marker"
    real_save = U.save_checkpoint

    def save_then_interrupt(accelerator, root, step, *args, **kwargs):
        real_save(accelerator, root, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(U, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_config(out), progress=False)
    monkeypatch.setattr(U, "save_checkpoint", real_save)
    ckpts = out / "05-finetune.work" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_2", "step_4"]
    _plant(ckpts / "step_2", marker)  # beside the real state
    for name in os.listdir(ckpts / "step_4"):  # instead of it
        if name.startswith(("optimizer", "rng_")):
            os.remove(ckpts / "step_4" / name)
    _plant(ckpts / "step_4", marker)
    with pytest.warns(UserWarning, match="step_4: optimizer.json is missing"):
        resumed = run_pipeline(tiny_config(out), progress=False)
    assert not marker.exists()
    assert resumed.stages["finetune"] == "ran"
    assert json.loads((out / "05-finetune" / "manifest.json").read_text())["summary"]["resumed_from"] == "step_2"


# ---------------------------------------------------------------------------------------------- FSDP2


def _fsdp_worker(rank: int, root: str) -> None:
    import types

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_px.finetuning import optim, outputs

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    # the part of an Accelerator that the checkpoint code uses
    acc = types.SimpleNamespace(is_main_process=rank == 0, process_index=rank, num_processes=2, step=0,
                                wait_for_everyone=dist.barrier, unwrap_model=lambda m: m, scaler=None)

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(optim.param_groups(model, 0.1), lr=1e-2)
        return model, opt, optim.linear_schedule(opt, 1, 10)

    def train(model, opt, sched, batches):
        for x in batches:
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            sched.step()

    g = torch.Generator().manual_seed(rank)
    data = [torch.randn(4, 6, generator=g) for _ in range(6)]
    objs = build(0)
    train(*objs, data[:3])
    state = {"global_step": 3, "epoch": 0, "batches_in_epoch": 3}
    outputs.save_checkpoint(acc, f"{root}/checkpoints", 3, state, {}, None, *objs)
    train(*objs, data[3:])
    want = {k: v.full_tensor() for k, v in objs[0].state_dict().items()}
    resumed = build(1)
    outputs.load_checkpoint_state(outputs.find_resume_point(f"{root}/checkpoints"), acc, *resumed)
    train(*resumed, data[3:])
    for k, v in resumed[0].state_dict().items():
        assert torch.equal(v.full_tensor(), want[k]), k
    (Path(root) / f"done_rank{rank}").touch()  # every check passed; only the process-group teardown is left
    dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_fsdp2_shards_round_trip_through_a_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    # sharded weights and AdamW moments, per-rank dropout streams: the resumed run matches bit for bit
    try:
        mp.spawn(_fsdp_worker, args=(str(tmp_path),), nprocs=2)
    except mp.ProcessExitedException:
        # torch 2.13's gloo teardown sometimes aborts a finished rank (docs/offline.md §5): accept it only once
        # both ranks passed every check
        if not all((tmp_path / f"done_rank{r}").exists() for r in range(2)):
            raise
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step_3").glob("rng_rank*")) == [
        "rng_rank0.json", "rng_rank0.safetensors", "rng_rank1.json", "rng_rank1.safetensors"]


@pytest.mark.slow  # two processes
def test_two_ddp_processes_resume_to_the_same_weights(tmp_path, csv_data):
    from test_train import _launch

    from hf_px.export.serialization import save_pretrained

    tok = _word_tokenizer()
    model, masks = _pruned(vocab_size=len(tok), num_labels=2, hidden_dropout_prob=0.1)
    save_pretrained(model, tmp_path / "model", masks=masks, tokenizer=tok)
    args = ["--model", str(tmp_path / "model"), "--dataset", str(csv_data), "--max-steps", "6", "--save-every", "2",
            "--batch-size", "4", "--learning-rate", "5e-3", "--warmup-ratio", "0", "--no-progress"]

    def launch(out: Path, *extra: str) -> None:
        proc = _launch([*args, "--output-dir", str(out), *extra])
        if proc.returncode != 0 and "terminate called" in proc.stderr + proc.stdout:
            proc = _launch([*args, "--output-dir", str(out), *extra])  # gloo teardown (docs/offline.md §5)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "ref")
    ckpts = _interrupted_copy(tmp_path / "ref", tmp_path / "ft")
    assert sorted(p.name for p in (ckpts / "step_4").glob("rng_rank*.json")) == ["rng_rank0.json", "rng_rank1.json"]
    launch(tmp_path / "ft", "--resume")
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["world_size"] == 2 and results["resumed_from"].endswith("step_4")
    want = _weights(tmp_path / "ref" / "model")
    for name, p in _weights(tmp_path / "ft" / "model").items():
        torch.testing.assert_close(p, want[name], atol=1e-6, rtol=1e-5)
