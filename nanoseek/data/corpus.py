"""Corpus readers: a spec string (a path, a glob, or `stdlib`) -> documents, in a fixed order.

A text file is one document; a `.jsonl` line or a `.parquet` row is one document. The split
is decided per document index, so it never depends on the tokenizer or on batch sizes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.data.errors import DataError

STDLIB = "stdlib"
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl", ".parquet")
# Test suites are large, repetitive and full of deliberately odd code; site-packages is not
# the standard library and differs between machines.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
VAL_EVERY = 50  # document i goes to val when i % VAL_EVERY == VAL_EVERY - 1 (2%)
TAIL_FRACTION = 0.1  # a corpus too small for one val document holds out this tail instead


def normalize_extensions(extensions: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if extensions is None:
        return DEFAULT_EXTENSIONS
    if isinstance(extensions, str):
        extensions = extensions.split(",")
    exts = tuple(sorted({"." + e.strip().lower().lstrip(".") for e in extensions if e.strip()}))
    if not exts:
        raise DataError("no file extensions given; pass e.g. --ext .txt,.md")
    return exts


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's standard-library sources, test suites excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not (set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP_DIRS)
        and not p.name.startswith("test_")
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class Corpus:
    spec: str
    root: Path
    files: list[Path]
    text_field: str = "text"
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    # Filled by each pass over the documents (reset at its start, so two passes don't add up).
    skipped_files: list[Path] = field(default_factory=list)
    skipped_lines: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def name(self, path: Path) -> str:
        return (
            path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)
        )

    def fingerprint(self) -> str:
        """Changes when a file is added, removed or modified, so stale shards are caught."""
        h = hashlib.sha256()
        for p in self.files:
            st = p.stat()
            h.update(f"{self.name(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "data": self.spec,
            "files": len(self.files),
            "file_bytes": self.total_bytes,
            "text_field": self.text_field,
            "extensions": list(self.extensions),
            "fingerprint": self.fingerprint(),
        }

    def documents(self) -> Iterator[tuple[Path, str]]:
        self.skipped_files, self.skipped_lines = [], 0
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from ((path, t) for t in self._read_jsonl(path))
            elif suffix == ".parquet":
                yield from ((path, t) for t in self._read_parquet(path))
            else:
                try:
                    text = path.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    self.skipped_files.append(path)
                    continue
                if text:
                    yield path, text

    def split_documents(self) -> Iterator[tuple[str, Path, str]]:
        """(split, path, text) for every document. One document of look-ahead lets a corpus
        with fewer than VAL_EVERY documents still get a validation split (its last tail)."""
        prev, n_val, i = None, 0, -1
        for i, (path, text) in enumerate(self.documents()):
            if prev is not None:
                yield prev
            split = "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"
            n_val += split == "val"
            prev = (split, path, text)
        if prev is None:
            skipped = (
                f" ({len(self.skipped_files)} files skipped as not UTF-8)"
                if self.skipped_files
                else ""
            )
            raise DataError(
                f"empty corpus: {self.spec!r} has {len(self.files)} files but no text{skipped}; "
                "point --data at non-empty UTF-8 text"
            )
        if n_val:
            yield prev
            return
        _, path, text = prev
        cut = _tail_cut(text)
        if cut > 0:
            yield "train", path, text[:cut]
        yield "val", path, text[cut:]

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    self.skipped_lines += 1
                    continue
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line"
                    ) from e
                yield _field(row, self.text_field, f"{path}:{lineno}")

    def _read_parquet(self, path: Path) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(
                f"{path}: reading .parquet needs pyarrow; run `pip install pyarrow`"
            ) from e
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise DataError(
                f"{path}: no column {self.text_field!r} (columns: {', '.join(names)}); "
                "choose one with --text-field"
            )
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise DataError(
                        f"{path}: column {self.text_field!r} is not text; choose another with --text-field"
                    )
                if text:
                    yield text


def _field(row: object, name: str, where: str) -> str:
    if not isinstance(row, dict) or name not in row:
        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no field {name!r} (found: {keys}); choose one with --text-field")
    text = row[name]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where}: field {name!r} is {type(text).__name__}, not text")
    return text


def _tail_cut(text: str) -> int:
    """Where the held-out tail starts: at a line break near the last TAIL_FRACTION."""
    cut = int(len(text) * (1 - TAIL_FRACTION))
    nl = text.find("\n", cut)
    return nl + 1 if 0 <= nl < len(text) - 1 else cut


def open_corpus(
    data: str,
    text_field: str = "text",
    extensions: str | list[str] | tuple[str, ...] | None = None,
) -> Corpus:
    """`stdlib`, a file, a directory (searched recursively) or a glob -> Corpus."""
    exts = normalize_extensions(extensions)
    if data == STDLIB:
        root, files = stdlib_files()
        return Corpus(STDLIB, root, files, text_field, (".py",))
    path = Path(data).expanduser()
    if path.is_file():
        return Corpus(data, path.parent, [path], text_field, exts)
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in exts
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        root = path
    elif any(c in data for c in "*?["):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        if extensions is not None:
            files = [p for p in files if p.suffix.lower() in exts]
        root = Path(".")
    else:
        raise DataError(
            f"data path {data!r} does not exist; give a directory, a file, a glob like "
            "'docs/**/*.md', or 'stdlib' for the built-in corpus"
        )
    if not files:
        raise DataError(
            f"empty corpus: no files with extensions {', '.join(exts)} in {data!r}; "
            "choose extensions with --ext, e.g. --ext .txt,.md"
        )
    return Corpus(data, root, sorted(files, key=lambda p: p.as_posix()), text_field, exts)
