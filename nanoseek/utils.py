"""Small helpers shared across stages: atomic file writes and seeding."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds,
    so a crash mid-write never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should be readable like any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_dir(
    path: str | Path, is_complete: Callable[[Path], bool] = Path.exists
) -> Iterator[Path]:
    """Yield an empty temp directory next to `path`; if the block succeeds, swap it in for
    `path`. Between the two renames the previous version is `.{name}.old`, deleted only once
    the new one is in place, so a crash at any point leaves one complete copy (readers fall
    back to `.old`). A leftover `path` that `is_complete` rejects is removed, keeping `.old`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories
        old = path.with_name(f".{path.name}.old")
        if path.exists() and not is_complete(path):
            shutil.rmtree(path)  # a broken leftover; `old`, if any, is the good copy: keep it
        if path.exists():  # `path` is good, so `old` is redundant: it makes way for `path`
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
