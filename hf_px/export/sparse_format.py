"""The ``sparse`` checkpoint layout: packing, unpacking, and validating a file against its ``hf_px.json``.

Every masked matrix ``K`` is stored as three tensors:

- ``K.px_values``: the kept entries, 1-D, in the original dtype, in row-major (C) order;
- ``K.px_bitmask``: the mask, flattened row-major and packed 8 per byte with ``numpy.packbits``
  (``bitorder="big"``: element 0 is the most significant bit of byte 0; the last byte is zero-padded);
- ``K.px_shape``: the original shape (int64).

Every other tensor is stored as it is. A file is checked whole before any dense matrix is allocated, from the
safetensors header alone (names, dtypes, shapes), then the bit counts: a file that contradicts its own
``hf_px.json`` or the model's config is refused with one :class:`SparseFormatError` line, never loaded with
random or zero-padded weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint_files import CheckpointFileError, TensorHeader, read_header

VALUES, BITMASK, SHAPE = ".px_values", ".px_bitmask", ".px_shape"
_PARTS = (VALUES, BITMASK, SHAPE)
BIT_ORDER = "big"
LAYOUT_DOC = (
    "per masked matrix K: K.px_values = kept entries (1-D, original dtype, row-major order); "
    "K.px_bitmask = row-major mask packed with numpy.packbits(bitorder='big'), uint8, last byte zero-padded; "
    "K.px_shape = original shape (int64). Every other tensor is stored unchanged."
)
FIX = "re-save the checkpoint with hf_px.save_pretrained(model, folder, format='sparse')"
_MAX_RANK = 8
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.uint8: "U8", torch.int8: "I8",
              torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
_FLOATS = {"F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2"}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class SparseFormatError(CheckpointFileError):
    """A sparse checkpoint whose tensors contradict its ``hf_px.json``, its config, or the layout itself."""


def dtype_name(dtype: torch.dtype) -> str:
    """The name ``hf_px.json`` records for a dtype ("float32")."""
    return str(dtype).removeprefix("torch.")


def _st_dtype(name: str) -> str | None:
    dtype = getattr(torch, name, None)
    return _ST_DTYPES.get(dtype) if isinstance(dtype, torch.dtype) else None


# ---------------------------------------------------------------------------------------------- what to expect
@dataclass(frozen=True)
class Listed:
    """One packed matrix as ``hf_px.json`` lists it (``masks.tensors``)."""

    shape: tuple[int, ...]
    kept: int
    dtype: str | None  # safetensors spelling; None in files written before dtypes were recorded
    packed: bool = True  # False: transformers saved it under another name (renamed or tied), dense


def listed_tensors(info: Mapping[str, Any], meta_path: Path) -> dict[str, Listed] | None:
    """``hf_px.json``'s list of packed matrices; None when it lists none (a hand-made folder)."""
    masks = info.get("masks")
    if masks is None:
        return None
    tensors = masks.get("tensors") if isinstance(masks, dict) else None
    if not isinstance(tensors, dict):
        raise SparseFormatError(f"{meta_path}: 'masks.tensors' is missing or not an object; {FIX}.")
    out = {}
    for name, entry in tensors.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        kept = entry.get("kept") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(kept, int) and 0 <= kept <= math.prod(shape)
                and (dtype is None or _st_dtype(str(dtype)) is not None)):
            raise SparseFormatError(f"{meta_path}: the entry for '{name}' in masks.tensors is malformed; {FIX}.")
        out[name] = Listed(tuple(shape), kept, _st_dtype(dtype) if dtype else None, entry.get("packed") is not False)
    return out


@dataclass
class Expected:
    """Parameter shapes a model built from the checkpoint's config has (names as in its state dict)."""

    shapes: dict[str, tuple[int, ...]]
    prefix: str = ""  # base_model_prefix: a checkpoint saved with or without the task head's wrapper still maps
    tied: dict[str, frozenset[str]] = field(default_factory=dict)  # parameter -> every name sharing it

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> Expected:
        """From a model skeleton (build it on the ``meta`` device: nothing is allocated)."""
        groups: dict[int, set[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), set()).add(name)
        tied = {n: frozenset(g) for g in groups.values() if len(g) > 1 for n in g}
        shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        return cls(shapes, getattr(model, "base_model_prefix", "") or "", tied)

    def resolve(self, name: str) -> str | None:
        if name in self.shapes:
            return name
        p = self.prefix + "."
        if self.prefix and p + name in self.shapes:
            return p + name
        if self.prefix and name.startswith(p) and name[len(p):] in self.shapes:
            return name[len(p):]
        return None


# ---------------------------------------------------------------------------------------------- validation
def _popcount(bits: np.ndarray) -> int:
    return int(_POPCOUNT[bits].sum(dtype=np.int64))


def check_layout(
    specs: Mapping[str, TensorHeader],
    source: str,
    read: Callable[[str], torch.Tensor],
    listed: Mapping[str, Listed] | None = None,
    expected: Expected | None = None,
) -> dict[str, tuple[int, ...]]:
    """Check a whole sparse state (``specs``: its tensors' dtypes and shapes) and return each matrix's dense shape.

    Headers first, for every matrix; only then are the small tensors read (``read``): the int64 shapes, and the
    bitmasks to count their bits. Each bitmask's length is pinned to its declared shape and the shape to the
    config's, so the work and memory here stay bounded by the file's size whatever it claims.
    """
    def fail(name: str, why: str) -> SparseFormatError:
        return SparseFormatError(f"{source}: '{name}' {why}; the file contradicts its own layout: {FIX}.")

    packed: dict[str, dict[str, str]] = {}
    plain = set()
    for key in specs:
        part = next((p for p in _PARTS if key.endswith(p)), None)
        if part is None:
            plain.add(key)
        else:
            packed.setdefault(key[: -len(part)], {})[part] = key
    for name, parts in packed.items():
        missing = [name + p for p in _PARTS if p not in parts]
        if missing:
            raise fail(name, f"has {', '.join(sorted(parts.values()))} but not {', '.join(missing)}")
        if listed is not None and name not in listed:
            raise fail(name, "is stored packed but hf_px.json does not list it (an unexpected extra tensor)")
    if listed is not None:
        present = {expected.resolve(n) if expected else n for n in (*packed, *plain)}
        for name, entry in listed.items():
            if name in packed or not entry.packed:
                continue
            if name in plain:
                raise fail(name, "is listed as packed in hf_px.json but stored dense")
            own = expected.resolve(name) if expected else None
            if not (own and (expected.tied.get(own, frozenset()) - {own}) & present):  # tied: saved once, elsewhere
                raise fail(name, "is listed in hf_px.json but neither its values nor its bitmask are in the file")

    for name in sorted(packed):
        values, bits, shape = (specs[name + p] for p in _PARTS)
        want = listed[name].dtype if listed is not None else None
        if bits.dtype != "U8" or len(bits.shape) != 1:
            raise fail(name + BITMASK, f"is {bits.dtype} {list(bits.shape)}, expected a 1-D uint8 bitmask")
        if shape.dtype != "I64" or len(shape.shape) != 1 or shape.numel > _MAX_RANK:
            raise fail(name + SHAPE, f"is {shape.dtype} {list(shape.shape)}, expected at most {_MAX_RANK} int64 dims")
        if len(values.shape) != 1 or (values.dtype != want if want else values.dtype not in _FLOATS):
            raise fail(name + VALUES, f"is {values.dtype} {list(values.shape)}, expected 1-D "
                                      f"{want or 'floating-point'} values")
        if listed is not None and values.numel != listed[name].kept:
            raise fail(name, f"stores {values.numel} values but hf_px.json says {listed[name].kept} are kept")

    dense: dict[str, tuple[int, ...]] = {}
    for name in sorted(packed):
        dims = tuple(int(d) for d in read(name + SHAPE).tolist())
        if any(d < 0 for d in dims):
            raise fail(name + SHAPE, f"declares a negative dimension {list(dims)}")
        if listed is not None and dims != listed[name].shape:
            raise fail(name, f"declares shape {list(dims)} but hf_px.json lists {list(listed[name].shape)}")
        own = expected.resolve(name) if expected else None
        if own is not None and dims != expected.shapes[own]:
            raise fail(name, f"declares shape {list(dims)} but the model's config.json implies "
                             f"{list(expected.shapes[own])}")
        if specs[name + BITMASK].numel != math.ceil(math.prod(dims) / 8):
            raise fail(name + BITMASK, f"has {specs[name + BITMASK].numel} bytes but shape {list(dims)} needs "
                                       f"{math.ceil(math.prod(dims) / 8)}")
        dense[name] = dims

    for name, dims in dense.items():
        bits = read(name + BITMASK).numpy()
        kept, numel = _popcount(bits), math.prod(dims)
        if kept != specs[name + VALUES].numel:
            raise fail(name, f"has {kept} bits set in its bitmask but {specs[name + VALUES].numel} stored values")
        if numel % 8 and bits[-1] & (0xFF >> (numel % 8)):
            raise fail(name + BITMASK, "has bits set in the padding of its last byte")
    return dense


# ---------------------------------------------------------------------------------------------- pack/unpack
def _numpy(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor, or None for dtypes numpy lacks (bfloat16, float8).

    Boolean indexing and reductions run several times faster in numpy than in torch on CPU.
    """
    try:
        return t.detach().cpu().numpy()
    except TypeError:
        return None


def check_zeros_outside(key: str, tensor: torch.Tensor, mask: torch.Tensor) -> None:
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
            "zero them first with hf_px.pruning.masks.apply_masks(model, masks)."
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
        check_zeros_outside(key, tensor, mask)
        flat = tensor.detach().reshape(-1).cpu()
        keep = mask.detach().reshape(-1).cpu().bool().numpy()
        values = _numpy(flat)
        out[key + VALUES] = torch.from_numpy(values[keep]) if values is not None else flat[torch.from_numpy(keep)]
        out[key + BITMASK] = torch.from_numpy(np.packbits(keep, bitorder=BIT_ORDER))
        out[key + SHAPE] = torch.tensor(list(tensor.shape), dtype=torch.int64)
    return out


def _unpack(values: torch.Tensor, bits: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    keep = np.unpackbits(bits, count=numel, bitorder=BIT_ORDER).astype(bool)
    array = _numpy(values)
    if array is not None:
        full = np.zeros(numel, dtype=array.dtype)
        full[keep] = array
        return torch.from_numpy(full).view(shape)
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[torch.from_numpy(keep)] = values
    return dense.view(shape)


def _rebuild(keys: list[str], dense: dict[str, tuple[int, ...]], read: Callable[[str], torch.Tensor],
             ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if not key.endswith(_PARTS):
            out[key] = read(key)
        elif key.endswith(VALUES):
            name = key[: -len(VALUES)]
            out[name] = _unpack(read(key), read(name + BITMASK).numpy(), dense[name])
    return out


def dense_state_dict(sparse: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`sparse_state_dict`: rebuild full tensors with zeros where the mask is off.

    Raises :class:`SparseFormatError` when the packed tensors contradict each other (a part missing, a bitmask
    of the wrong length or dtype, a bit count that differs from the number of values).
    """
    specs = {k: TensorHeader(_ST_DTYPES.get(t.dtype, dtype_name(t.dtype)), tuple(t.shape)) for k, t in sparse.items()}
    dense = check_layout(specs, "sparse state dict", sparse.__getitem__)
    return _rebuild(list(sparse), dense, sparse.__getitem__)


def read_sparse_file(path: Path, listed: Mapping[str, Listed] | None, expected: Expected | None,
                     check_only: bool = False) -> dict[str, torch.Tensor]:
    """The dense state dict stored in a sparse checkpoint file, once :func:`check_layout` has passed on it.

    ``check_only``: stop after the checks and return ``{}`` (what ``hf-px run --check`` needs).
    """
    from safetensors import SafetensorError, safe_open

    specs = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            dense = check_layout(specs, str(path), fh.get_tensor, listed, expected)
            return {} if check_only else _rebuild(list(specs), dense, fh.get_tensor)
    except SafetensorError as err:  # what read_header cannot see, e.g. a dtype this safetensors lacks
        raise SparseFormatError(f"{path} cannot be read ({str(err).splitlines()[0][:120]}); {FIX}.") from err
