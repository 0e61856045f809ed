"""Writing a checkpoint folder atomically: fill a temp folder beside the target, then rename it into place.

A folder with files in it is replaced only when it is an earlier hf_px save (it holds ``hf_px.json``) and is not
one :func:`hf_px.folders.protected_reason` protects (the root, the home or the current folder); the old folder is
kept until the new one is in place, so a crash never loses both.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def atomic_dir(target: pathlib.Path) -> Iterator[pathlib.Path]:
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
