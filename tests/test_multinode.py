"""Two machines simulated on one host: two ``accelerate launch --num_machines 2 --machine_rank {0,1}`` processes.

One launch (tests/multinode_worker.py) runs ``hf-px finetune`` with checkpoints, then resumes a copy of that run
from a mid-run checkpoint; the test compares both with a 1-process run of the same examples per step.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _assert_masks_hold, _pruned, _sentiment_rows, _word_tokenizer

from hf_px.cli import main
from hf_px.finetuning import outputs

HERE = Path(__file__).parent
STEPS, SAVE_EVERY, CUT = 6, 2, 4
# One process with batch 8 sees, at every step, the rows that the two machines see with batch 4 each (seeded
# sampler over the whole set, rank r taking every other batch), and DDP averages their gradients: the runs
# differ by float rounding only, measured at most 2.6e-7 in the weights and 1e-7 in the losses. 1e-5 is ~40x
# that and far below one optimizer step (LR 5e-3).
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_machines(out: Path, args: list[str]) -> list[tuple[int, str]]:
    """Both "machines" at once; (return code, output) of each."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = []
    for rank in (0, 1):
        cmd = [accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               str(HERE / "multinode_worker.py"), str(out), str(CUT), "--", *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=HERE.parent))
    done = []
    for proc in procs:
        try:
            text, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append((proc.returncode, text))
    return done


def _losses(run: Path) -> list[float]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=ATOL, rtol=0, msg=name)


@pytest.mark.slow  # two launches, one process each, as two machines
def test_two_machines_train_checkpoint_resume_and_save_like_one_process(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hf_px.export.serialization import save_pretrained

    tok = _word_tokenizer()
    # no dropout: two machines draw other dropout masks than one process (resume exactness is still tested)
    model, masks = _pruned(vocab_size=len(tok), num_labels=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    save_pretrained(model, tmp_path / "model", masks=masks, tokenizer=tok)
    data = tmp_path / "data.csv"  # 3 words a row: one length, so batches of 4 and of 8 pad alike
    data.write_text("text,label\n" + "".join(f"{s},{y}\n" for s, y in _sentiment_rows(48)))
    args = ["--model", str(tmp_path / "model"), "--dataset", str(data), "--max-steps", str(STEPS), "--save-every",
            str(SAVE_EVERY), "--learning-rate", "5e-3", "--warmup-ratio", "0", "--log-every", "1", "--no-progress"]

    runs = _launch_two_machines(tmp_path / "nodes", [*args, "--batch-size", "4"])
    if any(rc for rc, _ in runs) and any("terminate called" in text for _, text in runs):
        # torch 2.13's gloo teardown sometimes aborts a finished rank (docs/offline.md §5): run it again
        shutil.rmtree(tmp_path / "nodes", ignore_errors=True)
        runs = _launch_two_machines(tmp_path / "nodes", [*args, "--batch-size", "4"])
    for rc, text in runs:
        assert rc == 0, text[-4000:]
    assert main(["finetune", *args, "--batch-size", "8", "--output-dir", str(tmp_path / "one")]) == 0

    one, ref, ft = tmp_path / "one", tmp_path / "nodes" / "ref", tmp_path / "nodes" / "ft"
    results = {name: json.loads((run / "results.json").read_text()) for name, run in
               [("one", one), ("ref", ref), ("ft", ft)]}
    assert [results[n]["world_size"] for n in ("one", "ref", "ft")] == [1, 2, 2]
    assert results["ft"]["resumed_from"].endswith(f"step_{CUT}") and results["ref"]["resumed_from"] is None
    kept = sum(int(m.sum()) for m in masks.values())
    for r in results.values():
        assert r["global_step"] == STEPS and r["sparsity"]["nonzero_after"] == kept

    # fine-tuning: the same losses and checkpoints as one process; the checkpoints hold both ranks' RNG states
    assert _losses(ref) == pytest.approx(_losses(one), abs=ATOL, rel=0)
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        ckpt = ref / "checkpoints" / f"step_{step}"
        assert outputs.latest_checkpoint(str(ckpt.parent)) is not None
        assert sorted(p.name for p in ckpt.glob("rng_rank*.json")) == ["rng_rank0.json", "rng_rank1.json"]
        _close(_weights(ckpt / "model.safetensors"), _weights(one / "checkpoints" / f"step_{step}" /
                                                              "model.safetensors"))
        saved = _weights(ckpt / "masks.safetensors")
        assert set(saved) == set(masks) and all(torch.equal(saved[n], m) for n, m in masks.items())

    # resume: the run cut back to step 4 ends exactly where the uninterrupted one did
    assert _losses(ft)[-(STEPS - CUT):] == _losses(ref)[-(STEPS - CUT):]
    final = {name: AutoModelForSequenceClassification.from_pretrained(run / "model") for name, run in
             [("one", one), ("ref", ref), ("ft", ft)]}
    for name, p in final["ft"].state_dict().items():
        assert torch.equal(p, final["ref"].state_dict()[name]), name

    # the final save: stock classes reload it, masks exact, weights those of one process and moved by training
    _close(final["ref"].state_dict(), final["one"].state_dict())
    for m in final.values():
        _assert_masks_hold(m, masks)
    moved = max(float((final["ref"].state_dict()[n] - p).abs().max()) for n, p in model.state_dict().items())
    assert moved > 100 * ATOL


def test_a_checkpoint_folder_that_a_process_cannot_see_is_a_clear_error(tmp_path, monkeypatch):
    # one process: the check itself (across machines every process reports what it sees, and all raise together)
    monkeypatch.setattr(outputs.time, "sleep", lambda seconds: None)  # its wait for a slow network filesystem
    outputs.require_shared_folder(str(tmp_path))
    with pytest.raises(RuntimeError, match="shares"):
        outputs.require_shared_folder(str(tmp_path / "on-another-disk"))
