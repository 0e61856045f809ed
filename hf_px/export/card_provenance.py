"""What a published model card may say about where a checkpoint came from: its base model and data set.

The metadata names a base model or data set by its Hub id only (a ``builtin:`` copy by its Hub original, a folder
from the Hub cache by its repo, an earlier hf-px save by its own card's ``base_model``); the text describes the
others ("a local checkpoint", "local data") and never names a path of this machine. The base model's license is
looked up offline only.
"""

from __future__ import annotations

import os
import pathlib
import re

from huggingface_hub import ModelCard

from ..builtin import hub_id as builtin_hub_id
from ..builtin import is_builtin, license_of
from .hub import REPO_ID

_DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".arrow")
_HUB_DATASET = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?$")  # a canonical (namespace-free) data set
_HUB_CACHE = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)/snapshots/")


def _looks_like_path(text: str) -> bool:
    """A string that names a file or folder of this machine (absolute, home-relative, or existing with a
    separator); Hub ids are ``namespace/name`` and are only taken for a path when such a folder exists here."""
    if not text or "\n" in text or is_builtin(text) or "://" in text:
        return False
    if text.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    return ("/" in text or os.sep in text) and os.path.exists(text)


def _local_card(folder: str | os.PathLike) -> dict:
    """The metadata of a local folder's ``README.md`` ({} when there is none or it does not parse)."""
    readme = pathlib.Path(folder).expanduser() / "README.md"
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme).data.to_dict()
    except Exception:  # noqa: BLE001 - a broken upstream card must not stop saving
        return {}


def base_model_license(base_model: str | None) -> str | None:
    """The license of the base model when it is known offline: a built-in model's, a local folder's card's, or
    the card of a Hub model already in the local Hub cache. None otherwise (nothing is downloaded)."""
    if not base_model:
        return None
    if license_of(base_model):
        return license_of(base_model)
    if os.path.isdir(os.path.expanduser(base_model)):
        return _local_card(base_model).get("license")
    if REPO_ID.match(base_model):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "README.md")
        except Exception:  # noqa: BLE001 - the cache is a bonus; no license is a fine answer
            return None
        if isinstance(cached, str):
            return _local_card(os.path.dirname(cached)).get("license")
    return None


def base_model_hub_id(base_model: str | None) -> str | None:
    """The Hub id of the model a checkpoint was made from, or None when it has none (a local or random model).

    ``builtin:minilm`` (or its folder) is the Hub model it is a copy of; a folder in the Hub cache is the repo it
    was downloaded from; a folder that hf-px saved earlier has the ``base_model`` of its own card; a string that
    is no existing path and has the form ``namespace/name`` is a Hub id.
    """
    if not base_model or base_model.startswith("from_config:"):
        return None
    known = builtin_hub_id(base_model)
    if known or is_builtin(base_model):
        return known
    local = os.path.expanduser(base_model)
    if os.path.exists(local):
        cache = _HUB_CACHE.search(pathlib.Path(local).resolve().as_posix())
        if cache and cache.group(1) == "models":
            return f"{cache.group(2)}/{cache.group(3)}"
        if os.path.isfile(os.path.join(local, "hf_px.json")):  # our own earlier output: its base is ours
            parent = _local_card(local).get("base_model")
            return parent if isinstance(parent, str) and REPO_ID.match(parent) else None
        return None
    return base_model if REPO_ID.match(base_model) else None


def dataset_hub_id(dataset: str | None) -> str | None:
    """The Hub id of a data set: a built-in one's original, a Hub id as it is; None for local files and
    folders, and for built-in data without a Hub original."""
    if not dataset:
        return None
    if is_builtin(dataset):
        return builtin_hub_id(dataset)
    if os.path.exists(os.path.expanduser(dataset)) or _looks_like_path(dataset):
        return None
    if dataset.lower().endswith(_DATA_SUFFIXES):
        return None
    return dataset if REPO_ID.match(dataset) or _HUB_DATASET.match(dataset) else None


def _describe_base(base_model: str | None, hub_base: str | None) -> str | None:
    """How the text names the base model: its Hub id, else what it is, never a local path; None: unknown."""
    if hub_base:
        return f"`{hub_base}`"
    if base_model and base_model.startswith("from_config:"):
        return f"a randomly initialised {base_model.split(':', 1)[1]} model"
    return "a local checkpoint" if base_model else None


def _describe_dataset(dataset: str | None, hub_dataset: str | None) -> str | None:
    """How the text names a data set: a Hub link, a built-in name (with its Hub original), never a local path."""
    link = f"[`{hub_dataset}`](https://huggingface.co/datasets/{hub_dataset})" if hub_dataset else None
    if is_builtin(dataset):
        # a packaged copy with hf-px's own seeded split: the numbers are not on the Hub original's test split
        return f"`{dataset}` (hf-px's own seeded split of a packaged copy" + (f"; Hub original: {link})" if link
                                                                            else ")")
    if link:
        return link
    return "local data (not on the Hub)" if dataset else None


def _dataset_name(dataset: str, hub_dataset: str) -> str:
    """The model-index's display name of the evaluation data: a built-in copy says it is one."""
    name = hub_dataset.split("/")[-1]
    return f"{name} (hf-px built-in copy, own split)" if is_builtin(dataset) else name
