"""Saving and loading pruned checkpoints, in a dense or a compressed sparse layout.

Two on-disk formats, both written atomically (temp folder next to the target, then a rename):

* ``dense``: the ordinary ``model.safetensors`` with the zeros baked in. Stock
  ``AutoModel*.from_pretrained(dir)`` reads it; ``hf_px`` is not needed.
* ``sparse``: one file ``model.sparse.safetensors``. Every masked matrix ``K`` is stored as three tensors:

  - ``K.px_values``: the kept entries, 1-D, in the original dtype, in row-major (C) order;
  - ``K.px_bitmask``: the mask, flattened row-major and packed 8 per byte with ``numpy.packbits``
    (``bitorder="big"``: element 0 is the most significant bit of byte 0; the last byte is zero-padded);
  - ``K.px_shape``: the original shape (int64).

  Every other tensor (embeddings, norms, biases, heads) is stored as it is. Read it with
  :func:`load`; the reload is bit-identical (a pruned ``-0.0`` comes back as ``+0.0``, which compares equal).

Both formats write ``hf_px.json`` (format, layout, masks' provenance and per-matrix kept counts, user
metadata) next to ``config.json``, the tokenizer files and the model card ``README.md`` when given.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    import transformers
    from huggingface_hub import ModelCard

FORMATS = ("dense", "sparse")
SPARSE_FILE = "model.sparse.safetensors"
DENSE_FILE = "model.safetensors"
META_FILE = "hf_px.json"
VALUES, BITMASK, SHAPE = ".px_values", ".px_bitmask", ".px_shape"
BIT_ORDER = "big"
LAYOUT_DOC = (
    "per masked matrix K: K.px_values = kept entries (1-D, original dtype, row-major order); "
    "K.px_bitmask = row-major mask packed with numpy.packbits(bitorder='big'), uint8, last byte zero-padded; "
    "K.px_shape = original shape (int64). Every other tensor is stored unchanged."
)
# transformers' own weight files, replaced by SPARSE_FILE in the sparse format
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hf-px")
    except Exception:  # noqa: BLE001 - running from a source tree without an install
        return "unknown"


# ---------------------------------------------------------------------------------------------- pack/unpack
def _numpy(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor, or None for dtypes numpy lacks (bfloat16, float8).

    Boolean indexing and reductions run several times faster in numpy than in torch on CPU.
    """
    try:
        return t.detach().cpu().numpy()
    except TypeError:
        return None


def _check_zeros_outside(key: str, tensor: torch.Tensor, mask: torch.Tensor) -> None:
    if tuple(mask.shape) != tuple(tensor.shape):
        raise ValueError(
            f"mask for '{key}' has shape {tuple(mask.shape)} but the tensor has {tuple(tensor.shape)}; "
            "pass masks keyed by parameter name with the parameter's shape."
        )
    keep = mask.detach().cpu().bool()
    values = _numpy(tensor)
    if values is not None:
        outside = bool(np.any(values[~keep.numpy()]))
    else:
        outside = bool(torch.where(keep, 0, tensor.detach().cpu()).any())
    if outside:
        raise ValueError(
            f"'{key}' has non-zero weights outside its mask, which the saved masks would contradict; "
            "zero them first with hf_px.masks.apply_masks(model, masks)."
        )


def sparse_state_dict(state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pack the masked tensors of ``state_dict`` into values + bitmask + shape (layout in the module doc).

    Tensors without a mask pass through unchanged. Raises ``ValueError`` when a masked tensor has non-zero
    entries outside its mask (they would be lost), or a mask's shape does not match its tensor.

    Example:
        >>> w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
        >>> packed = sparse_state_dict({"w": w}, {"w": w != 0})
        >>> packed["w.px_values"].tolist(), packed["w.px_bitmask"].tolist()
        ([2.0, 3.0], [96])
        >>> torch.equal(dense_state_dict(packed)["w"], w)
        True
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        mask = masks.get(key)
        if mask is None:
            out[key] = tensor
            continue
        _check_zeros_outside(key, tensor, mask)
        flat = tensor.detach().reshape(-1).cpu()
        keep = mask.detach().reshape(-1).cpu().bool().numpy()
        values = _numpy(flat)
        out[key + VALUES] = torch.from_numpy(values[keep]) if values is not None else flat[torch.from_numpy(keep)]
        out[key + BITMASK] = torch.from_numpy(np.packbits(keep, bitorder=BIT_ORDER))
        out[key + SHAPE] = torch.tensor(list(tensor.shape), dtype=torch.int64)
    return out


def dense_state_dict(sparse: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`sparse_state_dict`: rebuild full tensors with zeros where the mask is off."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sparse.items():
        if key.endswith((BITMASK, SHAPE)):
            continue
        if not key.endswith(VALUES):
            out[key] = tensor
            continue
        name = key[: -len(VALUES)]
        try:
            bits, shape = sparse[name + BITMASK], sparse[name + SHAPE]
        except KeyError as err:
            raise ValueError(f"sparse checkpoint is missing {err} for '{name}'; the file is incomplete.") from None
        shape = tuple(int(s) for s in shape.tolist())
        numel = int(np.prod(shape)) if shape else 1
        keep = np.unpackbits(bits.numpy(), count=numel, bitorder=BIT_ORDER).astype(bool)
        if int(keep.sum()) != tensor.numel():
            raise ValueError(
                f"'{name}': the bitmask keeps {int(keep.sum())} entries but {tensor.numel()} values are stored; "
                "the file is corrupt."
            )
        values = _numpy(tensor)
        if values is not None:
            full = np.zeros(numel, dtype=values.dtype)
            full[keep] = values
            out[name] = torch.from_numpy(full).view(shape)
        else:
            dense = torch.zeros(numel, dtype=tensor.dtype)
            dense[torch.from_numpy(keep)] = tensor
            out[name] = dense.view(shape)
    return out


# ---------------------------------------------------------------------------------------------- save
@contextmanager
def _atomic_dir(target: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a fresh temp folder beside ``target``; on success it replaces ``target``, on error it vanishes."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"'{target}' exists and is not a folder; choose another save directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            # keep the old folder until the new one is in place, so a crash here never loses both
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _mask_summary(masks: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    kept = {n: int(np.count_nonzero(m.detach().cpu().numpy())) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    return {
        "source": source,
        "num_masked_tensors": len(masks),
        "masked_params": total,
        "kept_params": sum(kept.values()),
        "density": sum(kept.values()) / max(total, 1),
        "tensors": {n: {"shape": list(masks[n].shape), "kept": kept[n]} for n in masks},
    }


def _default_card(model: nn.Module, report: dict, format: str) -> ModelCard | None:
    from .card import build_card, pipeline_tag_for

    try:
        return build_card(report, base_model=report.get("base_model"), license=None, dataset=None, metrics=None,
                          format=format, pipeline_tag=pipeline_tag_for(model))
    except FileNotFoundError as err:  # template missing from an install: the weights matter more than the card
        warnings.warn(f"no model card written: {err}", stacklevel=3)
        return None


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return [folder / DENSE_FILE]


def _to_sparse_files(folder: pathlib.Path, masks: dict[str, torch.Tensor]) -> list[str]:
    """Replace transformers' weight files in ``folder`` by SPARSE_FILE; returns masks with no saved tensor."""
    files = _weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    missing = [n for n in masks if n not in state]
    save_file(sparse_state_dict(state, masks), folder / SPARSE_FILE, metadata={"format": "pt", "hf_px": "sparse-v1"})
    for f in [*files, folder / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    return missing


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    format: str = "dense",
    masks: dict[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
    card: ModelCard | bool | None = None,
    metadata: dict | None = None,
) -> pathlib.Path:
    """Save a pruned model as a dense or sparse checkpoint folder, atomically.

    Args:
        model: a ``transformers.PreTrainedModel`` with the pruned weights zeroed.
        save_directory: target folder; an existing folder is replaced only once the new one is complete.
        format: ``"dense"`` (stock ``from_pretrained`` loads it) or ``"sparse"`` (values + bitmask, smaller;
            load with :func:`load`).
        masks: boolean masks keyed by parameter name; default ``hf_px.masks.masks_from_model(model)``.
        tokenizer: anything with ``save_pretrained`` (tokenizer, processor), saved alongside.
        card: a ``huggingface_hub.ModelCard``, written as ``README.md``. Default: built with
            :func:`hf_px.card.build_card` from ``metadata["report"]`` when there is one; ``False``: no card.
        metadata: JSON-serialisable extras recorded in ``hf_px.json`` (``report``: a pruning report dict).

    Returns:
        The path of the saved folder.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import tempfile, hf_px.serialization as S
        >>> m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                          intermediate_size=64, vocab_size=100))
        >>> out = S.save_pretrained(m, tempfile.mkdtemp() + "/out", format="sparse")
        >>> sorted(p.name for p in out.iterdir())
        ['config.json', 'hf_px.json', 'model.sparse.safetensors']
        >>> S.load(str(out)).__class__.__name__
        'BertModel'
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}.")
    source = "argument"
    if masks is None:
        from .masks import masks_from_model

        masks, source = masks_from_model(model), "model zeros (weight != 0)"
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(f"masks name parameters the model does not have: {unknown[:3]}; key masks by parameter name.")
    # checked for both formats: a dense file with unmasked non-zeros would contradict its own hf_px.json
    for name, mask in masks.items():
        _check_zeros_outside(name, params[name], mask)

    target = pathlib.Path(save_directory)
    info: dict[str, Any] = {
        "hf_px_version": _version(),
        "format": format,
        "weights_file": SPARSE_FILE if format == "sparse" else DENSE_FILE,
        "masks": _mask_summary(masks, source),
        "metadata": metadata or {},
    }
    if format == "sparse":
        info["sparse_layout"] = LAYOUT_DOC
    with _atomic_dir(target) as tmp:
        # one very large shard, so the sparse conversion below always reads a single dense file
        model.save_pretrained(tmp, max_shard_size="1000GB" if format == "sparse" else "50GB")
        if format == "sparse":
            missing = _to_sparse_files(tmp, masks)
            if missing:
                warnings.warn(
                    f"{len(missing)} masked tensors are not in the saved checkpoint (tied or renamed, e.g. "
                    f"{missing[0]}); they were stored by transformers as usual.",
                    stacklevel=2,
                )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is None and isinstance((metadata or {}).get("report"), dict):
            card = _default_card(model, metadata["report"], format)
        if card:
            card.save(tmp / "README.md")
        (tmp / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return target


# ---------------------------------------------------------------------------------------------- load
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
_LOADING_KWARGS = {"dtype", "torch_dtype", "device_map", "attn_implementation", "experts_implementation",
                   "max_memory", "trust_remote_code", "output_loading_info", "key_mapping", "tp_plan"}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _local_folder(path_or_repo_id: str | os.PathLike, kwargs: dict) -> pathlib.Path:
    path = pathlib.Path(path_or_repo_id)
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    if path.is_dir():
        return path
    if path.exists() or not _REPO_ID.match(str(path_or_repo_id)):
        raise FileNotFoundError(f"'{path_or_repo_id}' is not a checkpoint folder (nor a Hub repo id like 'user/name').")
    from huggingface_hub import snapshot_download

    return pathlib.Path(snapshot_download(str(path_or_repo_id), **hub))


def _model_class(config: Any) -> type:
    """The concrete class named by ``config.architectures``; also finds classes registered with Auto*."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
        for name in dir(transformers):
            auto = getattr(transformers, name, None) if name.startswith("AutoModel") else None
            extra = getattr(getattr(auto, "_model_mapping", None), "_extra_content", {})
            for candidate in extra.values():
                if getattr(candidate, "__name__", None) == arch:
                    return candidate
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"cannot tell which model class to build for model_type '{config.model_type}'; pass task_class=, "
            "e.g. transformers.AutoModelForSequenceClassification."
        ) from None


def load(path_or_repo_id: str | os.PathLike, task_class: Any = None, **from_pretrained_kwargs: Any) -> transformers.PreTrainedModel:
    """Load a checkpoint saved by :func:`save_pretrained` (either format) from a folder or a Hub repo id.

    Args:
        path_or_repo_id: a local folder or a Hub repo id (downloaded with ``snapshot_download``;
            ``revision``/``token``/``cache_dir`` kwargs go there).
        task_class: the class to build (e.g. ``AutoModelForSequenceClassification``); default: the class in
            ``config.architectures``.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``num_labels``...).

    Example:
        >>> model = load("out/")                                    # doctest: +SKIP
        >>> model = load("user/minilm-px90", revision="main")       # doctest: +SKIP
    """
    kwargs = dict(from_pretrained_kwargs)
    folder = _local_folder(path_or_repo_id, kwargs)
    meta_path = folder / META_FILE
    info = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    fmt = info.get("format") or ("sparse" if (folder / SPARSE_FILE).exists() else "dense")
    if fmt not in FORMATS:
        raise ValueError(f"{meta_path} names an unknown format {fmt!r}; expected one of {FORMATS}.")

    from transformers import AutoConfig

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; it is not a saved checkpoint folder.")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    if model_type.startswith("pcn_"):
        import hf_px.pcn  # noqa: F401 - registers the pcn_* classes with the Auto* factories

    config_kwargs = {k: kwargs[k] for k in ("trust_remote_code",) if k in kwargs}
    config = AutoConfig.from_pretrained(folder, **config_kwargs)
    cls = task_class or _model_class(config)
    if fmt == "dense":
        return cls.from_pretrained(folder, **kwargs)
    weights = folder / SPARSE_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{folder} is marked sparse but has no {SPARSE_FILE}; the folder is incomplete.")
    state = dense_state_dict(load_file(weights))
    if hasattr(cls, "_model_mapping"):  # an Auto class: from_pretrained(None, ...) needs the concrete one
        try:
            cls = cls._model_mapping[type(config)]
        except KeyError:
            raise ValueError(f"{cls.__name__} has no model class for model_type '{config.model_type}'.") from None
    # with an explicit config, from_pretrained hands leftover kwargs to __init__: apply config fields here
    for k in [k for k in kwargs if k not in _LOADING_KWARGS and hasattr(config, k)]:
        setattr(config, k, kwargs.pop(k))
    return cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
