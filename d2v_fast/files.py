"""Small helpers for writing files that survive crashes."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import UsageError


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_directory(out: Path):
    """Build a directory in a hidden staging sibling and rename it into place when the block
    ends without error (replacing an older ``out``); on error the staging is removed, so a
    reader never sees a half-written directory. Yields the staging path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR {out}: exists and is not a directory; choose another path")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
