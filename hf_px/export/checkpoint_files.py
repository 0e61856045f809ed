"""Header-only integrity checks on a checkpoint folder's weight files, run before anything is loaded.

A truncated download or a hand-edited index would otherwise surface as a raw safetensors or JSON error deep in
``from_pretrained``, or make the loader read a file outside the folder. Only the 8-byte length and the JSON
header of each ``*.safetensors`` file are read, so the checks cost milliseconds even for large checkpoints.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import HfPxError

INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses larger headers too, so nothing valid is rejected
# bytes per element; dtypes missing here (sub-byte floats) skip the size check but keep the offset checks
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8}


class CheckpointFileError(HfPxError, ValueError):
    """A checkpoint file that is truncated, corrupt, or names a path outside its folder."""


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header declares it."""

    dtype: str  # safetensors' spelling: "F32", "U8", "I64"...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, why: str) -> CheckpointFileError:
    return CheckpointFileError(f"{path} is corrupt or truncated ({why}); re-download or re-save the checkpoint.")


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: Path) -> dict[str, TensorHeader]:
    """The tensors a safetensors file declares, after checking that its data exactly fills the rest of the file.

    Raises :class:`CheckpointFileError` (one line, naming the file) for a short file, a header that is not JSON,
    malformed entries, overlapping or gapped data, and data cut short or followed by stray bytes.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes, too short for the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise _corrupt(path, f"the header claims {length} bytes but the file has {size}")
            raw = fh.read(length)
    except OSError as err:
        raise CheckpointFileError(f"{path} cannot be read ({err.strerror or err}); check the file and its "
                                  "permissions, or re-download the checkpoint.") from err
    try:
        header = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        raise _corrupt(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    tensors: dict[str, TensorHeader] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(_is_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _corrupt(path, f"tensor {name!r} has a malformed header entry")
        itemsize = DTYPE_SIZES.get(dtype)
        if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise _corrupt(path, f"tensor {name!r} has {offsets[1] - offsets[0]} data bytes but its header "
                                 f"declares {dtype} {shape}")
        tensors[name] = TensorHeader(dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise _corrupt(path, f"tensor {name!r} overlaps another or leaves a gap")
        end = stop
    data = size - 8 - length
    if end > data:
        raise _corrupt(path, f"the header needs {end} data bytes but only {data} follow it: the file was cut short")
    if end < data:
        raise _corrupt(path, f"{data - end} stray bytes follow the last tensor")
    return tensors


def _roots(folder: Path) -> list[Path]:
    root = folder.resolve()
    # huggingface_hub's cache links snapshots/<rev>/<file> to ../../blobs/<hash>: still inside the repo's cache
    return [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]


def inside(folder: Path, name: str, named_by: Path) -> Path:
    """``folder / name``, refused when the name (absolute, ``..``, or a link) leads outside ``folder``."""
    rel = Path(name)
    if name == "" or rel.is_absolute() or ".." in rel.parts:
        raise CheckpointFileError(f"{named_by} names {name!r}, a path outside {folder}; every file a checkpoint "
                                  "names must sit inside its folder: fix the entry or re-save the checkpoint.")
    path = folder / rel
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as err:  # a link loop
        raise CheckpointFileError(f"{path} cannot be resolved ({err}); replace the link with the file.") from None
    if not any(target.is_relative_to(r) for r in _roots(folder)):
        raise CheckpointFileError(f"{path} links to {target}, outside {folder}; every file a checkpoint loads must "
                                  "sit inside its folder: copy the file in instead of linking it.")
    return path


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a checkpoint loads: the index's shards, else every ``*.safetensors`` in the folder."""
    index = folder / INDEX_FILE
    if not index.exists():
        return [inside(folder, p.name, p) for p in sorted(folder.glob("*.safetensors"))]
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        why = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise CheckpointFileError(f"{index} is not valid JSON ({why}); re-download or re-save the checkpoint.") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFileError(f"{index} has no weight_map of tensor name -> shard file; re-download or re-save "
                                  "the checkpoint.")
    shards = [inside(folder, s, index) for s in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointFileError(f"{index} names shard {shard.name!r}, which is not in {folder}; the download "
                                      "is incomplete: re-download the checkpoint.")
    return shards


def check_checkpoint_files(folder: str | Path) -> dict[Path, dict[str, TensorHeader]]:
    """Every weight file of ``folder`` with its header, after the containment and truncation checks above."""
    folder = Path(folder)
    return {f: read_header(f) for f in weight_files(folder)}
