"""Fine-tuning with Accelerate: masks held fixed, schedule/step counts, checkpoints and resume, 2 CPU ranks."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import types

import datasets
import pytest
import torch
from tiny_models import VOCAB, tiny

from hf_px.finetuning.loop import FinetuneConfig, finetune
from hf_px.finetuning.outputs import latest_checkpoint
from hf_px.pruning.masks import apply_masks
from hf_px.pruning.targets import collect_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "plot", "the", "a", "was", "is", "very"]


def _pruned(family: str = "bert", density: float = 0.4, seed: int = 0, vocab_size: int | None = None,
            num_labels: int | None = None, **overrides):
    if vocab_size is None:
        model = tiny(family, seed=seed, **overrides)
    else:  # a BERT sized for the word tokenizer of the raw-text tests
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, num_labels=num_labels, **overrides))
    g = torch.Generator().manual_seed(seed + 1)
    masks = {t.param_name: torch.rand(t.param.shape, generator=g) < density for t in collect_targets(model)}
    apply_masks(model, masks)
    return model, masks


def _tokenized(n: int = 40, length: int = 8, seed: int = 0, num_labels: int = 3) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                                       "label": (ids[:, 0] % num_labels).tolist()})


def _assert_masks_hold(model, masks):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
        assert torch.all(params[name][mask] != 0), name  # no kept weight lost either: the count is exact


def _word_tokenizer():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def _sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        word = rng.choice(WORDS[:3] if y else WORDS[3:6])
        rows.append((" ".join([rng.choice(WORDS[6:]), word, rng.choice(WORDS[6:])]), y))
    return rows


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 1.5}, "batch_size"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"peft": "ia3"}, "peft"),
    ({"save_every": 5}, "output_dir"),
    ({"resume": True}, "output_dir"),
    ({"log_with": ("wandb",)}, "log_with"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kwargs)


def test_bad_inputs_have_clear_errors():
    model, masks = _pruned()
    ds = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 1]})
    with pytest.raises(ValueError, match="no tokenizer"):
        finetune(model, ds, config=FinetuneConfig(progress_bar=False))
    with pytest.raises(ValueError, match="matches no parameter"):
        finetune(model, _tokenized(), masks={"nope.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="PruneResult"):
        finetune("model", _tokenized())


def test_a_deepspeed_launch_is_refused_with_a_pointer_to_fsdp2(monkeypatch):
    from hf_px.errors import ConfigError

    model, masks = _pruned()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --use_deepspeed` sets
    with pytest.raises(ConfigError, match=r"DeepSpeed is not supported.*accelerate_fsdp2\.yaml"):
        finetune(model, _tokenized(), config=FinetuneConfig(progress_bar=False), masks=masks)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing trained
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    deepspeed = types.SimpleNamespace(distributed_type=types.SimpleNamespace(value="DEEPSPEED"),
                                      gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        finetune(model, _tokenized(), config=FinetuneConfig(progress_bar=False), masks=masks, accelerator=deepspeed)


# ---------------------------------------------------------------------------------------------- masks


def test_masks_fixed_after_many_steps_with_weight_decay_and_momentum(tmp_path):
    model, masks = _pruned(density=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in masks}
    cfg = FinetuneConfig(epochs=3, batch_size=8, learning_rate=5e-3, weight_decay=0.5, warmup_ratio=0.0,
                         gradient_accumulation_steps=2, progress_bar=False, output_dir=str(tmp_path), log_every=1)
    out = finetune(model, _tokenized(40), _tokenized(16, seed=1), cfg)
    _assert_masks_hold(out.model, masks)
    assert out.sparsity["nonzero_after"] == out.sparsity["kept_before"] == sum(int(m.sum()) for m in masks.values())
    assert all(not torch.equal(before[n], p) for n, p in out.model.named_parameters() if n in masks)
    # 5 micro-batches per epoch, 2 per step: the last partial accumulation still steps (3 per epoch)
    assert out.global_step == 3 * math.ceil(5 / 2)
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == list(range(1, 10))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["sparsity"]["pruned_all_zero"] and saved["global_step"] == 9
    assert (tmp_path / "model" / "config.json").exists()


def test_masks_come_from_a_result_and_are_enforced_from_the_start():
    model, masks = _pruned(density=0.5)
    with torch.no_grad():  # weights that the masks prune but that are not zero yet
        for p in model.parameters():
            p.add_(1e-3)
    result = types.SimpleNamespace(model=model, masks=masks, tokenizer=None)
    out = finetune(result, _tokenized(16), config=FinetuneConfig(max_steps=2, batch_size=8, progress_bar=False))
    _assert_masks_hold(out.model, masks)
    assert out.global_step == 2 and out.metrics == {}


def test_max_steps_overrides_epochs_and_cycles_the_data():
    model, _ = _pruned()
    out = finetune(model, _tokenized(16), config=FinetuneConfig(epochs=1, max_steps=5, batch_size=8,
                                                                progress_bar=False, log_every=1))
    assert out.global_step == 5
    assert max(h["epoch"] for h in out.history) == 2  # 2 steps per epoch -> a third epoch was started
    lrs = [h["lr"] for h in out.history]
    assert lrs[-1] == 0.0 and all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # linear decay to zero


# ---------------------------------------------------------------------------------------------- checkpoints


class _Killed(Exception):
    pass


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    data = _tokenized(40)
    cfg = dict(epochs=3, batch_size=8, learning_rate=5e-3, weight_decay=0.1, progress_bar=False)
    # dropout on: a resumed run must also restore the RNG streams, not only weights and optimizer.
    # The reference writes no checkpoints, so this also shows that checkpointing does not perturb training.
    ref = finetune(_pruned(hidden_dropout_prob=0.1)[0], data, config=FinetuneConfig(**cfg))
    cfg["save_every"] = 3

    def kill(step, record):
        if step == 7:  # one step after the step-6 checkpoint (mid-epoch: 5 batches per epoch)
            raise _Killed

    model, masks = _pruned(hidden_dropout_prob=0.1)
    with pytest.raises(_Killed):
        finetune(model, data, config=FinetuneConfig(output_dir=str(tmp_path / "b"), **cfg), on_step=kill)
    ckpts = tmp_path / "b" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_3", "step_6"]
    (ckpts / "step_9").mkdir()  # a checkpoint without its state file is incomplete and must be skipped
    (ckpts / ".tmp_step_12").mkdir()
    assert latest_checkpoint(str(ckpts)).endswith("step_6")

    resumed = finetune(_pruned(hidden_dropout_prob=0.1)[0], data,
                       config=FinetuneConfig(output_dir=str(tmp_path / "b"), resume=True, **cfg))
    assert resumed.resumed_from.endswith("step_6")
    assert resumed.global_step == ref.global_step == 15
    _assert_masks_hold(resumed.model, masks)
    ref_params = dict(ref.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=1e-5)


def test_resume_with_other_masks_is_refused(tmp_path):
    data = _tokenized(16)
    cfg = dict(max_steps=2, batch_size=8, save_every=2, progress_bar=False, output_dir=str(tmp_path))
    finetune(_pruned(seed=0)[0], data, config=FinetuneConfig(**cfg))
    with pytest.raises(ValueError, match="masks"):
        finetune(_pruned(seed=5)[0], data, config=FinetuneConfig(resume=True, **cfg))


# ---------------------------------------------------------------------------------------------- tasks


def test_raw_text_classification_learns_and_reports_metrics():
    tok = _word_tokenizer()
    rows = _sentiment_rows(96)
    ds = datasets.Dataset.from_dict({"sentence": [r[0] for r in rows], "label": [r[1] for r in rows]})
    model, masks = _pruned(vocab_size=len(tok), num_labels=2, hidden_dropout_prob=0.0)
    out = finetune(model, ds, ds, tokenizer=tok, config=FinetuneConfig(
        epochs=8, batch_size=16, learning_rate=1e-2, warmup_ratio=0.0, metrics=("accuracy", "f1"),
        progress_bar=False, eval_every=24, log_every=4))
    _assert_masks_hold(out.model, masks)
    losses = [h["loss"] for h in out.history if "loss" in h]
    assert losses[-1] < losses[0], losses
    assert out.metrics["eval_accuracy"] > 0.9 and out.metrics["eval_f1"] > 0.9
    assert [h["step"] for h in out.history if h.get("event") == "eval"] == [24, 48]


def test_causal_lm_reports_perplexity_and_keeps_masks():
    model, masks = _pruned("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (24, 10), generator=g)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 10] * 24})
    out = finetune(model, ds, ds, config=FinetuneConfig(epochs=2, batch_size=8, learning_rate=1e-2,
                                                        progress_bar=False))
    _assert_masks_hold(out.model, masks)
    assert set(out.metrics) == {"eval_loss", "eval_perplexity"}
    assert out.metrics["eval_perplexity"] == pytest.approx(math.exp(out.metrics["eval_loss"]), rel=1e-5)
    assert out.metrics["eval_perplexity"] < VOCAB  # below the uniform guess after training on the same data


# ---------------------------------------------------------------------------------------------- 2 ranks


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           os.path.join(ROOT, "scripts", "finetune.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.slow
def test_two_cpu_processes_train_with_masks_fixed(tmp_path):
    tok = _word_tokenizer()
    model, masks = _pruned(vocab_size=len(tok), num_labels=2, hidden_dropout_prob=0.0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.tsv", "w") as fh:
        fh.write("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in _sentiment_rows(96)))
    args = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.tsv"), "--output-dir",
            str(tmp_path / "out"), "--epochs", "6", "--batch-size", "8", "--learning-rate", "1e-2",
            "--warmup-ratio", "0", "--log-every", "3", "--no-progress"]
    proc = _launch(args)
    if proc.returncode != 0 and "terminate called" in proc.stderr + proc.stdout:
        proc = _launch(args)  # torch 2.13's gloo teardown sometimes aborts a finished rank (docs/offline.md §5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["world_size"] == 2
    # 96 examples, 8 per rank and 2 ranks: 6 optimizer steps per epoch
    assert results["global_step"] == 6 * math.ceil(96 / (8 * 2))
    assert results["sparsity"]["nonzero_after"] == results["sparsity"]["kept_before"] == \
        sum(int(m.sum()) for m in masks.values())
    records = [json.loads(x) for x in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.1

    from hf_px.export.serialization import load

    _assert_masks_hold(load(str(tmp_path / "out" / "model")), masks)


def test_token_classification_pads_labels_with_ignore_index():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=3))
    masks = {t.param_name: torch.rand(t.param.shape) < 0.5 for t in collect_targets(model)}
    apply_masks(model, masks)
    g = torch.Generator().manual_seed(0)
    lengths = [3, 5, 8, 4] * 4
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * n for n in lengths],
                                     "labels": [[i % 3 for i in x] for x in ids]})
    out = finetune(model, ds, ds, config=FinetuneConfig(epochs=2, batch_size=4, progress_bar=False))
    _assert_masks_hold(out.model, masks)
    assert 0.0 <= out.metrics["eval_accuracy"] <= 1.0 and math.isfinite(out.metrics["eval_loss"])


def test_cli_finetunes_a_sparse_checkpoint_with_lora(tmp_path, capsys):
    from hf_px.cli import main
    from hf_px.export.serialization import load, save_pretrained

    tok = _word_tokenizer()
    model, masks = _pruned(vocab_size=len(tok), num_labels=2)
    save_pretrained(model, tmp_path / "pruned", format="sparse", masks=masks, tokenizer=tok)
    with open(tmp_path / "data.csv", "w") as fh:
        fh.write("text,label\n" + "".join(f"{s},{y}\n" for s, y in _sentiment_rows(32)))
    code = main(["finetune", "--model", str(tmp_path / "pruned"), "--dataset", str(tmp_path / "data.csv"),
                 "--output-dir", str(tmp_path / "ft"), "--max-steps", "4", "--batch-size", "8", "--peft", "lora",
                 "--lora-r", "2", "--metrics", "accuracy", "f1", "--eval-split", "train", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["steps"] == 4 and summary["world_size"] == 1
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["global_step"] == 4 and {"eval_accuracy", "eval_f1"} <= set(results["metrics"])
    assert results["config"]["peft"] == "lora"
    _assert_masks_hold(load(str(tmp_path / "ft" / "model")), masks)
