"""Class labels: one label map for every split, and the checks that keep label ids inside the classification head.

Encoding string labels per split would make ``pos`` id 1 in a train split with ``neg`` and id 0 in a test split
without it, so the map comes from the training split (its ``ClassLabel`` names or its sorted class names; a
checkpoint's own ``id2label`` when that names the same classes) and is applied to every split. Ids the head cannot
hold (negative, past ``num_labels``, seen only in the eval split) would fail as an IndexError after training has
begun, so they are refused before a model is loaded.

Example:
    >>> train = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "neg"]})
    >>> test = datasets.Dataset.from_dict({"text": ["c"], "label": ["pos"]})
    >>> labels = infer_num_labels(train, "label", test)
    >>> labels.num_labels, labels.names, encode_labels(test, labels)["label"][:]
    (2, ('neg', 'pos'), [1])
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import datasets

from ..errors import DataError

_DEFAULT_NAME = re.compile(r"LABEL_\d+")


@dataclass(frozen=True)
class Labels:
    """What the label column of a training split asks of the classification head."""

    column: str
    num_labels: int  # outputs the head needs
    names: tuple[str, ...] | None  # the class name of each id, when the data name their classes
    seen: int  # distinct classes in the training split


def is_string_feature(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _kind(feature: Any, column: str, split: str) -> str:
    """``named`` (class-name strings or ClassLabel), ``int`` (integer or bool ids); anything else is refused."""
    if isinstance(feature, datasets.ClassLabel) or is_string_feature(feature):
        return "named"
    if isinstance(feature, datasets.Value) and (feature.dtype.startswith(("int", "uint")) or feature.dtype == "bool"):
        return "int"
    raise DataError(f"labels must be integer class ids: column {column!r} of the {split} split holds {feature} "
                    f"values, which are not integer class ids; convert it to integers 0..K-1 (or class-name "
                    f"strings), or choose another data.label_column")


def _missing(value: Any, feature: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(feature, datasets.ClassLabel) and value == -1  # datasets' id for "no label"


def _values(ds: datasets.Dataset, column: str, split: str) -> list[Any]:
    """The labels of ``ds``: class names for named columns, ints otherwise; a row without a label is refused."""
    feature = ds.features[column]
    raw = list(ds[column])
    missing = [i for i, v in enumerate(raw) if _missing(v, feature)]
    if missing:
        raise DataError(f"{len(missing)} rows of the {split} split have no label in column {column!r} (first: row "
                        f"{missing[0]}); remove those rows or fill in their labels")
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(int(v)) for v in raw]
    return raw if is_string_feature(feature) else [int(v) for v in raw]


def _float_kind(ds: datasets.Dataset, column: str, split: str) -> None:
    """A float column with gaps is how pandas reads an integer column with missing labels: say that instead."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        _values(ds, column, split)


def checkpoint_label_names(config: Any) -> list[str] | None:
    """The class names a checkpoint's ``id2label`` gives, or None when it has only transformers' LABEL_i names."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(len(id2label))]
    if not names or all(_DEFAULT_NAME.fullmatch(n) for n in names):
        return None
    return names


def trained_head(config: Any) -> int | None:
    """The label count of a checkpoint's trained classification head (from ``architectures``), or None."""
    from ..modeling import CLASSIFICATION_TASKS, task_of

    return int(config.num_labels) if config is not None and task_of(config) in CLASSIFICATION_TASKS else None


def _setting(setting: str, k: int) -> tuple[str, str, str]:
    """(what holds the limit, how to set it to ``k``, how to go back to the data's count) for a run-config key or
    the Python API (``num_labels``: the model's head size)."""
    if "." in setting:
        return setting, f"set {setting}: {k}", " (or remove it to use the data's count)"
    return "the model's num_labels", f"load the model with num_labels={k}", ""


def infer_num_labels(train: datasets.Dataset, column: str, evals: datasets.Dataset | None = None, *,
                     num_labels: int | None = None, head_labels: int | None = None,
                     names: list[str] | None = None, min_classes: int = 1, setting: str = "model.num_labels",
                     train_split: str = "train", eval_split: str = "eval") -> Labels:
    """The number of labels the data need, after checking that every label of every split fits one map.

    Args:
        train, evals: the training split (it defines the classes) and the evaluation split, if any.
        num_labels: the head size the user asked for; integer ids may then skip classes.
        head_labels: the size of a trained head the checkpoint already has: kept when the data's ids fit it.
        names: the checkpoint's class names (``checkpoint_label_names``); their order wins when they cover the
            classes of ``train``, so a trained head keeps the meaning of its outputs. Named data whose classes
            these names do not cover get a new head of their own size (a pretrained ImageNet head is not kept
            for cats and dogs).
        min_classes: refuse a training split with fewer distinct classes (2 when a classifier is trained).
        setting: where ``num_labels`` comes from, for the fix in messages: ``model.num_labels`` or
            ``num_labels`` (the Python API: the model's head size).

    Raises:
        ValueError: one line naming the offending labels, the split and the fix.
    """
    feature = train.features[column]
    _float_kind(train, column, train_split)
    kind = _kind(feature, column, train_split)
    values = _values(train, column, train_split)
    distinct = set(values)
    if not values:
        raise DataError(f"the {train_split} split is empty, so it defines no classes; use a split with examples")
    if len(distinct) < min_classes:
        raise DataError(f"label column {column!r} of the {train_split} split holds a single class "
                        f"({next(iter(distinct))!r}); a "
                        f"classifier cannot learn from it: fix the data or choose another data.label_column")
    known: list[str] | None = None
    other_classes = False  # the checkpoint's head names other classes (e.g. ImageNet's): a new head of the data's size
    if kind == "named":
        known = list(feature.names) if isinstance(feature, datasets.ClassLabel) else sorted(distinct)
        if names and set(known) <= set(names) and (num_labels is None or len(names) <= num_labels):
            known = list(names)
        elif names:
            other_classes = True
        needed = len(known)
    else:
        if min(distinct, default=0) < 0:
            raise DataError(f"label column {column!r} of the {train_split} split has negative values "
                            f"({min(distinct)}); labels must be class ids 0..K-1: remap them (e.g. -1 -> 0)")
        needed = max(distinct, default=-1) + 1
        absent = sorted(set(range(needed)) - distinct)
        if absent and num_labels is None and (head_labels is None or needed > head_labels):
            ids = f"0..{len(distinct) - 1}" if len(distinct) > 1 else "0"
            raise DataError(f"the labels of the {train_split} split are {_brief(sorted(distinct))}, not the class "
                            f"ids 0..{needed - 1} (no example of {_brief(absent)}); remap them to contiguous ids "
                            f"{ids}, or {_setting(setting, needed)[1]} if those classes exist")
    what, fix, back = _setting(setting, needed)
    if num_labels is not None and needed > num_labels:
        raise DataError(f"{what} is {num_labels} but the labels of the {train_split} split need {needed} "
                        f"classes; {fix}{back}")
    if other_classes:
        head_labels = None  # its outputs mean nothing for these classes
    if num_labels is None and head_labels is not None and needed > head_labels:
        raise DataError(f"the checkpoint's classification head has {head_labels} labels but the data have "
                        f"{needed}; {fix} to replace the head with a new one")
    total = num_labels or (max(needed, head_labels) if head_labels else needed)  # a trained head keeps its size
    if evals is not None:
        _check_eval(evals, column, kind, known, total, setting, train_split, eval_split)
    return Labels(column=column, num_labels=total, names=tuple(known) if known is not None else None,
                  seen=len(distinct))


def _brief(items: list[Any], n: int = 6) -> str:
    shown = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in items[:n])
    return "{" + shown + (f", ... ({len(items)} in all)" if len(items) > n else "") + "}"


def _check_eval(evals: datasets.Dataset, column: str, kind: str, known: list[str] | None, total: int,
                setting: str, train_split: str, eval_split: str) -> None:
    where = f"the {eval_split} split"
    if column not in evals.column_names:
        raise DataError(f"{where} has no label column {column!r} (columns: {', '.join(evals.column_names)}); "
                        f"label it like the {train_split} split or choose another evaluation split")
    _float_kind(evals, column, eval_split)
    if _kind(evals.features[column], column, eval_split) != kind:
        raise DataError(f"the labels of {where} are {'class names' if kind == 'int' else 'integer ids'} but those "
                        f"of the {train_split} split are {'class names' if kind == 'named' else 'integer ids'}; "
                        f"use one kind of label in every split")
    seen = set(_values(evals, column, eval_split))
    if known is not None:
        unknown = sorted(seen - set(known))
        if unknown:
            raise DataError(f"label {unknown[0]!r} of {where} never occurs in the {train_split} split (its classes: "
                            f"{', '.join(known)}), so no output of the model can predict it; add {unknown[0]!r} "
                            f"examples to the {train_split} split or remove those rows from {where}")
        return
    outside = sorted(v for v in seen if not 0 <= v < total)
    if outside:
        raise DataError(f"label {outside[0]} of {where} is outside the class ids 0..{total - 1} of the "
                        f"{train_split} split, so no output of the model can predict it; remove or relabel those "
                        f"rows, or {_setting(setting, max(outside) + 1)[1]} if the class exists")


def encode_labels(ds: datasets.Dataset, labels: Labels) -> datasets.Dataset:
    """``ds`` with its label column as ids of ``labels`` (a ``ClassLabel`` carrying the names, when there are)."""
    column = labels.column
    feature = ds.features[column]
    if labels.names is None:
        if isinstance(feature, datasets.Value) and feature.dtype == "bool":
            return ds.cast_column(column, datasets.Value("int64"))
        return ds
    names = list(labels.names)
    if isinstance(feature, datasets.ClassLabel) and list(feature.names) == names:
        return ds
    lookup = {n: i for i, n in enumerate(names)}
    old = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def to_ids(batch: dict[str, list]) -> dict[str, list[int]]:
        return {column: [lookup[old[v] if old is not None else v] for v in batch[column]]}

    features = ds.features.copy()
    features[column] = datasets.ClassLabel(names=names)
    return ds.map(to_ids, batched=True, features=features)


def set_label_names(config: Any, labels: Labels | None) -> None:
    """Write the class names into a model config (``id2label``/``label2id``), keeping its number of labels."""
    if labels is None or labels.names is None or config is None:
        return
    n = max(int(getattr(config, "num_labels", 0) or 0), len(labels.names))
    config.id2label = {i: labels.names[i] if i < len(labels.names) else f"LABEL_{i}" for i in range(n)}
    config.label2id = {name: i for i, name in config.id2label.items()}


def prepare_labels(ds: datasets.Dataset, column: str | None) -> datasets.Dataset:
    """One dataset's labels as integer class ids (strings class-encoded in sorted order, bools cast, floats refused).

    The lenient single-split form behind ``encode_dataset``/``calibration_batches``: callers with several splits
    use ``infer_num_labels`` + ``encode_labels`` so every split shares one map.
    """
    if column is None:
        return ds
    _float_kind(ds, column, "given")
    kind = _kind(ds.features[column], column, "given")
    values = _values(ds, column, "given")
    if kind == "int" and values and min(values) < 0:
        raise DataError(f"label column {column!r} has negative values ({min(values)}); labels must be class ids "
                        f"0..K-1: remap them (e.g. -1 -> 0)")
    if len(ds) and len(set(values)) == 1:
        warnings.warn(f"label column {column!r} holds a single class; fine for calibration, useless for training",
                      UserWarning, stacklevel=3)
    feature = ds.features[column]
    known = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else \
        tuple(sorted(set(values))) if kind == "named" else None
    return encode_labels(ds, Labels(column=column, num_labels=len(known or ()), names=known, seen=len(set(values))))
