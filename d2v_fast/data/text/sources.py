"""Finding input files and reading documents out of them.

Supported: ``.txt`` (a document per blank-line-separated block, or per file) and
``.jsonl`` (one JSON object per line, the text in a configurable field), each optionally
gzip-compressed (``.gz``); directories (searched recursively) and globs of those.
"""
from __future__ import annotations

import codecs
import gzip
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from ...errors import UsageError
from ..inputs import expand_inputs as find_inputs

KINDS = (".txt", ".jsonl")
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


def file_kind(path: Path) -> str | None:
    """``.txt`` or ``.jsonl`` for a supported file (compressed or not), else None."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind in KINDS:
        if name.endswith(kind):
            return kind
    return None


def expand_inputs(paths: Sequence[str | os.PathLike], *, flag: str = "--input") -> list[Path]:
    """Resolve files, directories and globs into a sorted, de-duplicated list of input files."""
    return find_inputs(paths, accept=file_kind, suffixes=SUFFIXES, flag=flag)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def utf8_problem(path: Path, chunk: int = 1 << 20) -> str | None:
    """None when the file decodes as UTF-8, else a description of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    try:
        with _open_binary(path) as f:
            while True:
                data = f.read(chunk)
                try:
                    decoder.decode(data, final=not data)
                except UnicodeDecodeError as err:
                    bad = err.object[err.start:err.start + 1]
                    return f"invalid UTF-8 byte 0x{bad.hex()} at offset {offset + err.start}"
                if not data:
                    return None
                offset += len(data)
    except _GZIP_ERRORS as err:
        raise UsageError(f"{path}: not a readable gzip file ({err}); re-compress it or "
                         f"drop the .gz suffix") from None


def check_inputs(files: Sequence[Path]) -> list[Path]:
    """Drop non-UTF-8 files with a warning; refuse when none is left."""
    good, bad = [], []
    for path in files:
        problem = utf8_problem(path)
        if problem is None:
            good.append(path)
        else:
            bad.append((path, problem))
    fix = "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)"
    if not good:
        path, problem = bad[0]
        more = f" (and {len(bad) - 1} other input(s) likewise)" if len(bad) > 1 else ""
        raise UsageError(f"{path}: not UTF-8 text ({problem}){more}; {fix}")
    for path, problem in bad:
        warnings.warn(f"skipping {path}: not UTF-8 text ({problem}); {fix}", stacklevel=2)
    return good


def iter_documents(files: Sequence[Path], *, txt_docs: str = "block",
                   text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of every file, in order."""
    for path in files:
        kind = file_kind(path)
        try:
            with _open_binary(path) as raw:
                f = codecs.getreader("utf-8-sig")(raw, errors="strict")
                if kind == ".jsonl":
                    yield from _jsonl_documents(path, f, text_field)
                elif txt_docs == "file":
                    text = f.read().strip()
                    if text:
                        yield text
                else:
                    yield from _block_documents(f)
        except _GZIP_ERRORS as err:
            raise UsageError(f"{path}: not a readable gzip file ({err}); re-compress it or "
                             f"drop the .gz suffix") from None
        except UnicodeDecodeError as err:  # changed since check_inputs() looked at it
            raise UsageError(f"{path}: not UTF-8 text ({err.reason}); convert it to UTF-8") from None


def _block_documents(f) -> Iterator[str]:
    lines: list[str] = []
    for line in f:
        line = line.rstrip("\r\n")
        if line.strip():
            lines.append(line)
        elif lines:
            yield "\n".join(lines).strip()
            lines = []
    if lines:
        yield "\n".join(lines).strip()


def _jsonl_documents(path: Path, f, field: str) -> Iterator[str]:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({err.msg}); every line of a .jsonl "
                             f"file must be one JSON object") from None
        if not isinstance(obj, dict) or field not in obj:
            keys = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
            raise UsageError(f"{path}:{lineno}: no {field!r} field (found {keys or 'no keys'}); "
                             f"name the text field with --text-field")
        text = obj[field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise UsageError(f"{path}:{lineno}: field {field!r} is a {type(text).__name__}, "
                             f"expected a string")
        text = text.strip()
        if text:
            yield text
