"""Stage folders: written in a temp folder, hashed into ``manifest.json`` last, then renamed into place.

A stage is complete only when its folder exists, its manifest's fingerprint matches the current inputs (config
section + upstream stages' content hashes) and every file still has the recorded size and sha256. Anything
else (a missing, stale or tampered folder) is redone; a crash mid-stage leaves only a ``.tmp`` folder, which the
next run removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


class Stage:
    """One stage's folder (``path``, directly under the run directory)."""

    def __init__(self, path: Path, name: str, fingerprint: str):
        self.path, self.name, self.fingerprint = Path(path), name, fingerprint
        self.root = self.path.parent

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> str:
        """``complete``, ``missing``, ``stale`` (other inputs) or ``corrupt`` (files differ from the manifest)."""
        man = self.manifest()
        if man is None:
            return "missing"
        if man.get("fingerprint") != self.fingerprint:
            return "stale"
        for rel, info in man.get("files", {}).items():
            p = self.path / rel
            if not p.is_file() or p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
                return "corrupt"
        return "complete"

    def content_hash(self) -> str:
        """Hash of the stage's files (not its timestamps): what downstream fingerprints depend on."""
        man = self.manifest() or {}
        return fingerprint({k: v["sha256"] for k, v in man.get("files", {}).items()}) + ":" + \
            fingerprint(man.get("summary", {}))

    def summary(self) -> dict[str, Any]:
        return (self.manifest() or {}).get("summary", {})

    @contextlib.contextmanager
    def writing(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yield (temp folder, summary dict); on success the manifest is written last and the folder renamed."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        summary: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            yield tmp, summary
            manifest = {"stage": self.name, "fingerprint": self.fingerprint, "files": _files(tmp),
                        "summary": summary, "elapsed_s": round(time.perf_counter() - start, 3),
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_json_atomic(tmp / MANIFEST, manifest)
            if self.path.exists():
                old = self.root / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.path, old)
                os.replace(tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def remove(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)


def clean_leftovers(root: Path) -> list[str]:
    """Remove temp folders a killed run left behind; returns their names."""
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file (no extra disk for large weights) or copy it when links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_tree(src: Path, dst: Path) -> None:
    for p in sorted(Path(src).rglob("*")):
        if p.is_file():
            link_or_copy(p, dst / p.relative_to(src))
