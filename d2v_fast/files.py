"""Small helpers for writing files that survive crashes."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import UsageError


def file_mode() -> int:
    """The permission bits a new file gets in this process: 0o666 less the umask."""
    try:
        with open("/proc/self/status") as f:  # reads the umask without changing it (Linux)
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def like_other_files(path: Path) -> None:
    """Give ``path`` the mode every other file of ours gets. safetensors writes its files
    0600; weights in run directories and exports are meant to be shared like the rest."""
    os.chmod(path, file_mode())


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
        for weights in staging.rglob("*.safetensors"):
            like_other_files(weights)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
