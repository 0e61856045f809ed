"""Push to the Hub and download back, through the local fake Hub (tests/hub_server.py)."""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import socket

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
)

import hf_px.export.hub as hub_mod
import hf_px.export.serialization as S
from hf_px.commands import push as push_command
from hf_px.export.card import build_card
from hf_px.export.hub import HubPushError, push_to_hub
from hf_px.pruning.masks import apply_masks, masks_from_model
from hf_px.pruning.targets import prunable_parameters

INPUTS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


def saved_checkpoint(tmp_path, fmt: str, sparsity: float = 0.9):
    """A magnitude-pruned tiny BERT with tokenizer and card, saved in ``fmt``; returns (model, masks, folder)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, num_labels=2)).eval()
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        keep[torch.topk(p.detach().abs().flatten(), round((1 - sparsity) * p.numel())).indices] = True
        masks[name] = keep.view_as(p)
    apply_masks(model, masks)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    tokenizer = BertTokenizer(str(vocab))
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    report = {"method": "magnitude", "target_sparsity": sparsity, "achieved_sparsity": 1 - kept / total,
              "layers": [{"name": n, "shape": list(m.shape), "numel": m.numel(), "density": float(m.float().mean())}
                         for n, m in masks.items()]}
    # model-index results need a data set on the Hub
    card = build_card(report, base_model="org/tiny-bert", license="apache-2.0", dataset="org/toy-data",
                      metrics={"accuracy": 0.625}, format=fmt, pipeline_tag="text-classification",
                      repo_id="tester/tiny-px")
    folder = S.save_pretrained(model, tmp_path / f"ckpt-{fmt}", format=fmt, masks=masks, tokenizer=tokenizer,
                               card=card)
    return model, masks, folder


def fingerprint(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_sleep(monkeypatch):
    waits = []
    monkeypatch.setattr(hub_mod.time, "sleep", waits.append)
    return waits


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_push_then_download_gives_identical_model(tmp_path, fake_hub, fmt):
    model, masks, folder = saved_checkpoint(tmp_path, fmt)
    fake_hub.lfs_threshold = 16 * 1024  # so the tiny weights files take the LFS path
    before = fingerprint(folder)
    url = push_to_hub(folder, "tester/tiny-px", private=True)
    assert fingerprint(folder) == before
    commits = [p for m, p in fake_hub.requests if p.endswith("/commit/main")]
    assert len(commits) == 1 and url.endswith(fake_hub.repos[("model", "tester/tiny-px")].branches["main"])
    # the weights went through git-LFS (batch + PUT), the small files inline
    assert fake_hub.lfs_objects and any(p.endswith("/info/lfs/objects/batch") for _, p in fake_hub.requests)

    snap = snapshot_download("tester/tiny-px", cache_dir=tmp_path / "cache")
    downloaded = {p.name: p.read_bytes() for p in sorted(pathlib.Path(snap).iterdir())}
    assert downloaded == {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    if fmt == "dense":
        loaded = AutoModelForSequenceClassification.from_pretrained("tester/tiny-px", cache_dir=tmp_path / "c2")
    else:
        loaded = S.load("tester/tiny-px", cache_dir=tmp_path / "c2")
    with torch.no_grad():
        assert torch.equal(model(INPUTS).logits, loaded(INPUTS).logits)
    reread = masks_from_model(loaded, list(masks))
    assert all(torch.equal(reread[n], masks[n]) for n in masks)

    card = ModelCard.load("tester/tiny-px")
    assert card.data.base_model == "org/tiny-bert" and "hf-px" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.625
    info = json.loads((folder / "hf_px.json").read_text())
    assert info["format"] == fmt


def test_push_to_a_revision_leaves_main_alone(tmp_path, fake_hub):
    _, _, folder = saved_checkpoint(tmp_path, "sparse")
    push_to_hub(folder, "tester/tiny-px", revision="px-90", commit_message="sparse 90%")
    api = HfApi(endpoint=fake_hub.endpoint)
    assert "model.sparse.safetensors" in api.list_repo_files("tester/tiny-px", revision="px-90")
    assert api.list_repo_files("tester/tiny-px") == []
    loaded = S.load("tester/tiny-px", revision="px-90", cache_dir=tmp_path / "c")
    assert isinstance(loaded, BertForSequenceClassification)


def test_private_repo_is_hidden_without_a_token(tmp_path, fake_hub):
    _, _, folder = saved_checkpoint(tmp_path, "dense")
    push_to_hub(folder, "tester/secret", private=True)
    assert fake_hub.repos[("model", "tester/secret")].private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=fake_hub.endpoint).model_info("tester/secret", token=False)


def test_bad_token_is_a_clear_error_and_folder_is_untouched(tmp_path, fake_hub, monkeypatch, no_sleep):
    _, _, folder = saved_checkpoint(tmp_path, "sparse")
    before = fingerprint(folder)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    with pytest.raises(HubPushError, match="rejected the token.*HF_TOKEN"):
        push_to_hub(folder, "tester/tiny-px")
    assert fingerprint(folder) == before
    assert no_sleep == []  # an auth failure is not retried
    assert fake_hub.repos == {}


def test_unreachable_endpoint_is_a_clear_error_after_retries(tmp_path, monkeypatch, no_sleep):
    _, _, folder = saved_checkpoint(tmp_path, "dense")
    before = fingerprint(folder)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_TOKEN", "hf_any")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(HubPushError, match=f"cannot reach the Hub endpoint http://127.0.0.1:{port}"):
        push_to_hub(folder, "tester/tiny-px", endpoint=f"http://127.0.0.1:{port}", max_retries=2)
    assert no_sleep == [1.0, 2.0]
    assert fingerprint(folder) == before


def test_transient_server_errors_are_retried(tmp_path, fake_hub, no_sleep):
    model, _, folder = saved_checkpoint(tmp_path, "dense")
    fake_hub.fail_next = [503, 502]
    push_to_hub(folder, "tester/tiny-px")
    assert len(no_sleep) == 2
    loaded = AutoModelForSequenceClassification.from_pretrained("tester/tiny-px", cache_dir=tmp_path / "c")
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


def test_persistent_server_errors_give_up(tmp_path, fake_hub, no_sleep):
    _, _, folder = saved_checkpoint(tmp_path, "dense")
    fake_hub.fail_next = [500] * 10
    with pytest.raises(HubPushError, match="HTTP 500"):
        push_to_hub(folder, "tester/tiny-px", max_retries=1)
    assert len(no_sleep) == 1


def test_no_token_and_missing_folder(tmp_path, fake_hub, monkeypatch):
    _, _, folder = saved_checkpoint(tmp_path, "dense")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub_mod, "get_token", lambda: None)
    with pytest.raises(HubPushError, match="no Hub token"):
        push_to_hub(folder, "tester/tiny-px")
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "missing", "tester/tiny-px")


def cli_main(argv: list[str]) -> int:
    """``hf-px push`` alone (the full CLI also imports the other commands)."""
    parser = argparse.ArgumentParser(prog="hf-px")
    push_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_push(tmp_path, fake_hub, monkeypatch, capsys, no_sleep):
    _, _, folder = saved_checkpoint(tmp_path, "sparse")
    assert cli_main(["push", str(folder), "--repo-id", "tester/cli", "--private", "--revision", "exp",
                     "--commit-message", "from the cli"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{fake_hub.endpoint}/tester/cli/commit/")
    assert "exp" in fake_hub.repos[("model", "tester/cli")].branches
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert cli_main(["push", str(folder), "--repo-id", "tester/cli"]) == 1
    assert "rejected the token" in capsys.readouterr().err
