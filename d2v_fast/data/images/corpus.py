"""A prepared image corpus on disk: uint8 pixel shards, labels, the source index and
``meta.json``.

Layout::

    meta.json            size, channels, counts, class names, shard checksums (written last)
    images-00000.bin     raw uint8 pixels, image after image, each [height, width, channels]
    labels.npy           int64 [num_images]: class index, or -1 for an unlabelled image
    files.txt            one line per image: its source (path relative to the input root,
                         or e.g. ``t10k-images-idx3-ubyte.gz:123``)

Every image has the same size (decoded once, resized and centre-cropped at preparation),
so a batch is one gather from the memory-mapped shards and augmentation can run on the GPU
on uint8. Kept free of torch so preparation workers start fast.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..shards import META, read_corpus_meta

FORMAT = "d2v_fast.images"
FORMAT_VERSION = 1
PREPARE_HINT = "prepare one with `python -m d2v_fast.data.images.prepare --input DIR --out DIR`"


@dataclass
class ImageCorpus:
    """A prepared image corpus, opened read-only with memory-mapped shards."""

    path: Path
    meta: dict
    shards: list[np.ndarray]  # each uint8 [n, height, width, channels]
    labels: np.ndarray  # int64 [num_images], -1 = no label
    starts: np.ndarray  # int64 [num_shards + 1]: first image index of each shard, then the total

    @property
    def num_images(self) -> int:
        return int(self.meta["num_images"])

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.meta["size"]
        return int(h), int(w)

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes")

    def __len__(self) -> int:
        return self.num_images

    def image(self, index: int) -> np.ndarray:
        """uint8 [height, width, channels] (a view into the memory map)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} out of range: the corpus {self.path} has {self.num_images}")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[shard][index - self.starts[shard]]

    def batch(self, indices) -> np.ndarray:
        """uint8 [B, height, width, channels] copied out of the shards."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.size, self.channels), dtype=np.uint8)
        for i, index in enumerate(indices.tolist()):
            out[i] = self.image(index)
        return out


def read_meta(path: Path, *, flag: str = "--data") -> dict:
    return read_corpus_meta(path, flag=flag, fmt=FORMAT, version=FORMAT_VERSION, kind="image ", hint=PREPARE_HINT)


def open_images(path: str | os.PathLike, *, flag: str = "--data") -> ImageCorpus:
    """Open a prepared image corpus, checking every file's size against ``meta.json``."""
    path = Path(path)
    meta = read_meta(path, flag=flag)
    fix = "the corpus is truncated or altered; re-run the preparation"
    h, w = meta["size"]
    c = meta["channels"]
    per_image = h * w * c
    shards, starts = [], [0]
    for shard in meta["shards"]:
        p = path / shard["images"]
        if not p.is_file():
            raise UsageError(f"{p}: missing; {fix}")
        want = shard["num_images"] * per_image
        have = p.stat().st_size
        if have != want:
            raise UsageError(f"{p}: {have} bytes, expected {want} ({shard['num_images']} images of "
                             f"{h}x{w}x{c} uint8 per {META}); {fix}")
        shards.append(np.memmap(p, dtype=np.uint8, mode="r", shape=(shard["num_images"], h, w, c)))
        starts.append(starts[-1] + shard["num_images"])
    if starts[-1] != meta["num_images"]:
        raise UsageError(f"{path / META}: shards hold {starts[-1]} images, num_images says {meta['num_images']}; {fix}")
    labels_path = path / "labels.npy"
    try:
        labels = np.load(labels_path)
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"{labels_path}: unreadable ({err}); {fix}") from None
    if labels.shape != (meta["num_images"],) or labels.dtype != np.int64:
        raise UsageError(f"{labels_path}: shape {labels.shape} {labels.dtype}, expected "
                         f"({meta['num_images']},) int64; {fix}")
    return ImageCorpus(path=path, meta=meta, shards=shards, labels=labels, starts=np.asarray(starts, dtype=np.int64))


def verify_images(corpus: ImageCorpus) -> None:
    """Full check of every shard's sha256 against ``meta.json`` (UsageError naming the shard)."""
    for shard, data in zip(corpus.meta["shards"], corpus.shards):
        h = hashlib.sha256(np.ascontiguousarray(data).reshape(-1).data)
        if h.hexdigest() != shard["sha256"]:
            raise UsageError(f"{corpus.path / shard['images']}: sha256 differs from {META}; the shard was altered "
                             f"after preparation; re-run the preparation")
