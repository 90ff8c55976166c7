"""The built-in image corpus: Fashion-MNIST, from Debian's ``dataset-fashion-mnist``.

70,000 real photographs of clothing articles (Zalando product photos, 28 x 28 greyscale,
10 classes; MIT licence, Copyright 2017 Zalando SE), installed by
``apt-get install dataset-fashion-mnist`` into ``/usr/share/datasets/fashion-mnist`` as the
original IDX files. No download at run time: the prepared corpus is built from those files
and cached under ``$D2V_FAST_CACHE`` (default ``~/.cache/d2v_fast``), like the text corpus.

Each photo is padded with its own black background to 32 x 32 (the ``tiny`` preset's
image size, 8 x 8 patches of 4) and stored with one channel; loaders repeat it to RGB.
Images 0..59,999 are the training split, 60,000..69,999 the t10k test split (held out
for probes: ``meta["splits"]``). ``D2V_FAST_FASHION_MNIST`` points at another directory
holding the four ``*-ubyte.gz`` files.
"""
from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..builtin import build_once, cache_dir
from .corpus import read_meta
from .prepare import write_image_corpus

BUILTIN_VERSION = 2  # bump when the conversion below or the corpus format changes
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SPLITS = {"train": "train", "t10k": "t10k"}
SIDE, PAD = 32, 2  # 28 + 2 * 2
INSTALL_HINT = ("install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, MIT-licensed data), "
                "or set D2V_FAST_FASHION_MNIST to a directory holding the four *-ubyte.gz files")


def source_dir() -> Path:
    return Path(os.environ.get("D2V_FAST_FASHION_MNIST") or DEBIAN_DIR)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (big-endian header: 0, 0, type 0x08 = uint8, ndim; then ndim uint32 sizes)."""
    if not path.is_file():
        raise UsageError(f"{path}: missing, the built-in image corpus needs it; {INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UsageError(f"{path}: unreadable ({err}); reinstall dataset-fashion-mnist") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise UsageError(f"{path}: not a uint8 IDX file of {ndim} dimensions; reinstall dataset-fashion-mnist")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise UsageError(f"{path}: {len(data)} bytes, the header promises {shape}; reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [70000, 28, 28], labels int64 [70000]): train then t10k."""
    d = source_dir() if directory is None else Path(directory)
    images, labels = [], []
    for split in ("train", "t10k"):
        x = _read_idx(d / f"{split}-images-idx3-ubyte.gz", 3)
        y = _read_idx(d / f"{split}-labels-idx1-ubyte.gz", 1)
        if len(x) != len(y):
            raise UsageError(f"{d}: {split} has {len(x)} images but {len(y)} labels; reinstall dataset-fashion-mnist")
        images.append(x)
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def builtin_images_path(limit: int | None = None) -> Path:
    tag = "" if limit is None else f"-first{limit}"
    return cache_dir() / f"fashion-mnist-{SIDE}px-v{BUILTIN_VERSION}{tag}"


def builtin_images(*, limit: int | None = None, progress: bool = True) -> Path:
    """Path of the prepared built-in image corpus, building it on first use (~2 s).

    ``limit`` keeps the first N training images and the first N // 6 test images (a
    small corpus for tests). Safe to call from several processes at once."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    out = builtin_images_path(limit)
    with build_once(out, read_meta) as ready:
        if ready:
            return out
        images, labels = load_fashion_mnist()
        train = np.arange(60000) if limit is None else np.arange(min(limit, 60000))
        test = 60000 + (np.arange(10000) if limit is None else np.arange(min(max(limit // 6, 1), 10000)))
        keep = np.concatenate([train, test])
        padded = np.pad(images[keep], ((0, 0), (PAD, PAD), (PAD, PAD)))[..., None]  # black, as the photos' background
        names = [f"train-images-idx3-ubyte.gz:{i}" for i in train] + [f"t10k-images-idx3-ubyte.gz:{i - 60000}"
                                                                      for i in test]
        if progress:
            print(f"building the built-in image corpus (Fashion-MNIST, {len(keep):,} photos) into {out}",
                  file=sys.stderr, flush=True)
        source = {"dataset": "fashion-mnist", "debian_package": "dataset-fashion-mnist", "dir": str(source_dir()),
                  "version": BUILTIN_VERSION, "limit": limit}
        extra = {"splits": {"train": [0, len(train)], "t10k": [len(train), len(keep)]},
                 "licence": "MIT (Expat), Copyright 2017 Zalando SE"}
        return write_image_corpus(out, iter(padded), names=names, labels=labels[keep].tolist(), short_side=SIDE,
                                  channels=1, classes=CLASSES, source=source, extra=extra, force=True,
                                  progress=progress)
