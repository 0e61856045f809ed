"""Hostile data files and labels: refused with one line naming the problem and the fix, before any model is
loaded, the same way by ``hf-px prune``, ``hf-px finetune``, ``hf-px run --check`` and the Python API; string labels
get one map for every split, saved in the model config."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from tiny_models import save_tiny_checkpoint
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import hf_px
from hf_px.cli import main
from hf_px.data import load_dataset_any
from hf_px.data.labels import encode_labels, infer_num_labels

pytestmark = pytest.mark.slow  # the tokenizer comes from the packaged MiniLM

POS = [f"a fine warm film number {i}" for i in range(8)]
NEG = [f"a dull cold film number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "bert")


@pytest.fixture(autouse=True)
def quiet_datasets():
    """datasets' progress bars also go to stderr, where each refusal must be the only line."""
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every refusal below must come before a model is loaded: loading one fails the test."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("hf_px.modeling.load_model", boom)
    monkeypatch.setattr("hf_px.export.serialization.load", boom)


def write_csv(path: Path, rows: list[tuple], header: str = "text,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(",".join(str(x) for x in r) + "\n" for r in rows))
    return path


def write_splits(folder: Path, train: list[tuple], test: list[tuple]) -> Path:
    write_csv(folder / "train.csv", train)
    write_csv(folder / "test.csv", test)
    return folder


def prune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--dataset", str(data), "--per-class", "2", "--sparsity", "0.5",
            "--rounds", "1", "--output-dir", str(out), "--no-progress", *extra]


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "4", "--no-progress", *extra]


def run_check_args(tmp_path: Path, model: Path, data: Path, out: Path) -> list[str]:
    cfg = {"model": {"name_or_path": str(model)}, "data": {"dataset": str(data), "per_class": 2},
           "prune": {"sparsity": 0.5, "rounds": 1}, "finetune": {"max_steps": 1}, "output": {"output_dir": str(out)}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return ["run", str(path), "--check"]


def refused(argv: list[str], capsys, out: Path, *needles: str) -> str:
    """Exit code 2, one stderr line that contains every needle, no output folder; returns the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"hf-px {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists(), "a refused command must not create its output folder"
    return err.split(": error: ", 1)[1]


# ------------------------------------------------------------------------------------ one label map
def test_string_labels_get_the_training_split_map_in_every_split():
    train = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})
    test = datasets.Dataset.from_dict({"text": ["d", "e"], "label": ["pos", "pos"]})
    labels = infer_num_labels(train, "label", test)
    assert (labels.num_labels, labels.names) == (2, ("neg", "pos"))
    assert list(encode_labels(test, labels)["label"]) == [1, 1]  # per-split encoding made these 0
    # a ClassLabel eval split with its own order is translated by name, not by id
    flipped = test.cast_column("label", datasets.ClassLabel(names=["pos", "neg"]))
    assert list(flipped["label"]) == [0, 0]
    assert list(encode_labels(flipped, labels)["label"]) == [1, 1]
    # a checkpoint's own id2label wins when it names the same classes: its head keeps the meaning of its outputs
    assert infer_num_labels(train, "label", names=["pos", "neg"]).names == ("pos", "neg")


def test_a_head_trained_on_other_named_classes_is_replaced_not_kept():
    train = datasets.Dataset.from_dict({"image": ["a", "b", "c"], "label": ["cat", "dog", "cat"]})
    imagenet = ["tench", "goldfish", "great white shark", "tiger shark"]
    labels = infer_num_labels(train, "label", head_labels=4, names=imagenet)
    assert (labels.num_labels, labels.names) == (2, ("cat", "dog"))
    # a larger task than the other task's head is not an error either: the head is new anyway
    many = datasets.Dataset.from_dict({"label": [f"c{i}" for i in range(6)]})
    assert infer_num_labels(many, "label", head_labels=4, names=imagenet).num_labels == 6
    # the same classes (in the checkpoint's order), or unnamed ids that fit: the trained head is kept
    assert infer_num_labels(train, "label", head_labels=3, names=["dog", "cat", "bird"]).num_labels == 3
    ids = datasets.Dataset.from_dict({"label": [0, 1, 1]})
    assert infer_num_labels(ids, "label", head_labels=4, names=imagenet).num_labels == 4


def test_finetune_string_labels_end_to_end(checkpoint, tmp_path):
    """The eval split holds only 'pos': the reported accuracy and the saved id2label must use the train map."""
    data = write_splits(tmp_path / "data", [(t, "pos") for t in POS] + [(t, "neg") for t in NEG],
                        [(t, "pos") for t in POS[:5]])
    out = tmp_path / "ft"
    assert main(finetune_args(checkpoint, data, out)) == 0
    model_dir = out / "model"
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["label2id"] == {"neg": 0, "pos": 1}
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.id2label == {0: "neg", 1: "pos"}
    results = json.loads((out / "results.json").read_text())
    reported = next(v for k, v in _flatten(results).items() if k.endswith("eval_accuracy"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(**tok(POS[:5], padding=True, return_tensors="pt")).logits
    truth = sum(model.config.id2label[int(i)] == "pos" for i in logits.argmax(-1)) / 5
    assert reported == pytest.approx(truth)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def test_prune_saves_the_label_map(checkpoint, tmp_path):
    data = write_csv(tmp_path / "d.csv", [(t, "pos") for t in POS] + [(t, "neg") for t in NEG])
    out = tmp_path / "out"
    assert main(prune_args(checkpoint, data, out)) == 0
    assert AutoModelForSequenceClassification.from_pretrained(out).config.label2id == {"neg": 0, "pos": 1}


def test_evaluate_api_uses_the_models_label_map(checkpoint):
    """String labels of a lone eval set take the ids of the model's id2label, not the set's sorted classes."""
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, id2label={0: "pos", 1: "neg"},
                                                               label2id={"pos": 0, "neg": 1}).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    texts = POS[:3] + NEG[:2]
    ds = datasets.Dataset.from_dict({"text": texts, "label": ["pos"] * 3 + ["neg"] * 2})
    with torch.no_grad():
        pred = model(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    truth = sum(model.config.id2label[p] == y for p, y in zip(pred, ds["label"], strict=True)) / len(texts)
    assert hf_px.evaluate(model, ds, tok)["eval_accuracy"] == pytest.approx(truth)


def test_eval_label_absent_from_train_is_refused_up_front(checkpoint, tmp_path, capsys, no_model_loading):
    data = write_splits(tmp_path / "data", [(t, "pos") for t in POS] + [(t, "neg") for t in NEG],
                        [(POS[0], "pos"), (NEG[0], "neutral")])
    out = tmp_path / "out"
    needles = ("label 'neutral' of the test split never occurs in the train split", "add 'neutral' examples")
    refused(finetune_args(checkpoint, data, out), capsys, out, *needles)
    refused(run_check_args(tmp_path, checkpoint, data, out), capsys, out, *needles)


# ------------------------------------------------------------------------------------ missing text
def test_missing_text_is_refused_alike_by_prune_finetune_and_run(checkpoint, tmp_path, capsys, no_model_loading):
    rows = [(t, 1) for t in POS[:4]] + [("", 0)] + [(t, 0) for t in NEG[:4]]  # pandas reads the gap as None
    data = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "out"
    head = "1 rows of the train split have empty 'text' (first: row 4); remove them"
    messages = [refused(prune_args(checkpoint, data, out), capsys, out, head, "from the data"),
                refused(finetune_args(checkpoint, data, out), capsys, out, head, "from the data"),
                refused(run_check_args(tmp_path, checkpoint, data, out), capsys, out, head, "data.drop_empty_text")]
    assert len({m.split(";")[0] for m in messages}) == 1, messages


def test_api_refuses_to_tokenize_none_as_the_word_none(checkpoint):
    ds = datasets.Dataset.from_dict({"text": ["fine", None], "label": [0, 1]})
    with pytest.raises(ValueError, match="rows with no 'text' \\(None\\); drop them"):
        hf_px.calibration_batches(ds, AutoTokenizer.from_pretrained(checkpoint), per_class=1)


# ------------------------------------------------------------------------------------ label ids
@pytest.mark.parametrize("command", ["prune", "finetune", "run"])
def test_label_ids_with_gaps_are_refused(checkpoint, tmp_path, capsys, no_model_loading, command):
    data = write_csv(tmp_path / "d.csv", [(t, (0, 1, 7)[i % 3]) for i, t in enumerate(POS + NEG)])
    out = tmp_path / "out"
    argv = {"prune": prune_args(checkpoint, data, out), "finetune": finetune_args(checkpoint, data, out),
            "run": run_check_args(tmp_path, checkpoint, data, out)}[command]
    fix = "model.num_labels: 8" if command == "run" else "--num-labels 8"
    refused(argv, capsys, out, "{0, 1, 7}", "(no example of {2, 3, 4, 5, 6}); remap them to contiguous ids 0..2", fix)


@pytest.mark.parametrize("command", ["prune", "finetune", "run"])
def test_negative_labels_are_refused(checkpoint, tmp_path, capsys, no_model_loading, command):
    data = write_csv(tmp_path / "d.csv", [(t, (-1, 1)[i % 2]) for i, t in enumerate(POS + NEG)])
    out = tmp_path / "out"
    argv = {"prune": prune_args(checkpoint, data, out), "finetune": finetune_args(checkpoint, data, out),
            "run": run_check_args(tmp_path, checkpoint, data, out)}[command]
    refused(argv, capsys, out, "negative values (-1)", "remap them")


@pytest.mark.parametrize("command", ["prune", "run"])
def test_rows_without_a_label_are_refused(checkpoint, tmp_path, capsys, no_model_loading, command):
    data = write_csv(tmp_path / "d.csv", [(t, i % 2) for i, t in enumerate(POS)] + [(NEG[0], "")])
    out = tmp_path / "out"
    argv = prune_args(checkpoint, data, out) if command == "prune" else run_check_args(tmp_path, checkpoint, data, out)
    refused(argv, capsys, out, "1 rows of the train split have no label in column 'label' (first: row 8)",
            "remove those rows or fill in their labels")


def test_num_labels_makes_room_for_sparse_ids(checkpoint, tmp_path):
    data = write_csv(tmp_path / "d.csv", [(t, (0, 1, 7)[i % 3]) for i, t in enumerate(POS + NEG)])
    out = tmp_path / "out"
    assert main(prune_args(checkpoint, data, out, "--num-labels", "8")) == 0
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 8


def test_class_seen_only_in_eval_is_refused(checkpoint, tmp_path, capsys, no_model_loading):
    data = write_splits(tmp_path / "data", [(t, i % 2) for i, t in enumerate(POS + NEG)], [(POS[0], 0), (NEG[0], 2)])
    out = tmp_path / "out"
    needles = ("label 2 of the test split is outside the class ids 0..1 of the train split", "--num-labels 3")
    refused(finetune_args(checkpoint, data, out), capsys, out, *needles)
    refused(run_check_args(tmp_path, checkpoint, data, out), capsys, out, needles[0], "model.num_labels: 3")


def test_trained_head_too_small_for_the_data_is_refused_by_finetune(checkpoint, tmp_path, capsys, no_model_loading):
    data = write_csv(tmp_path / "d.csv", [(t, i % 3) for i, t in enumerate(POS + NEG)])
    out = tmp_path / "out"
    refused(finetune_args(checkpoint, data, out), capsys, out,
            "head has 2 labels but the data have 3; set --num-labels 3 to replace the head")


def test_api_finetune_refuses_labels_outside_the_head(checkpoint, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    ds = datasets.Dataset.from_dict({"text": POS[:4], "label": [0, 1, 2, 1]})
    config = hf_px.FinetuneConfig(max_steps=1, batch_size=2, progress_bar=False, output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="the model's num_labels is 2 but .* need 3 classes; load the model with "
                                         "num_labels=3"):
        hf_px.finetune(model, ds, None, config, tokenizer=AutoTokenizer.from_pretrained(checkpoint))


# ------------------------------------------------------------------------------------ broken files
LATIN1 = "text,label\ncafé crème,1\nbad,0\n".encode("latin-1")
NON_UTF8 = {".csv": LATIN1, ".tsv": LATIN1.replace(b",", b"\t"), ".json": '[{"text": "café", "label": 1}]'.encode(
    "latin-1"), ".jsonl": '{"text": "café", "label": 1}\n'.encode("latin-1"), ".txt": "café\n".encode("latin-1")}


@pytest.mark.parametrize("ext", sorted(NON_UTF8))
def test_non_utf8_and_empty_files_are_one_line_errors(tmp_path, ext):
    bad = tmp_path / f"latin{ext}"
    bad.write_bytes(NON_UTF8[ext])
    with pytest.raises(ValueError, match=r"is not UTF-8 text: byte 0xe9 at offset \d+ \(line \d\).*iconv") as info:
        load_dataset_any(str(bad))
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    empty = tmp_path / f"empty{ext}"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\); pass a file with examples"):
        load_dataset_any(str(empty))


def test_broken_files_through_the_cli(checkpoint, tmp_path, capsys, no_model_loading):
    latin = tmp_path / "latin.csv"
    latin.write_bytes(LATIN1)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    refused(prune_args(checkpoint, latin, out), capsys, out, "latin.csv' is not UTF-8 text", "iconv")
    refused(finetune_args(checkpoint, empty, out), capsys, out, "empty.jsonl' is empty (0 bytes)")
    refused(run_check_args(tmp_path, checkpoint, latin, out), capsys, out, "data.dataset:", "is not UTF-8 text")
    refused(run_check_args(tmp_path, checkpoint, empty, out), capsys, out, "data.dataset:", "is empty (0 bytes)")


def test_jsonl_with_mixed_schemas(tmp_path, checkpoint, capsys, no_model_loading):
    keys = tmp_path / "keys.jsonl"
    keys.write_text('{"text": "a", "label": 1}\n{"sentence": "b", "y": 0}\n')
    with pytest.raises(ValueError, match=r"keys.jsonl': line 2 has keys \['sentence', 'y'\] but line 1 has "
                                         r"\['label', 'text'\]; give every row the same keys"):
        load_dataset_any(str(keys))
    types = tmp_path / "types.jsonl"
    types.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n')
    with pytest.raises(ValueError, match=r"'label' in '.*types.jsonl' mixes value types across rows \(int 1 and "
                                         r"str 'pos'\)"):
        load_dataset_any(str(types))
    # across files (or arrow chunks) datasets itself fails on the cast: the error names the folder and the fix
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "a", "label": 1}\n')
    (folder / "test.jsonl").write_text('{"sentence": "b", "y": 0}\n')
    out = tmp_path / "out"
    refused(finetune_args(checkpoint, folder, out), capsys, out, "do not share one schema",
            "give every row (and every file of a folder) the same keys")
    # legitimate nulls are not a schema problem
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": "a", "label": 1}\n{"text": null, "label": 0}\n')
    assert load_dataset_any(str(nulls))["train"]["text"][:] == ["a", None]
