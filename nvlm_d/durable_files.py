"""Writes that survive a crash: the batch log, the demo's cache and the evaluation's results rename finished files
into place, and a rename lasts only once its directory is on disk."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that a file created or renamed in it survives a power loss (where the system can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)
