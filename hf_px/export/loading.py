"""Loading a checkpoint saved by :func:`~hf_px.export.serialization.save_pretrained`, dense or sparse, from a
folder or a Hub repo id.

A sparse file is checked whole against ``hf_px.json`` and the config before any dense matrix is allocated
(:mod:`hf_px.export.sparse_format`); ``kernels="auto"`` then runs CSR kernels where they make the model faster.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint_files import CheckpointFileError, check_checkpoint_files
from .formats import FORMATS, META_FILE, SPARSE_FILE
from .hub import REPO_ID
from .sparse_format import Expected, listed_tensors, read_sparse_file

if TYPE_CHECKING:
    import transformers

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
