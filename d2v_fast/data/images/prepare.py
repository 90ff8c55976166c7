"""Image corpus preparation: folders of JPEG/PNG -> uint8 shards + labels + meta.json.

    python -m d2v_fast.data.images.prepare --input DIR... --out DIR [--size 256] [--workers N] [--skip-bad]

Each image is decoded once with Pillow (EXIF orientation applied, converted to RGB, alpha
dropped) and its shorter side resized to ``--size`` (bicubic), the aspect ratio kept: the
photo is stored whole, so the loader's RandomResizedCrop (to 224) draws its box from the
whole photo, with its scale range relative to the whole photo's area, as the published
pipelines do; the probe and fine-tuning take its centre square. When every image sits in a
first-level subfolder of its input directory (``DIR/<class>/<file>``, torchvision's
ImageFolder layout), the sorted folder names are the classes and each image's label is
its folder's index; otherwise there are no labels (-1).

Everything is written into a hidden staging directory beside ``--out`` and renamed into
place when complete (``meta.json`` last); a bad image (unreadable, truncated: its data ends
before the pixels its header declares, 16-bit or float pixels) stops the run with one line
naming the file, and nothing is left behind, unless ``--skip-bad`` turns that into a warning.
Re-running with the same inputs and options is a no-op.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ... import __version__
from ...errors import UsageError, cli_entry
from ..publish import _say, already_prepared, corpus_parser, default_workers, finish_corpus, new_staging
from .corpus import FORMAT, FORMAT_VERSION, ImageShardWriter, describe_sizes, read_meta

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_SIZE = 256
SHARD_BYTES = 1 << 30  # images per shard: as many as fit in 1 GiB (at least one)
# Pillow modes with 8-bit samples that convert("RGB") maps without loss of meaning.
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}


# ----------------------------------------------------------------------------- inputs
def find_images(inputs: Sequence[str]) -> tuple[list[Path], list[int], list[str] | None, list[str]]:
    """(files, labels, class names or None, names for files.txt) for directories and image files."""
    entries: list[tuple[Path, Path]] = []  # (root, file)
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UsageError(f"--input {p}: no {'/'.join(IMAGE_SUFFIXES)} images in this directory or below; "
                                 f"check the path")
            entries += [(p, f) for f in found]
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise UsageError(f"--input {p}: not a {'/'.join(IMAGE_SUFFIXES)} file; pass images or directories")
            entries.append((p.parent, p))
        else:
            raise UsageError(f"--input {p}: no such file or directory")
    rel = [f.relative_to(root) for root, f in entries]
    labelled = all(len(r.parts) >= 2 for r in rel) and all(Path(raw).is_dir() for raw in inputs)
    if labelled:
        classes = sorted({r.parts[0] for r in rel})
        lookup = {c: i for i, c in enumerate(classes)}
        labels = [lookup[r.parts[0]] for r in rel]
    else:
        classes, labels = None, [-1] * len(rel)
    return [f for _, f in entries], labels, classes, [r.as_posix() for r in rel]


def decode_image(path: Path, size: int) -> np.ndarray:
    """uint8 [height, width, 3]: decoded, oriented, RGB, shorter side resized to ``size``,
    the whole photo (aspect ratio kept).
    A file whose data ends before the pixels its header declares is refused, whatever
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says (it would fill the rest with grey)."""
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    fix = "re-save it as an 8-bit JPEG/PNG or remove it"
    declared = None
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as im:
            declared = im.size
            try:
                im.load()  # decode now: a truncated file fails here, not later
            except OSError as err:
                if "truncated" not in str(err).lower():
                    raise
                raise UsageError(f"{path}: truncated: its header declares {declared[0]}x{declared[1]} pixels, the "
                                 f"data ends before they are all decoded ({err}); copy or export it again, or pass "
                                 f"--skip-bad to leave it out") from None
            if im.size != declared:
                raise UsageError(f"{path}: decoded to {im.size[0]}x{im.size[1]} pixels, its header declares "
                                 f"{declared[0]}x{declared[1]}; {fix}")
            if im.mode not in _EIGHT_BIT_MODES:
                raise UsageError(f"{path}: pixel mode {im.mode} (16-bit or float samples) is not supported; "
                                 f"convert it to 8-bit RGB or greyscale")
            im = ImageOps.exif_transpose(im).convert("RGB")
            w, h = im.size
            # the long side truncated, as Hugging Face's image processors size it (``shortest_edge``),
            # so that an exported processor resizes a photo exactly as preparation did
            nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise UsageError(f"{path}: not an image Pillow can read; {fix}") from None
    except Image.DecompressionBombError as err:
        raise UsageError(f"{path}: too large to decode safely ({err}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as err:  # corrupt data (or a header that ends early)
        what = "truncated" if "truncated" in str(err).lower() else "cannot be decoded"
        raise UsageError(f"{path}: {what} ({err}); {fix}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _decode_task(args: tuple[str, int, bool]) -> tuple[tuple[int, ...], bytes] | str:
    """The image's shape and bytes; with ``skip_bad``, the error's text instead of raising it."""
    path, size, skip_bad = args
    try:
        pixels = decode_image(Path(path), size)
        return pixels.shape, pixels.tobytes()
    except UsageError as err:
        if not skip_bad:
            raise
        return str(err)


def _decoded(files: Sequence[Path], size: int, workers: int, skip_bad: bool = False) -> Iterator[np.ndarray | None]:
    """Each file's pixels, or None (with a warning) for a bad one under ``skip_bad``."""
    tasks = [(str(f), size, skip_bad) for f in files]
    with contextlib.ExitStack() as stack:
        if workers <= 1 or len(files) < 64:
            results = map(_decode_task, tasks)
        else:  # spawn: the parent may hold torch/OpenMP threads that fork would copy half-alive
            results = stack.enter_context(mp.get_context("spawn").Pool(workers)).imap(_decode_task, tasks, chunksize=16)
        for data in results:
            if isinstance(data, str):
                print(f"warning: skipping {data}", file=sys.stderr, flush=True)
                yield None
            else:
                shape, pixels = data
                yield np.frombuffer(pixels, dtype=np.uint8).reshape(shape)


# ----------------------------------------------------------------------------- writing
def write_image_corpus(out: Path, images: Iterable[np.ndarray], *, names: Sequence[str], labels: Sequence[int],
                       short_side: int, channels: int, classes: list[str] | None, source: dict,
                       extra: dict | None = None, force: bool = False, progress: bool = True) -> Path:
    """Write ``images`` (uint8 [h, w, channels] each, any h and w, in the order of
    ``names``/``labels``; None for one left out, whose name and label are dropped) as a
    corpus at ``out``, atomically; ``short_side`` is the shorter side they were resized to
    (recorded). ``source`` identifies the inputs (its fingerprint makes a re-run a no-op)."""
    out = Path(out)
    source = dict(source)
    if already_prepared(out, source, force=force, read=read_meta, progress=progress):
        return out
    if not names:
        raise UsageError(f"no images to write to {out}; check the inputs")
    staging = new_staging(out)
    try:
        t0 = time.perf_counter()
        writer = ImageShardWriter(staging, SHARD_BYTES)
        bar = _bar(progress, len(names))
        seen, kept, shapes = 0, [], []
        for pixels in images:
            if pixels is not None:
                if pixels.ndim != 3 or pixels.shape[2] != channels or min(pixels.shape) < 1:
                    raise ValueError(f"image {names[seen]}: shape {pixels.shape}, this corpus stores "
                                     f"[height, width, {channels}]")
                writer.add(pixels)
                kept.append(seen)
                shapes.append(pixels.shape[:2])
            seen += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if seen != len(names):
            raise RuntimeError(f"read {seen} images for {len(names)} names")
        if not kept:
            raise UsageError(f"every input image was left out (see the warnings above); nothing to write to {out}")
        n, skipped = len(kept), seen - len(kept)
        names, labels = [names[i] for i in kept], [labels[i] for i in kept]
        shards = writer.finish()
        shapes = np.asarray(shapes, dtype=np.int64).reshape(n, 2)
        np.save(staging / "shapes.npy", shapes)
        np.save(staging / "labels.npy", np.asarray(labels, dtype=np.int64))
        (staging / "files.txt").write_text("".join(name + "\n" for name in names))
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "d2v_fast_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "num_images": n, "short_side": short_side, "channels": channels, "dtype": "uint8", "layout": "HWC",
            "classes": classes, "shapes": "shapes.npy", "labels": "labels.npy", "index": "files.txt",
            "skipped": skipped, "shards": shards, **(extra or {}), "source": source,
        }
        sync = ["shapes.npy", "labels.npy", "files.txt", *(s["index"] for s in shards)]
        finish_corpus(staging, out, meta, sync=sync)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(progress, f"wrote {out}: {n:,} images of {describe_sizes(shapes, channels)}"
                   f"{f', {len(classes)} classes' if classes else ', no labels'}, {len(shards)} shard(s)"
                   f"{f'; {skipped} skipped' if skipped else ''} in {time.perf_counter() - t0:.1f}s")
    return out


def prepare_images(out: str | os.PathLike, inputs: Sequence[str], *, size: int = DEFAULT_SIZE,
                   workers: int | None = None, force: bool = False, progress: bool = True,
                   skip_bad: bool = False) -> Path:
    """Build an image corpus from directories / image files. Returns the corpus path."""
    if size < 1:
        raise UsageError(f"--size {size}: must be a positive number of pixels (e.g. 256)")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    files, labels, classes, names = find_images(inputs)
    described = []
    for f in files:
        st = f.stat()
        described.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    source = {"inputs": described, "size": size, "decoder": "Pillow RGB, shorter side bicubic (long side truncated), whole",
              **({"skip_bad": True} if skip_bad else {})}
    return write_image_corpus(Path(out), _decoded(files, size, workers, skip_bad), names=names, labels=labels,
                              short_side=size, channels=3, classes=classes, source=source, force=force,
                              progress=progress)


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(desc="images", unit=" images", total=total, file=sys.stderr, dynamic_ncols=True)


def build_parser() -> argparse.ArgumentParser:
    def more(p):
        p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                       help="the stored photos' shorter side in pixels (aspect ratio kept)")
        p.add_argument("--workers", type=int, default=default_workers(), help="decoding processes")
        p.add_argument("--skip-bad", action="store_true",
                       help="warn about and skip unreadable or truncated images instead of stopping")

    return corpus_parser(prog="python -m d2v_fast.data.images.prepare", description=__doc__.split("\n\n")[0],
                         inputs="directories (searched recursively; DIR/<class>/<image> gives labels) or image files",
                         more=more)


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prepare_images(args.out, args.input, size=args.size, workers=args.workers, force=args.force,
                   progress=not args.quiet, skip_bad=args.skip_bad)
    return 0


if __name__ == "__main__":
    sys.exit(main())
