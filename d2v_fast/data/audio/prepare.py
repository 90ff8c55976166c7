"""Speech corpus preparation: wav/flac/ogg files -> 16 kHz mono normalised sample shards.

    python -m d2v_fast.data.audio --input PATH... --out DIR [--min-seconds 2] [--max-seconds 60]
                                  [--dtype float16|float32] [--workers N] [--skip-bad] [--force]

Per file: decoded with ``soundfile`` (libsndfile: wav, flac, ogg/vorbis, ...), channels
averaged to mono, resampled to 16 kHz (``resample.py``), normalised to zero mean and unit
variance over the whole utterance (at preparation time, as Hugging Face's
``Wav2Vec2FeatureExtractor`` does: ``(x - mean) / sqrt(var + 1e-7)``), then dropped when
shorter than ``--min-seconds`` or silent (the published recipe drops < 2 s), and kept whole up
to a cap of ``--max-seconds`` (60 by default; longer ones keep their first 60 s). The loader
then crops: every batch to its shortest utterance, at most ``--data.max_samples`` (the
published 20 s), each utterance's window at a random offset keyed by (seed, epoch, index), so
a long utterance shows a different 20 s each epoch, as the published loader's random crop
does. Nothing is ever padded.

A file that cannot be decoded, is truncated (fewer frames than its header declares, or an
Ogg stream without its end page), holds NaN/inf, or has a rate that cannot be resampled stops
the run with one line naming it (exit 2) unless ``--skip-bad`` turns that into a warning.
Everything is written into a hidden staging directory beside ``--out`` and renamed into
place when complete (``meta.json`` last), like the text corpus; re-running with the same
inputs and options is a no-op.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ... import __version__
from ...errors import UsageError, cli_entry
from ..inputs import expand_inputs
from ..publish import (_describe_files, _say, already_prepared, corpus_parser, default_workers, finish_corpus,
                       new_staging)
from .corpus import DTYPES, FORMAT, FORMAT_VERSION, SAMPLE_RATE, AudioShardWriter, read_audio_meta
from .resample import MAX_FILTER_TAPS, filter_taps, resample

MAX_SECONDS = 60.0  # the cap on a stored utterance; the loader crops training windows from it

SUFFIXES = (".wav", ".flac", ".ogg", ".oga")
MIN_INPUT_RATE = 8000  # below telephone band the speech content is gone; upsampling cannot restore it
NORM_EPS = 1e-7        # Wav2Vec2FeatureExtractor's
SILENCE_VAR = 1e-10    # int16 silence with dither stays above this; digital zero does not
DEFAULT_SHARD_SAMPLES = 1 << 28  # 512 MiB of float16, ~4.7 h


# ----------------------------------------------------------------------------- inputs
def expand_audio_inputs(paths: Sequence[str | os.PathLike], *, flag: str = "--input") -> list[Path]:
    """Files, directories (recursive) and globs -> sorted, de-duplicated audio files."""
    return expand_inputs(paths, accept=lambda p: p.suffix.lower() in SUFFIXES, suffixes=SUFFIXES, flag=flag,
                         noun="audio files")


# ----------------------------------------------------------------------------- one utterance
def declared_frames(path: Path) -> int | None:
    """The frame count a file's header declares, where the format has one and the writer
    filled it in: WAV/RF64 (the ``data`` chunk's size over the block size) and FLAC (STREAMINFO's
    total samples). None for other formats and for streaming writers' placeholders (0 or
    0xFFFFFFFF). libsndfile itself reads what is there and says nothing of the rest."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:4] == b"fLaC":
                block = head[4:] + f.read(30)  # the first metadata block: its header and STREAMINFO
                if len(block) < 38 or block[0] & 0x7F != 0:
                    return None
                info = block[4:]
                return (((info[13] & 0x0F) << 32) | int.from_bytes(info[14:18], "big")) or None
            if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return None
            block_align = big_data = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"data":
                    if size == 0xFFFFFFFF and big_data is not None:  # RF64: the size is in ds64
                        size = big_data
                    return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
                body = f.read(size + (size & 1)) if cid in (b"fmt ", b"ds64") else f.seek(size + (size & 1), 1)
                if cid == b"fmt " and len(body) >= 14:
                    block_align = struct.unpack("<H", body[12:14])[0]
                elif cid == b"ds64" and len(body) >= 16:
                    big_data = struct.unpack("<Q", body[8:16])[0]
    except OSError:
        return None


def _ogg_ends(path: Path) -> bool:
    """Whether an Ogg file's last page carries the end-of-stream flag (a cut file's does not)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 65536 - 282))  # the last page starts within its maximum size
        tail = f.read()
    at = tail.rfind(b"OggS")
    return at >= 0 and len(tail) > at + 5 and bool(tail[at + 5] & 0x04)


def decode(path: Path) -> tuple[np.ndarray, int]:
    """``(mono float32 samples, rate)``; UsageError naming the file when it cannot be read
    or holds fewer frames than its header declares (a file cut short)."""
    import soundfile as sf

    fix = "re-encode it (e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.flac`) or remove it"
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(f"{path}: cannot be decoded as audio ({msg}); {fix}") from None
    declared = declared_frames(path)
    if declared is not None and len(data) < declared:
        raise UsageError(f"{path}: truncated: its header declares {declared:,} frames, {len(data):,} could be "
                         f"read; copy or export it again, or pass --skip-bad to leave it out")
    if declared is None and path.suffix.lower() in (".ogg", ".oga") and not _ogg_ends(path):
        raise UsageError(f"{path}: truncated: its Ogg stream has no end page ({len(data):,} frames could be read); "
                         f"copy or export it again, or pass --skip-bad to leave it out")
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0], int(rate)


def to_corpus_audio(wav: np.ndarray, rate: int, source: str) -> np.ndarray | None:
    """Resample to 16 kHz and normalise; None for silence. UsageError for a rate or values
    that cannot be used."""
    if rate < MIN_INPUT_RATE:
        raise UsageError(f"{source}: sample rate {rate} Hz is below {MIN_INPUT_RATE} Hz, too low for "
                         f"speech at {SAMPLE_RATE} Hz; use a recording made at {MIN_INPUT_RATE} Hz or more")
    if filter_taps(rate, SAMPLE_RATE) > MAX_FILTER_TAPS:
        raise UsageError(f"{source}: sample rate {rate} Hz has no small ratio to {SAMPLE_RATE} Hz, so it "
                         f"cannot be resampled here; convert it first (e.g. `sox IN -r 16000 OUT.flac`)")
    if not np.isfinite(wav).all():
        raise UsageError(f"{source}: holds NaN or infinite samples; re-export the recording")
    x = resample(wav, rate, SAMPLE_RATE).astype(np.float64)
    var = x.var() if x.size else 0.0
    if var < SILENCE_VAR:
        return None
    return ((x - x.mean()) / np.sqrt(var + NORM_EPS)).astype(np.float32)


def _load_file(args: tuple[str, bool]) -> tuple[str, np.ndarray | None, str | None]:
    """Worker: ``(path, samples or None, why None)``."""
    path, skip_bad = args
    try:
        wav, rate = decode(Path(path))
        return path, to_corpus_audio(wav, rate, path), "silent"
    except UsageError as err:
        if not skip_bad:
            raise
        return path, None, str(err)


def _loaded(files: Sequence[Path], workers: int, skip_bad: bool) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    jobs = [(str(f), skip_bad) for f in files]
    if workers <= 1 or len(jobs) < 2:
        yield from map(_load_file, jobs)
        return
    # spawn: the parent may hold torch threads, which fork would copy half-alive
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap(_load_file, jobs, chunksize=4)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


# ----------------------------------------------------------------------------- main entry
def prepare_audio_corpus(out: str | os.PathLike, *, inputs: Sequence[str] | None = None,
                         utterances: Iterable[tuple[str, np.ndarray, int]] | None = None,
                         source_id: str | None = None, min_seconds: float = 2.0, max_seconds: float = MAX_SECONDS,
                         dtype: str = "float16", workers: int | None = None, skip_bad: bool = False,
                         shard_samples: int = DEFAULT_SHARD_SAMPLES, force: bool = False,
                         progress: bool = True, extra_meta: dict | None = None, expected: int | None = None) -> Path:
    """Build a speech corpus from audio files (``inputs``) or in-memory
    ``(name, samples, rate)`` triples (``utterances`` with a stable ``source_id``; ``expected``:
    how many, for the progress bar). ``extra_meta`` is read only after the last utterance, so
    an ``utterances`` generator may fill it (the speech probe records the labels of what it
    yielded)."""
    out = Path(out)
    if (inputs is None) == (utterances is None):
        raise ValueError("pass exactly one of inputs= or utterances=")
    if utterances is not None and not source_id:
        raise ValueError("utterances= needs a source_id that identifies them")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not 0 < min_seconds <= max_seconds:
        raise UsageError(f"--min-seconds {min_seconds} / --max-seconds {max_seconds}: need "
                         f"0 < min <= max")
    if shard_samples < 1:
        raise UsageError(f"--shard-samples {shard_samples}: must be positive")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    min_samples, max_samples = int(round(min_seconds * SAMPLE_RATE)), int(round(max_seconds * SAMPLE_RATE))

    files = expand_audio_inputs(inputs) if inputs is not None else []
    source = {"inputs": _describe_files(files) if inputs is not None else [source_id],
              "min_samples": min_samples, "max_samples": max_samples, "dtype": dtype,
              "shard_samples": shard_samples, "skip_bad": skip_bad}
    if already_prepared(out, source, force=force, read=read_audio_meta, progress=progress):
        return out

    if inputs is not None:
        names = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        items = _loaded(files, workers, skip_bad)
        expected = len(files)
    else:
        names = source_id
        items = ((name, to_corpus_audio(np.asarray(wav, np.float32), rate, name), "silent")
                 for name, wav, rate in utterances)

    staging = new_staging(out)
    writer = None
    try:
        t0 = time.perf_counter()
        writer = AudioShardWriter(staging, dtype, shard_samples)
        kept = total = cropped = 0
        dropped = {"shorter than min": 0, "silent": 0, "unreadable": 0}
        lengths = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="utterances", unit=" utt", total=expected, file=sys.stderr, dynamic_ncols=True)
        for name, wav, why in items:
            if bar is not None:
                bar.update(1)
            if wav is None:
                if why == "silent":
                    dropped["silent"] += 1
                else:
                    dropped["unreadable"] += 1
                    (bar.write if bar is not None else print)(f"warning: skipping {why}", file=sys.stderr)
                continue
            if len(wav) < min_samples:
                dropped["shorter than min"] += 1
                continue
            if len(wav) > max_samples:
                wav, cropped = wav[:max_samples], cropped + 1
            writer.add(wav, name)
            kept += 1
            total += len(wav)
            lengths.append(len(wav))
        if bar is not None:
            bar.close()
        if kept == 0:
            raise UsageError(f"the inputs ({names}) hold no usable utterance of at least {min_seconds:g} s "
                             f"(dropped: {', '.join(f'{v} {k}' for k, v in dropped.items() if v) or 'none'}); "
                             f"add longer recordings or lower --min-seconds")
        shards = writer.finish()
        lengths = np.asarray(lengths)
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "d2v_fast_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "modality": "audio", "sample_rate": SAMPLE_RATE, "channels": 1, "dtype": dtype,
            "normalisation": "per utterance at preparation, (x - mean) / sqrt(var + 1e-7), before cropping",
            "num_utterances": kept, "num_samples": int(total), "hours": round(total / SAMPLE_RATE / 3600, 4),
            "min_samples": int(lengths.min()), "max_samples": int(lengths.max()),
            "cropped_to_max": cropped, "dropped": dropped,
            "shards": shards, "source": source, **(extra_meta or {}),
        }
        finish_corpus(staging, out, meta)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    dt = time.perf_counter() - t0
    _say(progress, f"wrote {out}: {kept:,} utterances, {total / SAMPLE_RATE / 3600:.3f} h at {SAMPLE_RATE} Hz "
                   f"({dtype}), {len(shards)} shard(s); dropped {sum(dropped.values())}, cropped {cropped} "
                   f"in {dt:.1f}s")
    return out


def build_parser() -> argparse.ArgumentParser:
    def more(p):
        p.add_argument("--min-seconds", type=float, default=2.0, help="drop shorter utterances")
        p.add_argument("--max-seconds", type=float, default=MAX_SECONDS,
                       help="cap: keep at most the first this many seconds of an utterance (training crops "
                            "windows of --data.max_samples from what is kept)")
        p.add_argument("--dtype", choices=DTYPES, default="float16", help="sample storage type")
        p.add_argument("--workers", type=int, default=default_workers(), help="decoding processes")
        p.add_argument("--skip-bad", action="store_true",
                       help="warn about and skip undecodable or truncated files instead of stopping")
        p.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES, help="samples per shard file")
        # accepted so that `python -m d2v_fast.data.prepare --modality audio ...` can hand its
        # whole argument list over unchanged
        p.add_argument("--modality", choices=("audio",), default="audio", help=argparse.SUPPRESS)

    return corpus_parser(prog="python -m d2v_fast.data.audio", description=__doc__.split("\n\n")[0],
                         inputs=f"{'/'.join(SUFFIXES)} files, directories (searched recursively) or globs",
                         more=more)


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prepare_audio_corpus(args.out, inputs=args.input, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                         dtype=args.dtype, workers=args.workers, skip_bad=args.skip_bad,
                         shard_samples=args.shard_samples, force=args.force, progress=not args.quiet)
    return 0
