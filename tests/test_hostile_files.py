"""Hostile and broken checkpoint files: each is refused before loading, with one line that names the file.

A sparse file that contradicts its own hf_px.json, a lying dense shape, a truncated safetensors file, an index
that points outside its folder, invalid JSON: none may come back as random weights, a raw library error, or an
out-of-memory crash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny

import hf_px.export.serialization as S
from hf_px.cli import main
from hf_px.export.checkpoint_files import INDEX_FILE, CheckpointFileError, TensorHeader
from hf_px.export.sparse_format import (
    Expected,
    Listed,
    SparseFormatError,
    check_layout,
    dense_state_dict,
    sparse_state_dict,
)
from hf_px.modeling import check_model_source
from hf_px.pruning.masks import apply_masks
from hf_px.pruning.targets import prunable_parameters

Q = "bert.encoder.layer.0.attention.self.query.weight"


def _prune(model: torch.nn.Module, density: float = 0.3) -> torch.nn.Module:
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        keep[torch.topk(p.detach().abs().flatten(), max(1, round(density * p.numel()))).indices] = True
        masks[name] = keep.view_as(p)
    apply_masks(model, masks)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    model = _prune(tiny("bert"))
    return {fmt: S.save_pretrained(model, root / fmt, format=fmt) for fmt in ("dense", "sparse")}


@pytest.fixture
def sparse(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved["sparse"], tmp_path / "sparse"))


@pytest.fixture
def dense(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved["dense"], tmp_path / "dense"))


def rewrite(folder: Path, edit) -> Path:
    """Apply ``edit`` to the sparse file's tensors (in place) and write them back."""
    path = folder / S.SPARSE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def edit_meta(folder: Path, edit) -> None:
    info = json.loads((folder / S.META_FILE).read_text())
    edit(info)
    (folder / S.META_FILE).write_text(json.dumps(info))


def refused(folder: Path, match: str, error: type[Exception] = SparseFormatError, **kwargs) -> str:
    with pytest.raises(error, match=match) as info:
        S.load(str(folder), **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------- sparse layout
def test_untouched_checkpoints_load_so_each_refusal_below_is_caused_by_its_change(sparse, dense):
    ref = S.load(str(dense)).state_dict()
    got = S.load(str(sparse)).state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    info = json.loads((sparse / S.META_FILE).read_text())
    assert info["masks"]["tensors"][Q]["dtype"] == "float32"


@pytest.mark.parametrize("parts", [(".px_values", ".px_bitmask", ".px_shape"), (".px_values",), (".px_bitmask",)])
def test_missing_matrix_or_part_is_refused(sparse, parts):
    rewrite(sparse, lambda t: [t.pop(Q + p) for p in parts])
    message = refused(sparse, "model.sparse.safetensors: .*" + Q.replace(".", r"\."))
    assert "re-save the checkpoint" in message
    if len(parts) == 1:
        assert Q + parts[0] in message
    else:
        assert "neither its values nor its bitmask" in message


def test_short_bitmask_is_refused_not_zero_padded(sparse):
    rewrite(sparse, lambda t: t.update({Q + ".px_bitmask": t[Q + ".px_bitmask"][:-1].clone()}))
    message = refused(sparse, r"px_bitmask' has 127 bytes but shape \[32, 32\] needs 128")
    assert str(sparse / S.SPARSE_FILE) in message


def test_int32_values_are_refused_not_converted(sparse):
    rewrite(sparse, lambda t: t.update({Q + ".px_values": t[Q + ".px_values"].to(torch.int32)}))
    refused(sparse, r"px_values' is I32 .*expected 1-D F32 values")


def test_values_of_a_non_float_dtype_are_refused_without_a_recorded_dtype(sparse):
    rewrite(sparse, lambda t: t.update({Q + ".px_values": t[Q + ".px_values"].to(torch.int32)}))
    edit_meta(sparse, lambda info: [e.pop("dtype") for e in info["masks"]["tensors"].values()])
    refused(sparse, r"px_values' is I32 .*expected 1-D floating-point values")


def test_float_bitmask_is_refused_with_a_clear_error(sparse):
    rewrite(sparse, lambda t: t.update({Q + ".px_bitmask": t[Q + ".px_bitmask"].float()}))
    refused(sparse, r"px_bitmask' is F32 \[128\], expected a 1-D uint8 bitmask")


def test_bit_count_must_match_the_stored_values(sparse):
    def flip(t):
        bits = t[Q + ".px_bitmask"].numpy().copy()
        off = np.flatnonzero(np.unpackbits(bits) == 0)[0]  # turn one more entry on: 1 bit more than values
        bits[off // 8] |= 0x80 >> (off % 8)
        t[Q + ".px_bitmask"] = torch.from_numpy(bits)

    rewrite(sparse, flip)
    refused(sparse, r"has \d+ bits set in its bitmask but \d+ stored values")


def test_kept_count_must_match_hf_px_json(sparse):
    edit_meta(sparse, lambda info: info["masks"]["tensors"][Q].update(kept=1))
    message = refused(sparse, "stores .* values but hf_px.json says 1 are kept")
    assert Q in message


def test_unexpected_extra_tensor_is_refused(sparse):
    def add(t):
        t.update({"rogue.weight" + k[len(Q):]: v.clone() for k, v in t.items() if k.startswith(Q + ".px_")})

    rewrite(sparse, add)
    refused(sparse, "'rogue.weight' is stored packed but hf_px.json does not list it")


def test_listed_matrix_stored_dense_is_refused(sparse):
    def unpack(t):
        dense = dense_state_dict({k: v for k, v in t.items() if k.startswith(Q)})
        [t.pop(Q + p) for p in (".px_values", ".px_bitmask", ".px_shape")]
        t[Q] = dense[Q]

    rewrite(sparse, unpack)
    refused(sparse, "is listed as packed in hf_px.json but stored dense")


def test_shape_contradicting_hf_px_json_is_refused(sparse):
    rewrite(sparse, lambda t: t.update({Q + ".px_shape": torch.tensor([16, 64])}))
    refused(sparse, r"declares shape \[16, 64\] but hf_px.json lists \[32, 32\]")


def test_shape_contradicting_the_config_is_refused(sparse):
    rewrite(sparse, lambda t: t.update({Q + ".px_shape": torch.tensor([16, 64])}))
    edit_meta(sparse, lambda info: info["masks"]["tensors"][Q].update(shape=[16, 64]))
    refused(sparse, r"declares shape \[16, 64\] but the model's config.json implies \[32, 32\]")


@pytest.mark.parametrize("text, match", [('{"format": "sparse", ', "is not valid JSON"),
                                         ("[1, 2]", "holds a JSON list, not an object")])
def test_hf_px_json_that_is_not_a_json_object(sparse, text, match):
    (sparse / S.META_FILE).write_text(text)
    message = refused(sparse, match, CheckpointFileError)
    assert str(sparse / S.META_FILE) in message


def test_in_memory_unpack_checks_the_layout_too():
    w = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    packed = sparse_state_dict({"w": w}, {"w": w != 0})
    assert torch.equal(dense_state_dict(packed)["w"], w)
    with pytest.raises(SparseFormatError, match="'w.px_bitmask' has 0 bytes"):
        dense_state_dict({**packed, "w.px_bitmask": packed["w.px_bitmask"][:0]})
    with pytest.raises(SparseFormatError, match="padding of its last byte"):
        dense_state_dict({**packed, "w.px_values": torch.ones(4),
                          "w.px_bitmask": packed["w.px_bitmask"] | 0x01})
    with pytest.raises(SparseFormatError, match="'w' has w.px_bitmask, w.px_shape but not w.px_values"):
        dense_state_dict({k: v for k, v in packed.items() if k != "w.px_values"})


def test_a_matrix_saved_under_another_name_is_not_missing():
    spec = {"a.px_values": TensorHeader("F32", (1,)), "a.px_bitmask": TensorHeader("U8", (1,)),
            "a.px_shape": TensorHeader("I64", (1,))}
    tensors = {"a.px_values": torch.ones(1), "a.px_bitmask": torch.tensor([0x80], dtype=torch.uint8),
               "a.px_shape": torch.tensor([2])}
    listed = {n: Listed((2,), 1, "F32") for n in ("a", "b")}
    shapes = {"a": (2,), "b": (2,), "c": (2,)}
    tied = Expected(shapes, tied={"a": frozenset("ab"), "b": frozenset("ab")})
    assert check_layout(spec, "f", tensors.__getitem__, listed, tied) == {"a": (2,)}
    with pytest.raises(SparseFormatError, match="'b' is listed in hf_px.json but neither"):
        check_layout(spec, "f", tensors.__getitem__, listed, Expected(shapes))
    # save_pretrained marks what transformers stored under another name; its absence is then expected
    listed["b"] = Listed((2,), 1, "F32", packed=False)
    assert check_layout(spec, "f", tensors.__getitem__, listed, Expected(shapes)) == {"a": (2,)}


# ---------------------------------------------------------------------------------------------- lying sizes
_HUGE_CHILD = textwrap.dedent("""
    import re, resource, sys
    import hf_px.export.serialization as S
    from hf_px.export.sparse_format import SparseFormatError
    S.load(sys.argv[1])  # warm up: imports and allocator pools count against the limit set below
    vm = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    for folder in sys.argv[2:]:
        try:
            S.load(folder)
        except SparseFormatError as err:
            print(err)
        else:
            sys.exit(f"{folder} loaded")
""")


def _lie(folder: Path, name: str, shape: list[int]) -> None:
    """Store ``name`` as a 4 MB bitmask + values that claim ``shape``, and list it so in hf_px.json."""
    bits = np.zeros(4 << 20, dtype=np.uint8)
    bits[::4096] = 0xFF
    kept = int(np.unpackbits(bits).sum())
    rewrite(folder, lambda t: t.update({name + ".px_values": torch.ones(kept), name + ".px_shape": torch.tensor(shape),
                                        name + ".px_bitmask": torch.from_numpy(bits)}))
    edit_meta(folder, lambda info: info["masks"]["tensors"].update({name: {"shape": shape, "kept": kept,
                                                                           "dtype": "float32"}}))


@pytest.mark.slow  # a child process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_a_small_file_claiming_a_huge_matrix_is_refused_before_allocating(saved, tmp_path):
    lie_known = Path(shutil.copytree(saved["sparse"], tmp_path / "known"))
    _lie(lie_known, Q, [60_000, 60_000])  # a real parameter: the config says 32 x 32
    lie_unknown = Path(shutil.copytree(saved["sparse"], tmp_path / "unknown"))
    _lie(lie_unknown, "bert.encoder.extra.weight", [10**6, 10**6])  # no such parameter: the bitmask gives it away
    assert (lie_known / S.SPARSE_FILE).stat().st_size < 5 << 20
    # the old loader allocated the dense 14 GB / 4 TB matrix: under a 1 GB headroom it dies instead of refusing
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _HUGE_CHILD, str(saved["sparse"]), str(lie_known), str(lie_unknown)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    known, unknown = proc.stdout.strip().splitlines()
    assert f"{lie_known / S.SPARSE_FILE}: '{Q}' declares shape [60000, 60000]" in known
    assert "config.json implies [32, 32]" in known
    assert f"{lie_unknown / S.SPARSE_FILE}: 'bert.encoder.extra.weight.px_bitmask' has 4194304 bytes" in unknown
    assert "needs 125000000000" in unknown


# ---------------------------------------------------------------------------------------------- truncation
def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@pytest.mark.parametrize("keep, why", [(-100, "the file was cut short"), (20, "the header claims"),
                                       (5, "too short for the 8-byte header length")])
def test_truncated_file_is_one_line_naming_it(saved, tmp_path, fmt, keep, why):
    folder = Path(shutil.copytree(saved[fmt], tmp_path / fmt))
    weights = folder / (S.SPARSE_FILE if fmt == "sparse" else S.DENSE_FILE)
    _cut(weights, keep if keep > 0 else weights.stat().st_size + keep)
    match = f"{re.escape(str(weights))} is corrupt or truncated .*{why}.*re-download or re-save the checkpoint"
    refused(folder, match, CheckpointFileError)
    with pytest.raises(CheckpointFileError, match=match):
        check_model_source(str(folder))


def test_stray_bytes_after_the_data_are_refused(dense):
    with open(dense / S.DENSE_FILE, "ab") as fh:
        fh.write(b"\0" * 16)
    refused(dense, "16 stray bytes follow the last tensor", CheckpointFileError)


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_cli_exits_2_with_one_line_for_a_truncated_model(dense, tmp_path, capsys, command):
    _cut(dense / S.DENSE_FILE, 1000)
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"sentence {i},{i % 2}\n" for i in range(8)))
    code = main([command, "--model", str(dense), "--dataset", str(data), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"hf-px {command}: error: {dense / S.DENSE_FILE} is corrupt or truncated"), err
    assert "\n" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- index paths
def _shard(dense: Path, name: str) -> None:
    keys = list(load_file(dense / S.DENSE_FILE))
    (dense / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, name)}))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_shard_outside_the_folder_is_refused(dense, tmp_path, where):
    outside = tmp_path / "elsewhere.safetensors"
    name = "../elsewhere.safetensors" if where == "parent" else str(outside)
    _shard(dense, name)
    shutil.move(dense / S.DENSE_FILE, outside)
    for call in (lambda: check_model_source(str(dense)), lambda: S.load(str(dense))):
        with pytest.raises(CheckpointFileError, match="a path outside") as info:
            call()
        assert str(dense / INDEX_FILE) in str(info.value) and repr(name) in str(info.value)


def test_index_shard_linking_outside_the_folder_is_refused(dense, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    _shard(dense, "shard.safetensors")
    shutil.move(dense / S.DENSE_FILE, outside)
    (dense / "shard.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointFileError, match=re.escape(f"links to {outside}, outside {dense}")):
        check_model_source(str(dense))
    (dense / INDEX_FILE).unlink()  # no index: the linked file is still what would be loaded
    with pytest.raises(CheckpointFileError, match="links to"):
        S.load(str(dense))


def test_hub_cache_links_into_blobs_are_allowed(saved, tmp_path):
    """huggingface_hub's own layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    snap = tmp_path / "models--x--y" / "snapshots" / "abc"
    blobs = tmp_path / "models--x--y" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in saved["dense"].iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    check_model_source(str(snap))
    assert S.load(str(snap)).config.num_labels == 3


def test_index_that_is_not_json_is_one_line(dense):
    (dense / INDEX_FILE).write_text('{"weight_map": {')
    with pytest.raises(CheckpointFileError, match=re.escape(f"{dense / INDEX_FILE} is not valid JSON")) as info:
        check_model_source(str(dense))
    assert "\n" not in str(info.value)
    (dense / INDEX_FILE).write_text('{"weight_map": ["model.safetensors"]}')
    with pytest.raises(CheckpointFileError, match="has no weight_map of tensor name -> shard file"):
        check_model_source(str(dense))


def test_index_naming_a_missing_shard(dense):
    _shard(dense, "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointFileError, match="names shard 'model-00002-of-00002.safetensors', which is not in"):
        S.load(str(dense))


# ---------------------------------------------------------------------------------------------- hf-px run --check
def _check_model(model: Path, tmp_path: Path) -> str | None:
    """The model stage of ``hf-px run --check``: its one-line refusal, or None when it passes."""
    from hf_px.pipeline import ConfigError, RunConfig
    from hf_px.pipeline.checks import check_model

    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"sentence {i},{i % 2}\n" for i in range(8)))
    cfg = {"model": {"name_or_path": str(model)}, "data": {"dataset": str(data)},
           "output": {"output_dir": str(tmp_path / "out")}}
    try:
        check_model(RunConfig.from_dict(cfg))
    except ConfigError as err:
        assert "\n" not in str(err)
        return str(err)
    return None


def test_run_check_refuses_an_escaping_index(dense, tmp_path):
    assert _check_model(dense, tmp_path) is None
    _shard(dense, "../../etc/passwd.safetensors")
    assert "'../../etc/passwd.safetensors', a path outside" in _check_model(dense, tmp_path)


def test_run_check_refuses_a_sparse_file_that_contradicts_its_layout(sparse, tmp_path):
    assert _check_model(sparse, tmp_path) is None
    rewrite(sparse, lambda t: t.pop(Q + ".px_values"))
    assert f"'{Q}' has {Q}.px_bitmask, {Q}.px_shape but not {Q}.px_values" in _check_model(sparse, tmp_path)
