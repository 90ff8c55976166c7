"""The built-in default corpus: docstrings of the installed Python standard library.

Every Python ships them, they are real English prose (about 1.5M characters in 3.11),
and they need no download. The prepared corpus, with a byte-level BPE trained on it, is
cached under ``$D2V_FAST_CACHE`` (default ``~/.cache/d2v_fast``).
"""
from __future__ import annotations

import ast
import fcntl
import multiprocessing as mp
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from ..errors import UsageError
from .corpus import META, read_meta
from .prepare import default_workers, prepare_corpus

BUILTIN_VERSION = 1  # bump when the extraction below changes
BUILTIN_VOCAB_SIZE = 8192
MIN_DOC_CHARS = 80  # shorter docstrings are mostly one-line signatures ("Return self==value.")
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


def cache_dir() -> Path:
    return Path(os.environ.get("D2V_FAST_CACHE") or Path.home() / ".cache" / "d2v_fast")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if not _SKIP_PARTS.intersection(p.relative_to(root).parts)]


def _file_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                docs.append(doc)
    return docs


def stdlib_docstrings(workers: int | None = None) -> Iterator[str]:
    """Unique docstrings of the standard library, in a fixed order."""
    files = stdlib_files()
    workers = default_workers() if workers is None else workers
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            per_file = pool.map(_file_docstrings, files, chunksize=16)
    else:
        per_file = map(_file_docstrings, files)
    seen = set()
    for docs in per_file:
        for doc in docs:
            if doc not in seen:
                seen.add(doc)
                yield doc


def builtin_corpus_path(vocab_size: int = BUILTIN_VOCAB_SIZE) -> Path:
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / f"stdlib-docstrings-{tag}-v{BUILTIN_VERSION}-bpe{vocab_size}"


def builtin_corpus(vocab_size: int = BUILTIN_VOCAB_SIZE, *, workers: int | None = None,
                   progress: bool = True) -> Path:
    """Path of the prepared built-in corpus, building it on first use.

    Safe to call from several processes at once (torchrun ranks): one builds, the others
    wait on a lock and then find it ready.
    """
    out = builtin_corpus_path(vocab_size)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cache directory {out.parent}: cannot be created ({err.strerror}); "
                         f"set D2V_FAST_CACHE to a writable directory") from None
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / META).is_file():
            try:
                read_meta(out)
                return out
            except UsageError:
                pass  # unreadable: rebuild below
        if progress:
            print(f"building the built-in corpus (Python {sys.version.split()[0]} standard-library "
                  f"docstrings) into {out}", file=sys.stderr, flush=True)
        source_id = f"python-stdlib-docstrings:{sys.version.split()[0]}:v{BUILTIN_VERSION}"
        return prepare_corpus(out, documents=stdlib_docstrings(workers), source_id=source_id,
                              vocab_size=vocab_size, workers=workers, force=True, progress=progress)
