"""A prepared speech corpus on disk.

Layout of a corpus directory::

    meta.json              rate, dtype, counts, normalisation, shard list (written last)
    audio-00000.bin        raw little-endian float16 (or float32) samples at 16 kHz mono,
                           utterances back to back, each already zero-mean unit-variance
    index-00000.npy        int64 utterance start offsets into the shard, plus the end
    utterances.tsv         shard, offset, length and source of every utterance (for people)

Kept free of torch so that corpus-preparation workers start fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shards import META, OffsetShardWriter, open_offset_shards, read_corpus_meta  # noqa: F401 (META re-exported)

FORMAT = "d2v_fast.audio_corpus"
FORMAT_VERSION = 1
SAMPLE_RATE = 16000
PREPARE_HINT = "prepare one with `python -m d2v_fast.data.audio --input IN... --out DIR`"
REPREPARE = "python -m d2v_fast.data.audio --input IN... --out DIR --force"  # with the inputs it was made from
DTYPES = ("float16", "float32")


class AudioShardWriter(OffsetShardWriter):
    """Appends utterances to numbered shards in a staging directory."""

    def __init__(self, directory: Path, dtype: str, shard_samples: int):
        super().__init__(directory, dtype, shard_samples, files=("audio", "index"),
                         keys=("samples", "index", "num_samples", "num_utterances"))
        self._listing = open(self.directory / "utterances.tsv", "w")
        self._listing.write("shard\toffset\tsamples\tsource\n")

    def add(self, wav: np.ndarray, source: str) -> None:
        self.append(np.ascontiguousarray(wav, dtype=self.dtype.newbyteorder("<")).tobytes(), len(wav))
        self._listing.write(f"{len(self.shards)}\t{self._offsets[-2]}\t{len(wav)}\t{source}\n")

    def finish(self) -> list[dict]:
        shards = super().finish()
        self._listing.flush()
        os.fsync(self._listing.fileno())
        self._listing.close()
        return shards

    def abort(self) -> None:
        for f in (self._file, self._listing):
            if f is not None and not f.closed:
                f.close()


def read_audio_meta(path: Path, *, flag: str = "--data") -> dict:
    return read_corpus_meta(path, flag=flag, fmt=FORMAT, version=FORMAT_VERSION, kind="speech ", hint=PREPARE_HINT)


@dataclass
class AudioCorpus:
    """A prepared speech corpus, opened read-only with memory-mapped shards. Utterance
    ``i`` is ``corpus[i]`` (a float32 copy)."""

    path: Path
    meta: dict
    samples: list[np.ndarray]
    offsets: list[np.ndarray]

    def __post_init__(self):
        counts = [len(o) - 1 for o in self.offsets]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = np.concatenate([np.diff(o) for o in self.offsets]) if counts else np.zeros(0, np.int64)

    @property
    def sample_rate(self) -> int:
        return int(self.meta["sample_rate"])

    def __len__(self) -> int:
        return int(self._first[-1])

    def locate(self, i: int) -> tuple[int, int, int]:
        """(shard, start, end) of utterance ``i``."""
        shard = int(np.searchsorted(self._first, i, side="right") - 1)
        j = i - int(self._first[shard])
        return shard, int(self.offsets[shard][j]), int(self.offsets[shard][j + 1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard, start, end = self.locate(i)
        return np.asarray(self.samples[shard][start:end], dtype=np.float32)

    def window(self, i: int, offset: int, length: int) -> np.ndarray:
        """``length`` samples of utterance ``i`` from ``offset`` (reads only those)."""
        shard, start, end = self.locate(i)
        if offset < 0 or start + offset + length > end:
            raise IndexError(f"window {offset}+{length} outside utterance {i} of {end - start} samples")
        return np.asarray(self.samples[shard][start + offset:start + offset + length], dtype=np.float32)


def open_audio_corpus(path: str | os.PathLike, *, flag: str = "--data") -> AudioCorpus:
    """Open a prepared speech corpus, checking every shard's size against ``meta.json``."""
    path = Path(path)
    meta = read_audio_meta(path, flag=flag)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    fix = f"the corpus is truncated or altered; prepare it again (`{REPREPARE}`)"
    samples, offsets = open_offset_shards(path, meta, dtype, data="samples", index="index", count="num_samples",
                                          items="num_utterances", unit="samples", fix=fix)
    return AudioCorpus(path=path, meta=meta, samples=samples, offsets=offsets)
