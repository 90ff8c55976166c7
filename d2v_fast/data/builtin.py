"""What every built-in corpus shares (the text one of stdlib docstrings, the synthesised speech,
the Fashion-MNIST photos, the speech probe's task): the cache folder, ``$D2V_FAST_CACHE``
(default ``~/.cache/d2v_fast``), and building a cached corpus once, under a lock, however many
processes ask for it at the same time; see docs/data.md."""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UsageError
from .shards import META


def cache_dir() -> Path:
    return Path(os.environ.get("D2V_FAST_CACHE") or Path.home() / ".cache" / "d2v_fast")


@contextlib.contextmanager
def build_once(out: Path, is_ready: Callable[[Path], object]) -> Iterator[bool]:
    """Around building the cached ``out``: makes its cache folder (one line naming
    ``D2V_FAST_CACHE`` when it cannot), holds an exclusive lock on it and yields whether a
    finished build is there already: ``out/meta.json`` exists and ``is_ready(out)`` is truthy
    (a UsageError from it counts as not ready). Safe from several processes at once
    (torchrun ranks, loader workers): one builds, the others wait and then find it ready."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cache directory {out.parent}: cannot be created ({err.strerror}); "
                         f"set D2V_FAST_CACHE to a writable directory") from None
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = False
        if (out / META).is_file():
            try:
                ready = bool(is_ready(out))
            except UsageError:
                ready = False  # unreadable: built again
        yield ready


def python_tag() -> str:
    """``py311`` for Python 3.11: built-in corpora read the standard library, so each Python
    version caches its own."""
    return f"py{sys.version_info.major}{sys.version_info.minor}"
