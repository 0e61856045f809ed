"""Output-folder checks shared by the commands and the pipeline: done before any work, so a run cannot fail at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
