"""Finding a preparation's input files, for every modality: files, directories (searched
recursively, sorted) and globs, resolved into a de-duplicated list; each problem is one line
naming the flag and the path; see docs/data.md."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UsageError


def expand_inputs(paths: Sequence[str | os.PathLike], *, accept: Callable[[Path], object], suffixes: Sequence[str],
                  flag: str = "--input", noun: str = "one or more files") -> list[Path]:
    """The files ``paths`` name that ``accept`` takes (a file of one of ``suffixes``), in order."""
    if not paths:
        raise UsageError(f"{flag}: no input given; pass {noun}, directories or globs")
    kinds = "/".join(suffixes)

    def walk(directory: Path) -> list[Path]:
        return sorted(p for p in directory.rglob("*") if p.is_file() and accept(p))

    files: list[Path] = []
    for raw in map(str, paths):
        if glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))
            if not matches:
                raise UsageError(f"{flag} {raw}: the pattern matches nothing; check it "
                                 f"(and quote it so the shell does not expand it)")
            found = [p for m in matches for p in (walk(m) if m.is_dir() else [m]) if p.is_file() and accept(p)]
            if not found:
                raise UsageError(f"{flag} {raw}: matches no {kinds} file; check the pattern")
            files.extend(found)
            continue
        path = Path(raw)
        if not path.exists():
            raise UsageError(f"{flag} {raw}: no such file or directory; check the path")
        if path.is_dir():
            found = walk(path)
            if not found:
                raise UsageError(f"{flag} {raw}: the directory holds no {kinds} file")
            files.extend(found)
        elif not accept(path):
            raise UsageError(f"{flag} {raw}: unsupported file type; expected one of {', '.join(suffixes)}")
        else:
            files.append(path)
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique
