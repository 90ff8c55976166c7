"""What every prepared corpus (text, speech, images) shares on disk: a ``meta.json``
written last, with a format name and version, and shards whose sizes and sha256 it records;
text and speech write theirs with ``OffsetShardWriter`` and read them with ``open_offset_shards``.

Kept free of torch so that corpus-preparation workers start fast.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import UsageError

META = "meta.json"


def read_corpus_meta(path: Path, *, flag: str, fmt: str, version: int, kind: str, hint: str,
                     reprepare: str = "re-run the preparation") -> dict:
    """``path/meta.json`` of a corpus of format ``fmt`` and ``version``, checked; every problem
    is a UsageError naming ``flag``/the file, what is wrong and ``hint`` (how to make one);
    ``reprepare`` is the fix for a corpus of another format version. ``kind`` names the
    corpus in messages ("", "speech ", "image ")."""
    path = Path(path)
    if not path.is_dir():
        what = "no such directory" if not path.exists() else "not a directory"
        raise UsageError(f"{flag} {path}: {what}; {hint}")
    meta_path = path / META
    if not meta_path.is_file():
        raise UsageError(f"{flag} {path}: not a prepared {kind}corpus (no {META}); {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{meta_path}: unreadable ({err}); re-run the preparation") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UsageError(f"{meta_path}: not a d2v_fast {kind}corpus description (format {found!r}); {hint}")
    if meta.get("version") != version:
        raise UsageError(f"{meta_path}: {kind}corpus format version {meta.get('version')}, this d2v_fast "
                         f"reads version {version}; {reprepare}")
    return meta


def open_offset_shards(path: Path, meta: dict, dtype: np.dtype, *, data: str, index: str, count: str,
                       items: str, unit: str, fix: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Memory-map the flat shards of a corpus whose items (documents, utterances) sit back
    to back, each shard with an int64 ``.npy`` of item start offsets plus the end. ``meta``'s
    shard entries name the files (keys ``data``, ``index``) and sizes (``count`` elements,
    ``items`` items); sizes and offsets are checked against them (UsageError naming the file
    and ``fix``). Returns (shards, offsets)."""
    shards, offsets = [], []
    for shard in meta["shards"]:
        dpath, ipath = path / shard[data], path / shard[index]
        for p in (dpath, ipath):
            if not p.is_file():
                raise UsageError(f"{p}: missing; {fix}")
        want = shard[count] * dtype.itemsize
        have = dpath.stat().st_size
        if have != want:
            raise UsageError(f"{dpath}: {have} bytes, expected {want} ({shard[count]} {dtype.name} {unit} "
                             f"per {META}); {fix}")
        try:
            starts = np.load(ipath)
        except (ValueError, OSError, EOFError) as err:
            raise UsageError(f"{ipath}: unreadable ({err}); {fix}") from None
        if (starts.ndim != 1 or len(starts) != shard[items] + 1 or starts[0] != 0
                or starts[-1] != shard[count] or np.any(np.diff(starts) <= 0)):
            raise UsageError(f"{ipath}: {items.removeprefix('num_').rstrip('s')} offsets do not match {META}; {fix}")
        shards.append(np.memmap(dpath, dtype=dtype, mode="r") if want else np.zeros(0, dtype))
        offsets.append(starts)
    return shards, offsets


class OffsetShardWriter:
    """Appends items of different lengths (documents, utterances) back to back to numbered
    shards in a staging directory, in the layout ``open_offset_shards`` reads: ``FILE-NNNNN.bin``
    and an int64 ``INDEX-NNNNN.npy`` of the items' start offsets plus the end (``files``: the two
    prefixes), and per shard a record naming both files and counting values and items (``keys``:
    the record's four keys) with the data's sha256. A shard is closed, its data fsynced, before
    an item would take it past ``shard_size`` values."""

    def __init__(self, directory: Path, dtype, shard_size: int, *, files: tuple[str, str],
                 keys: tuple[str, str, str, str]):
        self.directory, self.dtype, self.shard_size = Path(directory), np.dtype(dtype), shard_size
        self.files, self.keys = files, keys
        self.shards: list[dict] = []
        self._file = None

    def _open(self):
        self._name = f"{self.files[0]}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / self._name, "wb")
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def _close(self):
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())  # data on disk before meta.json says it is
        self._file.close()
        index = f"{self.files[1]}-{len(self.shards):05d}.npy"
        np.save(self.directory / index, np.asarray(self._offsets, dtype=np.int64))
        data, offsets, count, items = self.keys
        self.shards.append({data: self._name, offsets: index, count: int(self._offsets[-1]),
                            items: len(self._offsets) - 1, "sha256": self._hash.hexdigest()})
        self._file = None

    def append(self, data: bytes, n: int) -> None:
        """One item of ``n`` values (``data``: their bytes), in the open shard or a new one."""
        if self._file is not None and self._offsets[-1] + n > self.shard_size and len(self._offsets) > 1:
            self._close()
        if self._file is None:
            self._open()
        self._file.write(data)
        self._hash.update(data)
        self._offsets.append(self._offsets[-1] + n)

    def finish(self) -> list[dict]:
        self._close()
        return self.shards
