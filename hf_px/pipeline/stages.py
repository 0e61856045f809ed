"""Stage folders: written in a temp folder, hashed into ``manifest.json`` last, then renamed into place.

A stage is complete only when its folder exists, its manifest's fingerprint matches the current inputs (config
section + upstream stages' content hashes) and every file still has the recorded size and sha256. Anything
else (a missing, stale or tampered folder) is redone; a crash mid-stage leaves only a ``.tmp`` folder, which the
next run removes.

Stages share files instead of copying them: a file a stage writes whose bytes equal a file of an earlier complete
stage of the run becomes a hard link to it (weights the save stage re-writes unchanged, tokenizers, masks), so a
run folder holds each distinct file once. A linked file is never edited in place: every writer here creates a new
file (a temp name renamed over the old entry), which leaves the other links' content as it was.
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
    def writing(self, share_with: list[Stage] | tuple[Stage, ...] = ()) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yield (temp folder, summary dict); on success the manifest is written last and the folder renamed.

        Files equal to one of ``share_with``'s (complete stages of this run) become hard links to it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        summary: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            yield tmp, summary
            files = _files(tmp)
            share_files(tmp, files, share_with)
            manifest = {"stage": self.name, "fingerprint": self.fingerprint, "files": files,
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


def share_files(folder: Path, files: dict[str, dict[str, Any]], stages: list[Stage] | tuple[Stage, ...]) -> int:
    """Replace every file of ``folder`` (``files``: its manifest entries) that has the same size and sha256 as a
    file of one of ``stages`` by a hard link to that file; returns the bytes saved.

    The other stage's file is hashed again before it is linked: a file edited after its manifest was written must
    not leak into this stage. Where linking fails (another filesystem, no link support) the copy stays.
    """
    known: dict[tuple[int, str], Path] = {}
    for stage in stages:
        for rel, info in ((stage.manifest() or {}).get("files") or {}).items():
            known.setdefault((info["size"], info["sha256"]), stage.path / rel)
    saved = 0
    for rel, info in files.items():
        other = known.get((info["size"], info["sha256"]))
        if other is None or info["size"] == 0:
            continue
        mine = folder / rel
        try:
            if os.path.samefile(mine, other):
                continue
            if other.stat().st_size != info["size"] or sha256_file(other) != info["sha256"]:
                continue
        except OSError:
            continue
        if _link_over(other, mine):
            saved += info["size"]
    return saved


def _link_over(src: Path, dst: Path) -> bool:
    """Make ``dst`` a hard link to ``src`` by renaming a new link over it (``dst``'s old inode is left as it was)."""
    tmp = dst.parent / f".{dst.name}.link-{uuid.uuid4().hex[:8]}"
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path, link: bool = True) -> None:
    """``dst`` becomes a hard link to ``src`` (no extra disk for large weights), or a copy when linking fails or
    ``link`` is False.

    An existing ``dst`` is replaced by renaming over it, never written into: it may itself be a link whose other
    names must keep their content.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link and _link_over(src, dst):
        return
    tmp = dst.parent / f".{dst.name}.copy-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def copy_tree(src: Path, dst: Path, link: bool = True) -> None:
    """Every file under ``src`` linked (``link=True``, when possible) or copied to the same place under ``dst``.

    Copy (``link=False``) from folders someone else may later rewrite in place, such as a user's fine-tuning
    folder: a link would carry that edit into the run folder.
    """
    for p in sorted(Path(src).rglob("*")):
        if p.is_file():
            link_or_copy(p, dst / p.relative_to(src), link=link)


def write_new(path: Path, text: str) -> None:
    """Write ``text`` to a new file renamed over ``path``: never into a file that may be a hard link."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def disk_bytes(root: Path) -> int:
    """Bytes of the files under ``root``, each hard-linked file counted once (what the folder costs on disk)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
