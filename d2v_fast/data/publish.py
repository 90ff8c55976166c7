"""What every corpus preparation (text, speech, images) shares: the fingerprint of its inputs
and options, the check of ``--out`` (this corpus already, another one, or empty), a hidden
staging directory beside it, and the publish: data fsynced, ``meta.json`` written last and
atomically, the directory renamed into place. An interrupted run never leaves a corpus that
looks valid, and a later run removes its leftovers; see docs/data.md."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UsageError
from ..files import fsync_dir
from .shards import META


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _fingerprint(source: dict) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def _describe_files(files: Sequence[Path]) -> list[dict]:
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _check_out_dir(out: Path, fingerprint: str, force: bool, read) -> bool:
    """True when ``out`` already holds this very corpus (nothing to do); ``read`` reads the
    modality's meta.json (text, audio and image corpora share this check)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; choose another path")
    if (out / META).is_file():
        try:
            meta = read(out, flag="--out")
        except UsageError:
            meta = {}
        if meta.get("source", {}).get("fingerprint") == fingerprint:
            return True
        if force:
            return False
        raise UsageError(f"--out {out}: holds a different corpus (other inputs or options); choose another "
                         f"--out, delete it, or pass --force to replace it")
    if any(out.iterdir()):
        raise UsageError(f"--out {out}: not empty and holds no corpus; choose a new or empty directory")
    return False


def already_prepared(out: Path, source: dict, *, force: bool, read, progress: bool) -> bool:
    """Seal ``source`` (what the corpus is made from, with which options) with its fingerprint;
    True, after saying so, when ``out`` already holds that very corpus (nothing to do); see
    ``_check_out_dir`` for an ``out`` that holds another one."""
    source["fingerprint"] = _fingerprint(source)
    if _check_out_dir(out, source["fingerprint"], force, read=read):
        _say(progress, f"{out}: already holds this corpus, nothing to do")
        return True
    return False


def new_staging(out: Path) -> Path:
    """A fresh hidden staging directory beside ``out``, the leftovers of dead runs removed;
    ``finish_corpus`` publishes it as ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _clean_stale_staging(out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to ``out`` (replacing an old corpus there)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finish_corpus(staging: Path, out: Path, meta: dict, *, sync: Iterable[str] = ()) -> None:
    """Make the staged corpus ``out``: fsync the files named in ``sync`` (data must be on
    disk before ``meta.json`` says the corpus is complete), write ``meta.json`` last and
    atomically, then move the directory into place (replacing an old corpus there)."""
    for name in sync:
        with open(staging / name, "rb+") as f:
            os.fsync(f.fileno())
    tmp = staging / (META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / META)
    fsync_dir(staging)
    _publish(staging, out)
    fsync_dir(out.parent)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def corpus_parser(*, prog: str, description: str, inputs: str, more) -> argparse.ArgumentParser:
    """A preparation command's parser: ``--input`` (``inputs`` says what it takes) and ``--out``,
    then the modality's own flags (``more(parser)``), then ``--force`` and ``--quiet``."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=inputs)
    p.add_argument("--out", required=True, metavar="DIR", help="corpus directory to write")
    more(p)
    p.add_argument("--force", action="store_true", help="replace a different corpus already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p
