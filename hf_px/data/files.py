"""Local data files that ``datasets`` would otherwise reject with a long traceback, or load silently wrong.

Checked before loading: 0-byte or blank files and text that is not UTF-8. Translated while loading: the
``DatasetGenerationError`` that wraps an arrow cast or parse error (rows or files with different keys/types).
Checked after loading JSON: a column whose rows mix value types (``datasets`` types it ``Json``) and rows with
different keys (``datasets`` fills the missing keys with nulls). Each becomes one ``ValueError`` naming the file
and the fix.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable
from typing import Any

import datasets

TEXT_EXTS = (".csv", ".tsv", ".json", ".jsonl", ".txt")
_CHUNK = 1 << 20


def load_checked(builder: str, files: dict[str, str], shown: str, **kwargs: Any) -> datasets.DatasetDict:
    """``datasets.load_dataset(builder, data_files=files)`` with the checks above, each failure one line."""
    check_files(files.values())
    try:
        dd = datasets.load_dataset(builder, data_files=files, **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        raise generation_error(err, shown) from err
    if builder == "json":
        check_json_rows(dd, files)
    return dd


def check_files(paths: Iterable[str]) -> None:
    """Refuse empty files and (for text formats) files that are not UTF-8, naming the first bad byte."""
    for path in paths:
        if os.path.getsize(path) == 0:
            raise ValueError(f"data file {path!r} is empty (0 bytes); pass a file with examples (was it cut short "
                             "by a failed download or copy?)")
        if os.path.splitext(path)[1].lower() in TEXT_EXTS:
            _check_utf8(path)


def _check_utf8(path: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, blank = 0, 1, True
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        while chunk := fh.read(_CHUNK):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad = offset + err.start
                line = lines + chunk[: err.start].count(b"\n")
                source = "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "latin1"  # latin1: a guess
                raise ValueError(
                    f"data file {path!r} is not UTF-8 text: byte 0x{chunk[err.start]:02x} at offset {bad} (line "
                    f"{line}) cannot be decoded; re-save it as UTF-8, e.g. iconv -f {source} -t utf-8 "
                    f"{os.path.basename(path)} > fixed{os.path.splitext(path)[1]}") from None
            blank = blank and not text.strip()
            offset += len(chunk)
            lines += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"data file {path!r} is not UTF-8 text: it ends inside a multi-byte character (cut "
                         "short?); re-save it as UTF-8 or restore the full file") from None
    if blank:
        raise ValueError(f"data file {path!r} holds only whitespace; pass a file with examples")


def generation_error(err: Exception, shown: str) -> ValueError:
    """One line for a ``DatasetGenerationError``, from the error that caused it."""
    cause: BaseException = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    reason = " ".join(str(cause).split())[:200]
    name = type(cause).__name__
    if name in ("CastError", "ArrowInvalid", "ArrowTypeError", "ArrowNotImplementedError"):
        return ValueError(f"the rows of {shown!r} do not share one schema ({reason}); give every row (and every file "
                          "of a folder) the same keys/columns with the same value types, e.g. labels all integers "
                          "or all strings")
    if isinstance(cause, UnicodeDecodeError):
        return ValueError(f"{shown!r} is not UTF-8 text ({reason}); re-save it as UTF-8")
    return ValueError(f"could not read {shown!r}: {name}: {reason}; check that it is a valid, complete data file")


def check_json_rows(dd: datasets.DatasetDict, files: dict[str, str]) -> None:
    """Refuse JSON splits whose rows mix value types in a column or have different keys."""
    json_feature = getattr(datasets, "Json", None)
    for split, ds in dd.items():
        path = files.get(split, split)
        for column, feature in ds.features.items():
            if json_feature is not None and isinstance(feature, json_feature):
                kinds = _first_two_kinds(ds[column])
                raise ValueError(f"{column!r} in {path!r} mixes value types across rows ({kinds}); give it one "
                                 "type in every row (e.g. labels all integers or all strings)")
        if split in files and any(ds.data.column(c).null_count for c in ds.column_names):
            _check_same_keys(files[split])  # nulls are legal; only a scan tells a null from a missing key


def _first_two_kinds(values: Iterable[Any]) -> str:
    seen: dict[str, Any] = {}
    for v in values:
        seen.setdefault(type(v).__name__, v)
        if len(seen) == 2:
            break
    return " and ".join(f"{k} {v!r}"[:60] for k, v in seen.items())


def _rows(path: str) -> Iterable[tuple[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, list):
        yield from ((f"item {i + 1}", row) for i, row in enumerate(whole))
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"line {i}", json.loads(line)
            except ValueError:
                return  # not ours to judge: datasets read the file, so this is some other JSON layout


def _check_same_keys(path: str) -> None:
    first: tuple[str, frozenset] | None = None
    for where, row in _rows(path):
        if not isinstance(row, dict):
            return
        keys = frozenset(row)
        if first is None:
            first = (where, keys)
        elif keys != first[1]:
            raise ValueError(f"{path!r}: {where} has keys {sorted(keys)} but {first[0]} has "
                             f"{sorted(first[1])}; give every row the same keys (use null for a missing value)")
