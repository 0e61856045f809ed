"""The one output-folder rule of every ``hf-px`` command (all run :func:`hf_px.run`), checked before any work.

hf_px replaces or deletes only what it wrote itself: an output folder must be new, empty, or recognisably an
hf_px output of the same kind (a marker file), and it may never be, or contain, the input, the file-system
root, the home folder or the current folder, whatever the config says. ``folder_lock`` keeps two runs out of one
folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import HfPxError

LOCK_FILE = ".lock"
PRUNE_MARKER = "hf_px.json"  # written by hf_px.save_pretrained
RUN_MARKER = "run.json"  # written by hf_px.run before its first stage
FINETUNE_MARKERS = ("results.json", "checkpoints")  # written by hf_px.finetune into its output_dir
KINDS = ("prune", "finetune", "run")


class OutputFolderError(HfPxError, ValueError):
    """An output folder hf_px must not write to; the message is one line that names the fix."""


class UnwritableFolderError(HfPxError, PermissionError):
    """An output folder this process cannot create or write."""


class FolderLockedError(HfPxError, RuntimeError):
    """Another process holds the folder's lock."""


def unwritable_reason(folder: Path) -> str | None:
    """Why ``folder`` (existing or still to be created) cannot be written, or ``None`` when it can.

    The nearest existing parent gets a real write: ``os.access`` says yes to root even on a read-only mount.

    Example:
        >>> unwritable_reason(Path(tempfile.gettempdir()) / "new-run") is None
        True
    """
    probe_dir = Path(folder).expanduser().absolute()
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{probe_dir} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".hf-px-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{err.strerror or err} in {probe_dir}"
    return None


def local_inputs(*candidates: str | os.PathLike | None) -> list[Path]:
    """The candidates that name existing local files or folders (Hub ids and ``None`` drop out)."""
    out = []
    for c in candidates:
        if c is None or str(c).startswith("builtin:"):
            continue
        p = Path(c).expanduser()
        if p.exists():
            out.append(p.resolve())
    return out


def _is_or_contains(out: Path, other: Path) -> bool:
    return out == other or out in other.parents


def protected_reason(out: Path, inputs: Iterable[Path] = ()) -> str | None:
    """Why writing to ``out`` could destroy something that is not hf_px's, whatever the config says; ``None`` if safe."""
    real = Path(out).expanduser().resolve()
    if real.parent == real:
        return "is the file-system root"
    for p in inputs:
        if _is_or_contains(real, Path(p).resolve()):
            return f"is or contains the input {p}, which replacing the folder would delete"
    home = Path.home().resolve()
    if _is_or_contains(real, home):
        return f"is or contains your home folder {home}"
    cwd = Path.cwd().resolve()
    if _is_or_contains(real, cwd):
        return f"is or contains the current folder {cwd}"
    return None


def _entries(folder: Path) -> list[str]:
    # a lock file left by a killed run holds nothing of anyone's
    return [p.name for p in folder.iterdir() if p.name != LOCK_FILE]


def holds_finetune_run(folder: Path) -> bool:
    return any((folder / m).exists() for m in FINETUNE_MARKERS)


def _content_refusal(out: Path, key: str, kind: str, overwrite: bool, resume: bool) -> str | None:
    if not out.is_dir() or not _entries(out):
        return None
    if kind == "run":
        if (out / RUN_MARKER).exists():
            return None
        return (f"{key} {out} is not empty and holds no hf-px run ({RUN_MARKER}); choose an empty or new "
                "folder so nothing of yours is overwritten.")
    if kind == "prune":
        if not (out / PRUNE_MARKER).exists():
            return (f"{key} {out} is not empty and holds no hf-px checkpoint ({PRUNE_MARKER}); output.overwrite "
                    "replaces only hf-px outputs, so choose an empty or new folder.")
        if not overwrite:
            return (f"{key} {out} already holds an hf-px checkpoint; set output.overwrite: true to replace it or "
                    "choose a new folder.")
        return None
    if not holds_finetune_run(out):
        return (f"{key} {out} is not empty and holds no hf-px fine-tune run ({' or '.join(FINETUNE_MARKERS)}); "
                "choose an empty or new folder so nothing of yours is overwritten.")
    if not resume:
        return (f"{key} {out} already holds a fine-tune run; set finetune.resume: true to continue it or choose a "
                "new folder.")
    return None


def check_output_folder(path: str | os.PathLike, *, key: str, kind: str, inputs: Iterable[Path] = (),
                        overwrite: bool = False, resume: bool = False) -> Path:
    """The absolute output folder, or :class:`OutputFolderError` (:class:`UnwritableFolderError` when it cannot be
    written); ``key`` is the config key that names the folder, for the messages.

    ``kind`` says what may be re-used: ``prune`` (a saved checkpoint) replaces a folder holding ``hf_px.json`` only
    with ``overwrite``; ``finetune`` continues a folder holding its results or checkpoints only with ``resume``;
    ``run`` resumes a folder holding ``run.json``. Nothing is created or changed.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{key} {out} is a file; set {key} to a folder path.")
    reason = protected_reason(out, inputs)
    if reason is not None:
        raise OutputFolderError(f"{key} {out} {reason}; hf-px never writes there, choose a new sub-folder.")
    refusal = _content_refusal(out, key, kind, overwrite, resume)
    if refusal is not None:
        raise OutputFolderError(refusal)
    reason = unwritable_reason(out)
    if reason is not None:
        raise UnwritableFolderError(f"{key} {out} cannot be written ({reason}); choose a folder you can write to.")
    return out


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``folder`` (its ``.lock`` file holds our PID) while inside.

    Raises :class:`FolderLockedError` naming the holder's PID when another process has it. The lock dies with
    its process, so a killed run never blocks the next one; the file is removed on a normal exit.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked rather than not at all
        yield
        return
    path = Path(folder) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise FolderLockedError(f"{folder} is in use by another hf-px run (PID {pid}); wait for it to finish "
                                    "or choose another output folder.") from None
        # a releasing holder unlinks the file: a lock on a file no longer at `path` would exclude nobody
        try:
            st, now = os.fstat(fd), os.stat(path)
            current = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
