"""Small helpers shared across stages: atomic writes, reading JSON, numbers and tables."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def read_json(
    path: str | Path, what: str, error: type[Exception] = ValueError, fix: str = ""
) -> Any:
    """The parsed file, or one `error` naming the file, what is wrong and (`fix`) what to do."""
    path = Path(path)
    fix = f"; {fix}" if fix else ""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise error(f"{path}: no such file (expected {what}){fix}") from e
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}){fix}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable {what} ({e}){fix}") from e


_SUFFIXES = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))


def human(x: float, digits: int = 3) -> str:
    """1234567 -> '1.23M'; integers below 1000 as they are; past 1e15 e-notation (3e24
    FLOPs would read '3e+09T')."""
    if abs(x) >= 1e15:
        return f"{x:.{digits}g}"
    for suffix, k in _SUFFIXES:
        if abs(x) >= k:
            return f"{x / k:.{digits}g}{suffix}"
    return str(int(x)) if float(x).is_integer() else f"{x:.{digits}g}"


def format_table(rows: list[tuple[Any, ...]], title: str = "", header: tuple[str, ...] = ()) -> str:
    """Columns padded to their widest cell: the first left-aligned (labels), the rest right-
    aligned (numbers); two-column rows read as 'label  value'."""
    cells = [tuple(str(c) for c in r) for r in ([header] if header else []) + list(rows)]
    lines = [title] if title else []
    if not cells:
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    two = len(widths) == 2
    for r in cells:
        parts = [
            c.ljust(w) if i == 0 or two else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append(("  " if title else "") + "  ".join(parts).rstrip())
    return "\n".join(lines)
