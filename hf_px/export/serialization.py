"""Saving and loading pruned checkpoints, in a dense or a compressed sparse layout.

Two on-disk formats, both written atomically (temp folder next to the target, then a rename):

* ``dense``: the ordinary ``model.safetensors`` with the zeros baked in. Stock
  ``AutoModel*.from_pretrained(dir)`` reads it; ``hf_px`` is not needed.
* ``sparse``: one file ``model.sparse.safetensors``: every masked matrix as kept values + a packed bitmask +
  its shape, every other tensor as it is (layout in :mod:`hf_px.export.sparse_format`). Read it with :func:`load`,
  which checks the whole file against ``hf_px.json`` and the config first; the reload is bit-identical (a pruned
  ``-0.0`` comes back as ``+0.0``, which compares equal).

Both formats write ``hf_px.json`` (format, layout, masks' provenance and per-matrix kept counts, user
metadata) next to ``config.json``, the tokenizer files and the model card ``README.md`` when given.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
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

from .checkpoint_files import CheckpointFileError, check_checkpoint_files, weight_files
from .hub import REPO_ID
from .sparse_format import (
    LAYOUT_DOC,
    Expected,
    check_zeros_outside,
    dtype_name,
    listed_tensors,
    read_sparse_file,
    sparse_state_dict,
)

if TYPE_CHECKING:
    import transformers
    from huggingface_hub import ModelCard

FORMATS = ("dense", "sparse")
SPARSE_FILE = "model.sparse.safetensors"
DENSE_FILE = "model.safetensors"
META_FILE = "hf_px.json"
# transformers' own weight files, replaced by SPARSE_FILE in the sparse format
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hf-px")
    except Exception:  # noqa: BLE001 - running from a source tree without an install
        return "unknown"


# ---------------------------------------------------------------------------------------------- save
@contextmanager
def _atomic_dir(target: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a fresh temp folder beside ``target``; on success it replaces ``target``, on error it vanishes."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"'{target}' exists and is not a folder; choose another save directory.")
    if target.is_dir() and any(target.iterdir()):
        # replacing the folder deletes everything in it: only an earlier hf_px save may be replaced
        from ..folders import protected_reason

        reason = protected_reason(target)
        if reason is not None or not (target / "hf_px.json").is_file():
            raise FileExistsError(f"'{target}' {reason or 'holds files that hf_px did not write (no hf_px.json)'}; "
                                  "saving would replace the whole folder: choose a new or empty folder.")
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


def _mask_summary(masks: dict[str, torch.Tensor], source: str, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    kept = {n: int(np.count_nonzero(m.detach().cpu().numpy())) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    return {
        "source": source,
        "num_masked_tensors": len(masks),
        "masked_params": total,
        "kept_params": sum(kept.values()),
        "density": sum(kept.values()) / max(total, 1),
        "tensors": {n: {"shape": list(masks[n].shape), "kept": kept[n], "dtype": dtype_name(params[n].dtype)}
                    for n in masks},
    }


def _default_card(model: nn.Module, report: dict, format: str) -> ModelCard | None:
    from .card import build_card, pipeline_tag_for

    try:
        return build_card(report, base_model=report.get("base_model"), license=None, dataset=None, metrics=None,
                          format=format, pipeline_tag=pipeline_tag_for(model))
    except FileNotFoundError as err:  # template missing from an install: the weights matter more than the card
        warnings.warn(f"no model card written: {err}", stacklevel=4)
        return None


def _to_sparse_files(folder: pathlib.Path, masks: dict[str, torch.Tensor]) -> list[str]:
    """Replace transformers' weight files in ``folder`` by SPARSE_FILE; returns masks with no saved tensor."""
    files = weight_files(folder)
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
        masks: boolean masks keyed by parameter name; default ``hf_px.pruning.masks.masks_from_model(model)``.
        tokenizer: anything with ``save_pretrained`` (tokenizer, processor), saved alongside.
        card: a ``huggingface_hub.ModelCard``, written as ``README.md``. Default: built with
            :func:`hf_px.export.card.build_card` from ``metadata["report"]`` when there is one; ``False``: no card.
        metadata: JSON-serialisable extras recorded in ``hf_px.json`` (``report``: a pruning report dict).

    Returns:
        The path of the saved folder.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import tempfile, hf_px.export.serialization as S
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
    from ..inference.kernels import densified

    # CSR layers (hf_px.load(kernels="auto"), choose_kernels) have no .weight parameter: they are ordinary
    # nn.Linear layers while saving, and the CSR kernels are back in place afterwards
    with densified(model):
        return _save(model, pathlib.Path(save_directory), format, masks, tokenizer, card, metadata)


def _save(model: nn.Module, target: pathlib.Path, format: str, masks: dict[str, torch.Tensor] | None,
          tokenizer: Any, card: ModelCard | bool | None, metadata: dict | None) -> pathlib.Path:
    source = "argument"
    if masks is None:
        from ..pruning.masks import masks_from_model

        masks, source = masks_from_model(model), "model zeros (weight != 0)"
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(f"masks name parameters the model does not have: {unknown[:3]}; key masks by parameter name.")
    # checked for both formats: a dense file with unmasked non-zeros would contradict its own hf_px.json
    for name, mask in masks.items():
        check_zeros_outside(name, params[name], mask)

    info: dict[str, Any] = {
        "hf_px_version": _version(),
        "format": format,
        "weights_file": SPARSE_FILE if format == "sparse" else DENSE_FILE,
        "masks": _mask_summary(masks, source, params),
        "metadata": metadata or {},
    }
    if format == "sparse":
        info["sparse_layout"] = LAYOUT_DOC
    with _atomic_dir(target) as tmp:
        # one very large shard, so the sparse conversion below always reads a single dense file
        model.save_pretrained(tmp, max_shard_size="1000GB" if format == "sparse" else "50GB")
        if format == "sparse":
            missing = _to_sparse_files(tmp, masks)
            for name in missing:  # so load() does not take their absence from the sparse file for damage
                info["masks"]["tensors"][name]["packed"] = False
            if missing:
                warnings.warn(
                    f"{len(missing)} masked tensors are not in the saved checkpoint (tied or renamed, e.g. "
                    f"{missing[0]}); they were stored by transformers as usual.",
                    stacklevel=3,
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


def _local_folder(path_or_repo_id: str | os.PathLike, kwargs: dict) -> pathlib.Path:
    path = pathlib.Path(path_or_repo_id)
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    if path.is_dir():
        return path
    if path.exists() or not REPO_ID.match(str(path_or_repo_id)):
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


def load(
    path_or_repo_id: str | os.PathLike,
    task_class: Any = None,
    *,
    kernels: str | None = None,
    batch_shape: tuple[int, int] | None = None,
    **from_pretrained_kwargs: Any,
) -> transformers.PreTrainedModel:
    """Load a checkpoint saved by :func:`save_pretrained` (either format) from a folder or a Hub repo id.

    Args:
        path_or_repo_id: a local folder or a Hub repo id (downloaded with ``snapshot_download``;
            ``revision``/``token``/``cache_dir`` kwargs go there).
        task_class: the class to build (e.g. ``AutoModelForSequenceClassification``); default: the class in
            ``config.architectures``.
        kernels: ``None`` (default): the model as ``from_pretrained`` returns it. ``"auto"``: loaded on CPU in
            float32 and eval mode, then :func:`hf_px.inference.choose_kernels` runs CSR kernels in the sparse
            ``nn.Linear`` layers where that makes the model faster at ``batch_shape``, and leaves it dense
            otherwise; the decision is in ``model.hf_px_kernels`` (``.to_dict()`` for JSON). ``"dense"``: loaded
            the same way with no kernel changed (the baseline); ``model.hf_px_kernels`` lists the sparsities.
        batch_shape: ``(batch, tokens)`` to choose kernels for, with ``kernels="auto"`` (default ``(1, 128)``).
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``num_labels``...).

    Example:
        >>> model = load("out/")                                    # doctest: +SKIP
        >>> model = load("user/minilm-px90", revision="main")       # doctest: +SKIP
        >>> model = load("out/", kernels="auto", batch_shape=(1, 64))   # doctest: +SKIP
        >>> print(model.hf_px_kernels)                              # doctest: +SKIP
        kernels='auto' at batch 1x64, 1 thread: 30/38 linear layers CSR (36 timed); model 8.61 ms vs 14.2 ms ...
    """
    _check_kernel_args(kernels, batch_shape, from_pretrained_kwargs)
    if kernels is None:
        return _load(path_or_repo_id, task_class, from_pretrained_kwargs)
    from ..inference.choose import DEFAULT_BATCH_SHAPE, choose_kernels, dense_report

    kwargs = dict(from_pretrained_kwargs)
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = torch.float32  # not the checkpoint's dtype: the CSR kernels are float32 CPU kernels
    model = _load(path_or_repo_id, task_class, kwargs).eval()
    if kernels == "dense":
        dense_report(model)
    else:
        choose_kernels(model, batch_shape or DEFAULT_BATCH_SHAPE)
    return model


KERNELS = ("dense", "auto")


def _check_kernel_args(kernels: Any, batch_shape: Any, kwargs: dict) -> None:
    """Refuse, before loading anything, a ``kernels``/``batch_shape`` combination :func:`load` cannot honour."""
    from ..errors import ConfigError

    if kernels is not None and kernels not in KERNELS:
        raise ConfigError(f"kernels must be None, 'dense' or 'auto', got {kernels!r}; pass kernels='auto' to run "
                          "sparse kernels where they make the model faster.")
    if batch_shape is not None and kernels != "auto":
        raise ConfigError(f"batch_shape={batch_shape!r} is only used with kernels='auto'; pass kernels='auto' or "
                          "drop batch_shape.")
    if batch_shape is not None:
        from ..inference.choose import check_batch_shape

        check_batch_shape(batch_shape)
    if kernels is None:
        return
    for key in ("dtype", "torch_dtype"):
        if key in kwargs and kwargs[key] not in (torch.float32, "float32"):
            raise ConfigError(f"kernels={kernels!r} loads the model in float32 (the CSR kernels are float32 CPU "
                              f"kernels); drop {key}={kwargs[key]!r} or pass kernels=None.")
    device_map = kwargs.get("device_map")
    if device_map is not None and str(device_map) != "cpu":
        raise ConfigError(f"kernels={kernels!r} runs the model on CPU; drop device_map={device_map!r} or pass "
                          "kernels=None.")


def _load(path_or_repo_id: str | os.PathLike, task_class: Any, from_pretrained_kwargs: dict
          ) -> transformers.PreTrainedModel:
    kwargs = dict(from_pretrained_kwargs)
    folder = _local_folder(path_or_repo_id, kwargs)
    meta_path = folder / META_FILE
    info = _read_json(meta_path) if meta_path.exists() else {}
    fmt = info.get("format") or ("sparse" if (folder / SPARSE_FILE).exists() else "dense")
    if fmt not in FORMATS:
        raise ValueError(f"{meta_path} names an unknown format {fmt!r}; expected one of {FORMATS}.")

    from transformers import AutoConfig

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; it is not a saved checkpoint folder.")
    model_type = str(_read_json(folder / "config.json").get("model_type", ""))
    if model_type.startswith("pcn_"):
        import hf_px.pcn  # noqa: F401 - registers the pcn_* classes with the Auto* factories

    check_checkpoint_files(folder)  # a truncated shard or an escaping index fails here, in one line
    config_kwargs = {k: kwargs[k] for k in ("trust_remote_code",) if k in kwargs}
    config = AutoConfig.from_pretrained(folder, **config_kwargs)
    cls = task_class or _model_class(config)
    if fmt == "dense":
        return cls.from_pretrained(folder, **kwargs)
    weights = folder / SPARSE_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{folder} is marked sparse but has no {SPARSE_FILE}; the folder is incomplete.")
    if hasattr(cls, "_model_mapping"):  # an Auto class: from_pretrained(None, ...) needs the concrete one
        try:
            cls = cls._model_mapping[type(config)]
        except KeyError:
            raise ValueError(f"{cls.__name__} has no model class for model_type '{config.model_type}'.") from None
    # with an explicit config, from_pretrained hands leftover kwargs to __init__: apply config fields here
    for k in [k for k in kwargs if k not in _LOADING_KWARGS and hasattr(config, k)]:
        setattr(config, k, kwargs.pop(k))
    with torch.device("meta"):  # a skeleton of the config's shapes, allocating nothing
        skeleton = cls(copy.deepcopy(config))
    state = read_sparse_file(weights, listed_tensors(info, meta_path), Expected.from_model(skeleton))
    return cls.from_pretrained(None, config=config, state_dict=state, **kwargs)


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # also UnicodeDecodeError
        raise CheckpointFileError(f"{path} is not valid JSON ({str(err).splitlines()[0][:120]}); restore the file "
                                  "or re-save the checkpoint.") from None
    if not isinstance(data, dict):
        raise CheckpointFileError(f"{path} holds a JSON {type(data).__name__}, not an object; restore the file or "
                                  "re-save the checkpoint.")
    return data


def check_sparse_folder(folder: str | os.PathLike, skeleton: nn.Module) -> None:
    """Run :func:`load`'s checks of a sparse checkpoint against ``skeleton`` (a model on the meta device), reading
    no weights: every matrix ``hf_px.json`` lists is present and consistent, and its declared shape is the
    skeleton's, so a file claiming a 10^6 x 10^6 matrix is refused before anything is allocated.
    """
    folder = pathlib.Path(folder)
    meta_path = folder / META_FILE
    info = _read_json(meta_path) if meta_path.exists() else {}
    read_sparse_file(folder / SPARSE_FILE, listed_tensors(info, meta_path), Expected.from_model(skeleton),
                     check_only=True)
