"""hf_px's own training-checkpoint format: safetensors and JSON only, so reading a checkpoint never runs code.

Accelerate's ``save_state``/``load_state`` pickles the optimizer, schedulers and RNG states, and unpickling a
crafted file runs arbitrary code. A ``step_N`` folder written here holds:

* ``model.safetensors``: the unwrapped model's state dict (tied weights stored once, aliases in its metadata);
* ``optimizer.json`` + ``optimizer.safetensors``, ``scheduler.json``, ``scaler.json``: the objects' state dicts,
  tensors in safetensors, everything else (param groups, step counts, int keys, tuples) in tagged JSON;
* ``rng_rank{N}.json`` + ``rng_rank{N}.safetensors``: each process's python, numpy and torch RNG states;
* ``masks.safetensors``;
* ``training_state.json``, written last: the data position, the format tag and the size of every file above.

Old Accelerate checkpoints (pickles) are refused, with no opt-in: start a fresh run instead.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..export.checkpoint_files import read_header

FORMAT = "hf_px-checkpoint"
VERSION = 1
STATE_FILE = "training_state.json"
MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".pickle")


# ------------------------------------------------------------------------------------------ tagged JSON


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards are DTensors: gather the whole tensor (a collective, so every process encodes)
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data; tensors move to ``tensors`` and leave a reference (no pickle anywhere)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = _full(obj)
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors) for v in obj]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        # optimizer states are keyed by parameter index: JSON objects would turn those ints into strings
        return {"__items__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint without pickle.")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__tuple__" in data:
            return tuple(decode(v, tensors) for v in data["__tuple__"])
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in data["__items__"]}
    return data


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor)):
        raise ValueError(f"a checkpoint dictionary key must be a scalar, got {type(key).__name__}")
    return key


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class _Discard(dict):
    """A tensor sink that keeps nothing: whole optimizer states are only held by the process that writes them."""

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        pass


def write_object(folder: str, name: str, obj: Any, write: bool) -> None:
    """``name.json`` (+ ``name.safetensors`` when it holds tensors); ``write=False`` only takes part in gathers."""
    # a process that does not write still gathers FSDP2 shards with the others, but keeps none of them
    tensors: dict[str, torch.Tensor] = {} if write else _Discard()
    data = encode(obj, tensors)
    if not write:
        return
    if tensors:
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
    _write_json(os.path.join(folder, f"{name}.json"), data)


def read_object(folder: str, name: str) -> Any:
    tensor_path = os.path.join(folder, f"{name}.safetensors")
    tensors = load_file(tensor_path) if os.path.exists(tensor_path) else {}
    try:
        return decode(_read_json(os.path.join(folder, f"{name}.json")), tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder}/{name}.json is malformed ({err}); delete that checkpoint folder.") from None


# ------------------------------------------------------------------------------------------ model weights


def write_model(model: torch.nn.Module, path: str, write: bool) -> None:
    """The state dict as safetensors; a tensor shared by several names (tied embeddings) is stored once."""
    state = {}
    for name, t in model.state_dict().items():
        whole = _full(t)  # every process takes part in each FSDP2 gather; only the writer keeps the result
        if write:
            state[name] = whole
    if not write:
        return
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen:
            aliases[name] = seen[view]
            continue
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses overlapping storages: a partial view of a stored tensor gets its own copy
        kept[name] = t.clone() if ptr in storages and t.numel() else t
        seen[view] = name
        storages.add(ptr)
    save_file(kept, path, metadata={"aliases": json.dumps(aliases)})


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # FSDP2 holds DTensor shards; every process read the whole file, so each keeps its own slice (no collective)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    return value


def read_model(model: torch.nn.Module, path: str) -> None:
    from safetensors import safe_open

    state = load_file(path)
    with safe_open(path, framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        state[name] = state[target]
    targets = model.state_dict()
    model.load_state_dict({k: _like(v, targets[k]) if k in targets else v for k, v in state.items()})


def read_optimizer(optimizer: Any, folder: str) -> None:
    """The optimizer's state; parameters are matched by their index in ``optimizer.param_groups``."""
    state = read_object(folder, "optimizer")
    if not isinstance(state, dict) or not isinstance(state.get("state", {}), dict):
        raise ValueError(f"{folder}/optimizer.json is not an optimizer state; delete that checkpoint folder.")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state.get("state", {}).items():
        if isinstance(index, int) and 0 <= index < len(params):
            for key, v in values.items():
                if isinstance(v, torch.Tensor) and v.shape == params[index].shape:
                    values[key] = _like(v, params[index])
    optimizer.load_state_dict(state)


# ------------------------------------------------------------------------------------------ RNG states


def rng_name(rank: int) -> str:
    return f"rng_rank{rank}"


def write_rng(folder: str, rank: int) -> None:
    """This process's python, numpy and torch (CPU and CUDA) generator states."""
    version, internal, gauss = random.getstate()
    np_name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, os.path.join(folder, f"{rng_name(rank)}.safetensors"))
    _write_json(os.path.join(folder, f"{rng_name(rank)}.json"), {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    })


def read_rng(folder: str, rank: int) -> None:
    data = _read_json(os.path.join(folder, f"{rng_name(rank)}.json"))
    tensors = load_file(os.path.join(folder, f"{rng_name(rank)}.safetensors"))
    version, internal, gauss = data["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)))
    np_name, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((str(np_name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(int(data.get("cuda_devices", 0)))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------ masks


def write_masks(masks: dict[str, torch.Tensor], path: str) -> None:
    save_file({n: m.detach().cpu().contiguous() for n, m in masks.items()}, path)


def read_masks(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


# ------------------------------------------------------------------------------------------ completeness


def write_state(folder: str, state: dict[str, Any]) -> None:
    """``training_state.json`` with the size of every other file: written last, it marks the folder complete."""
    files = {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n != STATE_FILE}
    tmp = os.path.join(folder, f".{STATE_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:  # default=float: numpy scalars in the logged history
        json.dump({"format": FORMAT, "version": VERSION, **state, "files": files}, fh, default=float)
    os.replace(tmp, os.path.join(folder, STATE_FILE))


def read_state(folder: str) -> dict[str, Any]:
    return _read_json(os.path.join(folder, STATE_FILE))


def required_files(state: dict[str, Any]) -> list[str]:
    names = [MODEL_FILE, MASKS_FILE, "optimizer.json", "scheduler.json"]
    for rank in range(int(state.get("world_size", 1))):
        names += [f"{rng_name(rank)}.json", f"{rng_name(rank)}.safetensors"]
    return names


def problem(folder: str) -> str | None:
    """Why ``folder`` cannot be resumed from (None: usable). 'legacy' marks an old pickle-based checkpoint."""
    names = set(os.listdir(folder))
    try:
        state = read_state(folder) if STATE_FILE in names else None
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} does not parse ({err})"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        if any(n.endswith(PICKLE_SUFFIXES) for n in names):
            return "legacy"
        return f"no {STATE_FILE}" if state is None else f"{STATE_FILE} is not an hf_px checkpoint state"
    if state.get("version") != VERSION:
        return f"written by another hf_px version (checkpoint format {state.get('version')!r})"
    files = state.get("files")
    if not isinstance(files, dict):
        return f"{STATE_FILE} lists no files"
    for name in required_files(state):
        if name not in files:
            return f"{name} is missing"
    for name, size in files.items():
        path = os.path.join(folder, name)
        if os.path.basename(name) != name or name in (".", ".."):
            return f"{STATE_FILE} names a file outside the folder ({name!r})"
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
        try:
            if name.endswith(".safetensors"):
                read_header(Path(path))
            elif name.endswith(".json"):
                _read_json(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{name} is corrupt ({err})"
    return None
