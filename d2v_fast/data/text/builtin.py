"""The built-in default corpus: docstrings of the installed Python standard library.

Every Python ships them, they are real English prose (about 1.5M characters in 3.11),
and they need no download. The prepared corpus, with a byte-level BPE trained on it, is
cached under ``$D2V_FAST_CACHE`` (default ``~/.cache/d2v_fast``).

The docstrings also carry a label, the top-level standard-library module they come from;
that is the built-in probe task (``d2v_fast.probe``). The probe's test documents are held
out of the pretraining corpus, so no run on the built-in corpus has trained on them; the
task file and that hold-out are recorded in the corpus (``probe-task.jsonl``, ``meta.json``
key ``probe``).
"""
from __future__ import annotations

import ast
import hashlib
import multiprocessing as mp
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from ..builtin import build_once, cache_dir, python_tag
from ..probe_task import SPLIT_SEED, split_by_document, task_lines
from ..publish import default_workers
from .corpus import read_meta
from .prepare import prepare_corpus

# Bump when the extraction or the hold-out below changes: the cache path carries it, so an
# older cached corpus is never reused. 2: the probe's test documents are held out.
BUILTIN_VERSION = 2
BUILTIN_VOCAB_SIZE = 8192
MIN_DOC_CHARS = 80  # shorter docstrings are mostly one-line signatures ("Return self==value.")
# Probe task: modules with at least PROBE_MIN_DOCS docstrings (23 on Python 3.11), at most
# PROBE_MAX_DOCS of each, so the big packages (tkinter, idlelib: ~300) do not dominate and
# the probe of the tiny encoder stays a few seconds on CPU.
PROBE_MIN_DOCS = 40
PROBE_MAX_DOCS = 120
PROBE_TASK_FILE = "probe-task.jsonl"
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


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


def module_of(path: Path) -> str:
    """The top-level standard-library module a file belongs to (``email/mime/text.py`` -> email)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return path.relative_to(root).parts[0].removesuffix(".py")


def stdlib_labelled_docstrings(workers: int | None = None, progress: bool = False) -> Iterator[tuple[str, str]]:
    """(module, docstring) for every unique docstring of the standard library, in a fixed
    order; a docstring found in several modules counts for the first. ``progress``: a bar
    over the files while they are read (it takes tens of seconds on a busy machine)."""
    files = stdlib_files()
    workers = default_workers() if workers is None else workers
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="reading docstrings", unit=" files", total=len(files), file=sys.stderr, dynamic_ncols=True)

    def counted(results):
        for r in results:
            if bar is not None:
                bar.update(1)
            yield r

    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            per_file = list(counted(pool.imap(_file_docstrings, files, chunksize=16)))
    else:
        per_file = list(counted(map(_file_docstrings, files)))
    if bar is not None:
        bar.close()
    seen = set()
    for path, docs in zip(files, per_file):
        for doc in docs:
            if doc not in seen:
                seen.add(doc)
                yield module_of(path), doc


def stdlib_docstrings(workers: int | None = None) -> Iterator[str]:
    """Unique docstrings of the standard library, in a fixed order."""
    return (doc for _, doc in stdlib_labelled_docstrings(workers))


def probe_splits(modules: list[str]) -> list[str | None]:
    """The probe split of every docstring (None: not in the task): modules with at least
    PROBE_MIN_DOCS docstrings, at most PROBE_MAX_DOCS of each, split by document."""
    counts: dict[str, int] = {}
    for m in modules:
        counts[m] = counts.get(m, 0) + 1
    kept = [m if counts[m] >= PROBE_MIN_DOCS else None for m in modules]
    splits = split_by_document([m or "" for m in kept], seed=SPLIT_SEED, max_per_label=PROBE_MAX_DOCS)
    return [s if m is not None else None for m, s in zip(kept, splits)]


def probe_record(meta: dict, corpus: Path) -> dict | None:
    """The corpus's probe hold-out record when it and its task file are intact, else None."""
    rec = meta.get("probe")
    if not isinstance(rec, dict) or rec.get("version") != BUILTIN_VERSION:
        return None
    f = corpus / str(rec.get("task", ""))
    if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != rec.get("sha256"):
        return None
    return rec


def builtin_corpus_path(vocab_size: int = BUILTIN_VOCAB_SIZE) -> Path:
    return cache_dir() / f"stdlib-docstrings-{python_tag()}-v{BUILTIN_VERSION}-bpe{vocab_size}"


def builtin_corpus(vocab_size: int = BUILTIN_VOCAB_SIZE, *, workers: int | None = None,
                   progress: bool = True) -> Path:
    """Path of the prepared built-in corpus, building it on first use.

    Safe to call from several processes at once (torchrun ranks): one builds, the others
    wait on a lock and then find it ready.
    """
    out = builtin_corpus_path(vocab_size)
    with build_once(out, lambda p: probe_record(read_meta(p), p) is not None) as ready:
        if ready:
            return out
        # unreadable, or without an intact hold-out record: it may hold the probe's test
        # documents, so it is removed rather than reused, even if the build below fails
        shutil.rmtree(out, ignore_errors=True)
        if progress:
            print(f"building the built-in corpus (Python {sys.version.split()[0]} standard-library "
                  f"docstrings) into {out}", file=sys.stderr, flush=True)
        modules, docs = zip(*stdlib_labelled_docstrings(workers, progress=progress))
        splits = probe_splits(list(modules))
        task = task_lines(docs, modules, splits)
        kept = sorted({m for m, s in zip(modules, splits) if s})
        record = {"version": BUILTIN_VERSION, "task": PROBE_TASK_FILE, "sha256": hashlib.sha256(task).hexdigest(),
                  "label": "top-level standard-library module", "classes": len(kept),
                  "documents": {s: splits.count(s) for s in ("train", "val", "test")},
                  "held_out_of_pretraining": "test", "min_docs": PROBE_MIN_DOCS, "max_docs": PROBE_MAX_DOCS,
                  "seed": SPLIT_SEED}
        source_id = f"python-stdlib-docstrings:{sys.version.split()[0]}:v{BUILTIN_VERSION}"
        return prepare_corpus(out, documents=[d for d, s in zip(docs, splits) if s != "test"],
                              source_id=source_id, vocab_size=vocab_size, workers=workers, force=True,
                              progress=progress, extra_files={PROBE_TASK_FILE: task},
                              extra_meta={"probe": record})


def builtin_probe_task(progress: bool = True) -> Path:
    """The built-in probe task file (building the built-in corpus on first use)."""
    return builtin_corpus(progress=progress) / PROBE_TASK_FILE
