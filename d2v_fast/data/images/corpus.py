"""A prepared image corpus on disk: uint8 pixel shards of whole photos with their offsets,
each photo's size, labels, the source index and ``meta.json``.

Layout::

    meta.json            shorter side, channels, counts, class names, shard checksums (written last)
    images-00000.bin     raw uint8 pixels, photos back to back, each [height, width, channels]
    index-00000.npy      int64 byte offsets of each photo in the shard, plus the end
    shapes.npy           int64 [num_images, 2]: each photo's height and width
    labels.npy           int64 [num_images]: class index, or -1 for an unlabelled image
    files.txt            one line per image: its source (path relative to the input root,
                         or e.g. ``t10k-images-idx3-ubyte.gz:123``)

Every photo is stored whole (decoded once, its shorter side resized at preparation, the
aspect ratio kept), so the loader's random crop can come from anywhere in it. A batch is
one gather from the memory-mapped shards into a canvas of the batch's largest height and
width (``pad_stack``) and augmentation can run on the GPU on uint8. Kept free of torch so
preparation workers start fast. Format version 1 (every photo centre-cropped to a square)
is refused with the command that re-prepares it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import UsageError
from ..shards import META, OffsetShardWriter, open_offset_shards, read_corpus_meta

FORMAT = "d2v_fast.images"
FORMAT_VERSION = 2  # 1: photos centre-cropped to a square at preparation
PREPARE_HINT = "prepare one with `python -m d2v_fast.data.images.prepare --input DIR --out DIR`"
REPREPARE = ("prepare it again from its photos (`python -m d2v_fast.data.images.prepare --input DIR --out DIR "
             "--force`): this version stores every photo whole")


def pad_stack(images: Sequence[np.ndarray], *, channels_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [B, H, W, C], int64 [B, 2]): the images ([h, w, C] each) in a canvas of the
    largest height and width, each at the top left and extended by repeating its last row
    and column (so a bicubic sample at its edge reads what border padding would), and each
    image's (h, w). ``channels_first``: the canvas laid out [B, C, H, W] instead."""
    sizes = np.asarray([im.shape[:2] for im in images], dtype=np.int64).reshape(len(images), 2)
    H, W = (int(v) for v in sizes.max(0)) if len(images) else (0, 0)
    C = images[0].shape[2] if len(images) else 0
    canvas = np.empty((len(images), C, H, W) if channels_first else (len(images), H, W, C), dtype=np.uint8)
    out = canvas.transpose(0, 2, 3, 1) if channels_first else canvas  # an [B, H, W, C] view either way
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        out[i, :h, :w] = im
        out[i, :h, w:] = im[:, w - 1:w]
        out[i, h:] = out[i, h - 1:h]
    return canvas, sizes


class ImageShardWriter(OffsetShardWriter):
    """Appends uint8 photos of any size to numbered shards in a staging directory."""

    def __init__(self, directory: Path, shard_bytes: int):
        super().__init__(directory, np.uint8, shard_bytes, files=("images", "index"),
                         keys=("images", "index", "num_bytes", "num_images"))

    def add(self, pixels: np.ndarray) -> None:
        data = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        self.append(data, len(data))


@dataclass
class ImageCorpus:
    """A prepared image corpus, opened read-only with memory-mapped shards."""

    path: Path
    meta: dict
    shards: list[np.ndarray]  # each flat uint8: the shard's photos back to back
    offsets: list[np.ndarray]  # each int64: byte offset of each photo in its shard, plus the end
    shapes: np.ndarray  # int64 [num_images, 2]: (height, width) of each photo
    labels: np.ndarray  # int64 [num_images], -1 = no label
    starts: np.ndarray  # int64 [num_shards + 1]: first image index of each shard, then the total

    @property
    def num_images(self) -> int:
        return int(self.meta["num_images"])

    @property
    def short_side(self) -> int:
        """The shorter side the photos were resized to at preparation."""
        return int(self.meta["short_side"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes")

    def __len__(self) -> int:
        return self.num_images

    def image(self, index: int) -> np.ndarray:
        """uint8 [height, width, channels] of the whole photo (a view into the memory map)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} out of range: the corpus {self.path} has {self.num_images}")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        j = index - int(self.starts[shard])
        start, end = int(self.offsets[shard][j]), int(self.offsets[shard][j + 1])
        h, w = (int(v) for v in self.shapes[index])
        return self.shards[shard][start:end].reshape(h, w, self.channels)

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [B, H, W, channels], int64 [B, 2]): the photos copied out of the shards
        into one canvas (``pad_stack``) and each photo's (height, width)."""
        return pad_stack([self.image(int(i)) for i in np.asarray(indices, dtype=np.int64).tolist()])


def describe_sizes(shapes: np.ndarray, channels: int | None = None) -> str:
    """'32x32' ('32x32x1' with ``channels``) when every photo has that size, else e.g.
    'whole photos, shorter side 256, up to 256x1024' (', 3 channels')."""
    c = "" if channels is None else f"x{channels}"
    if len(shapes) and (shapes == shapes[0]).all():
        return f"{int(shapes[0, 0])}x{int(shapes[0, 1])}{c}"
    short = shapes.min(1)
    side = f"{int(short.min())}" if short.min() == short.max() else f"{int(short.min())}-{int(short.max())}"
    big = shapes[int(np.argmax(shapes.prod(1)))]
    c = "" if channels is None else f", {channels} channel{'s' if channels > 1 else ''}"
    return f"whole photos, shorter side {side}, up to {int(big[0])}x{int(big[1])}{c}"


def read_meta(path: Path, *, flag: str = "--data") -> dict:
    return read_corpus_meta(path, flag=flag, fmt=FORMAT, version=FORMAT_VERSION, kind="image ", hint=PREPARE_HINT,
                            reprepare=REPREPARE)


def open_images(path: str | os.PathLike, *, flag: str = "--data") -> ImageCorpus:
    """Open a prepared image corpus, checking every file's size against ``meta.json``."""
    path = Path(path)
    meta = read_meta(path, flag=flag)
    fix = "the corpus is truncated or altered; re-run the preparation"
    n, c = int(meta["num_images"]), int(meta["channels"])
    shards, offsets = open_offset_shards(path, meta, np.dtype(np.uint8), data="images", index="index",
                                         count="num_bytes", items="num_images", unit="bytes", fix=fix)
    starts = np.concatenate([[0], np.cumsum([len(o) - 1 for o in offsets])]).astype(np.int64)
    if starts[-1] != n:
        raise UsageError(f"{path / META}: shards hold {starts[-1]} images, num_images says {n}; {fix}")
    arrays = {}
    for name, shape in (("shapes", (n, 2)), ("labels", (n,))):
        p = path / f"{name}.npy"
        try:
            arrays[name] = np.load(p)
        except (OSError, ValueError, EOFError) as err:
            raise UsageError(f"{p}: unreadable ({err}); {fix}") from None
        if arrays[name].shape != shape or arrays[name].dtype != np.int64:
            raise UsageError(f"{p}: shape {arrays[name].shape} {arrays[name].dtype}, expected {shape} int64; {fix}")
    shapes = arrays["shapes"]
    sizes = np.concatenate([np.diff(o) for o in offsets]) if offsets else np.zeros(0, np.int64)
    if (shapes < 1).any() or not np.array_equal(sizes, shapes.prod(1) * c):
        raise UsageError(f"{path / 'shapes.npy'}: the photos' sizes do not match the shards' offsets; {fix}")
    return ImageCorpus(path=path, meta=meta, shards=shards, offsets=offsets, shapes=shapes, labels=arrays["labels"],
                       starts=starts)


def verify_images(corpus: ImageCorpus) -> None:
    """Full check of every shard's sha256 against ``meta.json`` (UsageError naming the shard)."""
    for shard, data in zip(corpus.meta["shards"], corpus.shards):
        h = hashlib.sha256(np.ascontiguousarray(data).reshape(-1).data)
        if h.hexdigest() != shard["sha256"]:
            raise UsageError(f"{corpus.path / shard['images']}: sha256 differs from {META}; the shard was altered "
                             f"after preparation; re-run the preparation")
