"""The run folder's size: stages share unchanged files through hard links and the prune stage keeps masks, so a
run holds about two models; linked files are never edited in place and tampering is still detected."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hf_px.pipeline import stages as S


# ------------------------------------------------------------------------------------------ links
def _inode(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_dev, st.st_ino


def test_link_or_copy_replaces_a_linked_file_without_writing_into_it(tmp_path):
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    a.write_text("shared")
    S.link_or_copy(a, b)
    assert _inode(a) == _inode(b)
    other.write_text("new")
    S.link_or_copy(other, b)  # b was a link to a: a must keep its content
    assert a.read_text() == "shared" and b.read_text() == "new"
    S.write_new(b, "rewritten")
    assert other.read_text() == "new" and b.read_text() == "rewritten"


def test_link_or_copy_falls_back_to_a_copy(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "sub" / "b"
    a.write_text("x" * 100)

    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    S.link_or_copy(a, b)
    assert b.read_text() == "x" * 100 and _inode(a) != _inode(b)
    S.copy_tree(tmp_path / "sub", tmp_path / "copy")
    assert (tmp_path / "copy" / "b").read_text() == "x" * 100
    assert not list(tmp_path.rglob(".*"))  # no temp names left behind


def test_copy_tree_can_refuse_links(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("user's file")
    S.copy_tree(tmp_path / "src", tmp_path / "dst", link=False)
    assert _inode(tmp_path / "src" / "f") != _inode(tmp_path / "dst" / "f")


def test_a_stage_shares_equal_files_with_earlier_stages_but_not_edited_ones(tmp_path):
    first = S.Stage(tmp_path / "01-a", "a", "fp-a")
    with first.writing() as (tmp, _):
        (tmp / "weights.bin").write_bytes(b"w" * 1000)
        (tmp / "edited.bin").write_bytes(b"e" * 1000)
    second = S.Stage(tmp_path / "02-b", "b", "fp-b")
    (first.path / "edited.bin").write_bytes(b"E" * 1000)  # changed after its manifest: not to be linked
    with second.writing(share_with=[first]) as (tmp, _):
        (tmp / "weights.bin").write_bytes(b"w" * 1000)
        (tmp / "edited.bin").write_bytes(b"e" * 1000)
        (tmp / "own.bin").write_bytes(b"o" * 1000)
    assert _inode(first.path / "weights.bin") == _inode(second.path / "weights.bin")
    assert _inode(first.path / "edited.bin") != _inode(second.path / "edited.bin")
    assert second.status() == "complete" and first.status() == "corrupt"
    assert S.disk_bytes(tmp_path) == 1000 * 4 + sum(p.stat().st_size for p in tmp_path.glob("*/manifest.json"))


# ------------------------------------------------------------------------------------------ a whole run
def _weights(folder: Path) -> Path:
    return folder / "model" / "model.safetensors"


@pytest.mark.slow  # the tokenizer comes from the packaged MiniLM
def test_a_run_folder_holds_about_two_models_and_tampering_is_still_found(tmp_path, capfd):
    import transformers
    from test_run import tiny_config

    import hf_px

    out = tmp_path / "run"
    cfg = tiny_config(out, finetune={"max_steps": 4, "batch_size": 16, "learning_rate": 1e-3, "eval_every": 2,
                                     "log_every": 1, "progress_bar": False})
    # hidden 64: the weights (embeddings of a 30k vocabulary) are what a run stores twice, the ~0.7 MB
    # tokenizer once; at hidden 32 the tokenizer alone would be 18% of the weights
    cfg["model"]["from_config"].update(hidden_size=64, intermediate_size=128)
    cfg["pcn"] = {"width": 64}
    verbosity = transformers.logging.get_verbosity()
    result = hf_px.run(cfg, progress=False)
    assert transformers.logging.get_verbosity() == verbosity  # the quiet switch is undone
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Map" not in err and "LOAD REPORT" not in err

    saved = _weights(out / "07-save").stat().st_size
    total = S.disk_bytes(out)
    assert total < 2.2 * saved, (total, saved, total / saved)
    # the PCN model and the fine-tuned one; the prune stage keeps masks, save and card link the fine-tuned weights
    assert not (out / "04-prune" / "model").exists() and (out / "04-prune" / "masks.safetensors").exists()
    assert _inode(_weights(out / "05-finetune")) == _inode(_weights(out / "07-save")) == _inode(result.model_dir /
                                                                                                 "model.safetensors")
    tokenizers = {_inode(p) for p in out.glob("*/model/tokenizer.json")}
    assert len(tokenizers) == 1 and len(list(out.glob("*/model/tokenizer.json"))) == 4
    summary = json.loads((out / "04-prune" / "manifest.json").read_text())["summary"]
    assert summary["model"] == "masks over 02-pcn/model" and len(summary["model_sha256"]) == 64

    again = hf_px.run(cfg, progress=False)  # every manifest still matches its files
    assert set(again.stages.values()) == {"skipped", "off"}

    # a file edited in place is edited in every stage that links it: all of them are redone, nothing else
    pcn_weights = _weights(out / "02-pcn").read_bytes()
    with open(_weights(out / "07-save"), "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    third = hf_px.run(cfg, progress=False)
    assert [third.stages[s] for s in ("calibrate", "pcn", "prune")] == ["skipped"] * 3
    assert [third.stages[s] for s in ("finetune", "save", "card")] == ["ran"] * 3
    assert _weights(out / "02-pcn").read_bytes() == pcn_weights
    assert set(hf_px.run(cfg, progress=False).stages.values()) == {"skipped", "off"}
    assert S.disk_bytes(out) < 2.2 * saved

    # the masks are what the prune stage stores: a damaged mask file redoes pruning and what follows
    masks = out / "04-prune" / "masks.safetensors"
    data = bytearray(masks.read_bytes())
    data[-1] ^= 0xFF
    masks.write_bytes(bytes(data))
    fourth = hf_px.run(cfg, progress=False)
    assert fourth.stages["pcn"] == "skipped" and fourth.stages["prune"] == "ran"


# ------------------------------------------------------------------------------------------ quiet libraries
def test_quiet_libraries_hides_load_reports_and_bars_then_restores_them(tmp_path, capfd, caplog):
    import datasets
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from hf_px.pipeline.runner import quiet_libraries

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "base")
    capfd.readouterr()
    # earlier tests in this process may have switched the bars off (--no-progress): start from them on
    transformers.logging.enable_progress_bar()
    before = (transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled(),
              datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled())

    def reports() -> int:  # the LOAD REPORT is a transformers warning (pytest's log capture holds it)
        return sum("LOAD REPORT" in r.getMessage() for r in caplog.records)

    with quiet_libraries():
        BertForSequenceClassification.from_pretrained(tmp_path / "base")  # a new head: a LOAD REPORT
        datasets.Dataset.from_dict({"x": list(range(10))}).map(lambda r: r)
    quiet = capfd.readouterr()
    assert reports() == 0 and "Loading weights" not in quiet.err and "Map" not in quiet.err
    assert (transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled(),
            datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()) == before
    BertForSequenceClassification.from_pretrained(tmp_path / "base")
    assert reports() == 1 and "Loading weights" in capfd.readouterr().err  # the libraries' own settings again
