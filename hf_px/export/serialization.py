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

Saving is defined here; :func:`load` in :mod:`hf_px.export.loading`, the atomic rename in
:mod:`hf_px.export.atomic_folder` and the file names in :mod:`hf_px.export.formats`. All of them are importable
from this module.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic_folder import atomic_dir
from .checkpoint_files import weight_files
from .formats import DENSE_FILE, FORMATS, META_FILE, SPARSE_FILE
from .loading import KERNELS, check_sparse_folder, load
from .sparse_format import LAYOUT_DOC, check_zeros_outside, dtype_name, sparse_state_dict

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

# saving and loading under one name: hf_px.export.serialization.load / .save_pretrained
__all__ = ["DENSE_FILE", "FORMATS", "KERNELS", "META_FILE", "SPARSE_FILE", "check_sparse_folder", "load",
           "save_pretrained"]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hf-px")
    except Exception:  # noqa: BLE001 - running from a source tree without an install
        return "unknown"


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
    with atomic_dir(target) as tmp:
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
