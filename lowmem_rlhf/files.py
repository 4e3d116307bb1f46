"""Durable writes: fsync of a file or a folder (after a rename, the folder holds the new entry)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync(path: Path | str, strict: bool = True) -> None:
    """Flush `path` (a file or a folder) to disk. strict=False: best effort, errors ignored (a
    file system that cannot fsync a folder)."""
    with contextlib.nullcontext() if strict else contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path, strict: bool = False) -> None:
    """fsync every file directly in `folder`, then the folder itself."""
    for child in Path(folder).iterdir():
        if child.is_file():
            fsync(child, strict)
    fsync(folder, strict)


__all__ = ["fsync", "fsync_tree"]
