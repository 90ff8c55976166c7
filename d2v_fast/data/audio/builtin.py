"""The built-in speech corpus: the built-in text corpus's docstrings, read aloud by eSpeak NG.

The PyPI package ``espeakng-loader`` ships ``libespeak-ng`` (GPL-3.0-or-later) and its voice
data; we call it through ctypes in synchronous mode (``espeak_Initialize`` with
AUDIO_OUTPUT_SYNCHRONOUS, a synth callback that collects the 16-bit samples,
``espeak_Synth``), so the corpus needs no download and no system package. Every utterance
gets its own English voice and variant, speaking rate and pitch, drawn from its index, so
the corpus is the same on every machine with the same Python and eSpeak NG.

Synthetic speech is not human speech: it is here so that a fresh machine can pretrain,
test and benchmark the speech recipes end to end; use real recordings for real models.
Synthesis runs at ~250x real time per core and resampling 22.05 -> 16 kHz at ~150x, so
the default (``BUILTIN_SPEECH_UTTERANCES``, ~5 h) builds in a few minutes on two cores and
a test-sized one (a few dozen utterances) in seconds. Cached like the text corpus under
``$D2V_FAST_CACHE``.

    python -m d2v_fast.data.audio.builtin [--utterances N] [--workers N]
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import UsageError, cli_entry
from ..builtin import build_once, cache_dir, python_tag
from ..publish import default_workers
from ..text.builtin import stdlib_labelled_docstrings
from .corpus import SAMPLE_RATE, read_audio_meta
from .prepare import MAX_SECONDS, prepare_audio_corpus
from .resample import resample

BUILTIN_SPEECH_VERSION = 1  # bump when the text selection or the voice draw below changes
BUILTIN_SPEECH_UTTERANCES = 2000
# English voices of eSpeak NG 1.52 and voice variants (espeak-ng-data/lang/gmw, voices/!v)
VOICES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2")
RATE_WPM = (130, 200)   # espeak's default is 175 words per minute
PITCH = (25, 75)        # 0-100, default 50
CHUNK_CHARS = (80, 260)  # ~5-16 s of speech at 175 wpm
# Docstrings of the standard-library modules sorting from here on are kept for the speech
# probe's texts (``probe_task.py``), never read into a built-in corpus. They come last in
# the docstrings' order (~650 of ~6,100 passages on Python 3.11), so every corpus of up to
# the ~5,400 passages before them is the same as before they were set aside.
RESERVED_FROM = "unittest"

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3


class Espeak:
    """One process's eSpeak NG engine (the library keeps global state: one per process)."""

    _instance = None

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise UsageError("the built-in speech corpus needs the `espeakng-loader` package; "
                             "install it with `pip install espeakng-loader` (a project dependency)") from None
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        # the path argument is the directory that holds espeak-ng-data
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent, 0)
        if self.sample_rate <= 0:
            raise UsageError(f"eSpeak NG did not start (data in {data_parent.decode()}); reinstall espeakng-loader")
        self.version = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def collect(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
            return 0  # 0 = go on

        self._callback = callback_type(collect)  # kept alive as long as the engine
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    @classmethod
    def get(cls) -> "Espeak":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """int16 samples at ``self.sample_rate`` (22050 Hz)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        data = text.encode()
        self._chunks = []
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with code {err}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


# ----------------------------------------------------------------------------- text
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def speakable_chunks(doc: str) -> list[str]:
    """Prose pieces of a docstring, cut at sentence ends into CHUNK_CHARS-sized texts.
    Doctest, indented (code) and table lines are left out: read aloud they are noise."""
    lines = []
    for line in doc.splitlines():
        s = line.strip()
        if not s or s.startswith((">>>", "...", "|", "+-", "--", "==")) or line.startswith((" ", "\t")):
            lines.append("")  # a paragraph break
            continue
        lines.append(s)
    chunks = []
    for para in " ".join(x if x else "\n" for x in lines).split("\n"):
        para = " ".join(para.split())
        if len(para) < CHUNK_CHARS[0]:
            continue
        cur = ""
        for sentence in _SENTENCE_END.split(para):
            if cur and len(cur) + 1 + len(sentence) > CHUNK_CHARS[1]:
                chunks.append(cur)
                cur = ""
            cur = f"{cur} {sentence}".strip()
        if len(cur) >= CHUNK_CHARS[0]:
            chunks.append(cur)
    # a short piece left before a long sentence is dropped; one very long "sentence" is cut
    return [c[: 2 * CHUNK_CHARS[1]] for c in chunks if len(c) >= CHUNK_CHARS[0]]


def speech_texts(n: int, workers: int | None = None, progress: bool = False) -> list[str]:
    """The first ``n`` speakable chunks of the standard library's docstrings (the reserved
    modules' left out)."""
    texts: list[str] = []
    for module, doc in stdlib_labelled_docstrings(workers, progress=progress):
        if module >= RESERVED_FROM:  # the speech probe's texts
            continue
        texts.extend(speakable_chunks(doc))
        if len(texts) >= n:
            break
    if len(texts) < n:
        raise UsageError(f"--utterances {n}: the standard library's docstrings give only {len(texts)} "
                         f"speakable texts (those of modules from {RESERVED_FROM!r} on are kept for the "
                         f"speech probe); ask for at most that many")
    return texts[:n]


def voice_for(index: int) -> dict:
    """The voice, rate and pitch of utterance ``index`` (a function of the index only)."""
    rng = np.random.default_rng([BUILTIN_SPEECH_VERSION, index])
    return {"voice": f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}",
            "rate": int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
            "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1))}


def _synth_job(job: tuple[int, str]) -> tuple[str, np.ndarray, int]:
    index, text = job
    engine = Espeak.get()
    v = voice_for(index)
    wav = engine.synthesize(text, **v).astype(np.float32) / 32768.0
    # resampled here, in the worker, so that the parent only writes
    return f"utt{index:06d} {v['voice']} rate={v['rate']} pitch={v['pitch']}", \
        resample(wav, engine.sample_rate, SAMPLE_RATE), SAMPLE_RATE


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def synthesized(texts: list[str], workers: int, job=None) -> Iterator:
    """``job((index, text))`` for every text, in order, in ``workers`` spawned processes
    (``job`` a module-level function; the corpus's ``_synth_job`` by default)."""
    job = job or _synth_job
    jobs = list(enumerate(texts))
    if workers <= 1:
        yield from map(job, jobs)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap(job, jobs, chunksize=8)


# ----------------------------------------------------------------------------- the corpus
def espeak_announced(progress: bool, what) -> str:
    """eSpeak NG's version, asked before anything is built (one line when it is missing);
    ``what(version)`` is said on stderr first when ``progress``."""
    version = Espeak.get().version
    if progress:
        print(what(version), file=sys.stderr, flush=True)
    return version


def builtin_speech_path(utterances: int = BUILTIN_SPEECH_UTTERANCES) -> Path:
    # "-max60s": utterances kept up to the preparation cap (corpora built before were cut at 20 s)
    return cache_dir() / f"speech-espeak-stdlib-{python_tag()}-v{BUILTIN_SPEECH_VERSION}-n{utterances}-max{MAX_SECONDS:g}s"


def builtin_speech_corpus(utterances: int = BUILTIN_SPEECH_UTTERANCES, *, workers: int | None = None,
                          progress: bool = True) -> Path:
    """Path of the prepared built-in speech corpus, building it on first use. Safe to call
    from several processes at once (one builds, the others wait on a lock)."""
    if utterances < 1:
        raise UsageError(f"--utterances {utterances}: must be at least 1")
    out = builtin_speech_path(utterances)
    workers = default_workers() if workers is None else workers
    with build_once(out, read_audio_meta) as ready:
        if ready:
            return out
        engine_version = espeak_announced(progress, lambda v: (
            f"building the built-in speech corpus ({utterances} standard-library docstring passages read "
            f"by eSpeak NG {v}) into {out}"))
        texts = speech_texts(utterances, workers, progress=progress)
        source_id = (f"espeak-ng:{engine_version}:python-stdlib-docstrings:{sys.version.split()[0]}"
                     f":v{BUILTIN_SPEECH_VERSION}:n{utterances}")
        extra = {"builtin": {"what": "Python standard-library docstrings read by eSpeak NG (synthetic speech)",
                             "engine": f"eSpeak NG {engine_version} via espeakng-loader (GPL-3.0-or-later)",
                             "voices": list(VOICES), "variants": list(VARIANTS),
                             "rate_wpm": list(RATE_WPM), "pitch": list(PITCH)}}
        return prepare_audio_corpus(out, utterances=synthesized(texts, workers), source_id=source_id,
                                    min_seconds=2.0, max_seconds=MAX_SECONDS, force=True, progress=progress,
                                    extra_meta=extra, expected=len(texts))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2v_fast.data.audio.builtin",
                                description="Build (or find) the built-in speech corpus and print its path.")
    p.add_argument("--utterances", type=int, default=BUILTIN_SPEECH_UTTERANCES, help="corpus size")
    p.add_argument("--workers", type=int, default=default_workers(), help="synthesis processes")
    p.add_argument("--quiet", action="store_true")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(builtin_speech_corpus(args.utterances, workers=args.workers, progress=not args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
