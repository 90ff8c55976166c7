"""Speech recognition tasks for fine-tuning (``d2v_fast.finetune``): the built-in one
(held-out passages of the standard library's docstrings read by eSpeak NG, transcripts
known) and a user's (a JSON-lines file of ``{"audio": PATH, "text": ...}``).

The built-in task is never part of pretraining on the built-in speech corpus:
- its texts are taken only from the docstrings of the standard-library modules that sort
  from ``RESERVED_FROM`` ('unittest') on, and only from passages that no earlier module's
  docstring also holds (7 such on Python 3.11), which ``builtin.speech_texts`` skips for every
  built-in speech corpus (a run's corpus that read no more passages than come before them
  cannot hold these texts: ``meta.json`` ``asr`` records that number);
- rates and pitches come from their own seeded stream, neither ``voice_for``'s nor the
  speech probe's.

One voice reads them all (``ASR_VOICE``, at ``ASR_RATE_WPM`` and ``ASR_PITCH``): at the
tiny scale's few hundred steps, the 84 voice and variant pairs of the pretraining corpus
left the models near the best constant output (docs/finetune.md).

Each text is a run of plain words (letters and apostrophes, sentence punctuation only at a
word's end: what eSpeak NG reads as written) of ``PIECE_CHARS`` characters, ~2-5 s of
speech; its transcript is ``normalize_transcript`` of it (lower case, punctuation dropped).
Every fifth utterance is a test utterance, the others train. A few
passages (licence notices) recur in several modules' docstrings, so some texts repeat in
other voices: of the default 600, 580 are distinct and 6 of the 120 test transcripts are
also train transcripts. The task is cached like the
corpus, under ``$D2V_FAST_CACHE``, as a prepared speech corpus whose ``meta.json`` key
``asr`` holds each utterance's transcript and split.
"""
from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..builtin import cache_dir
from ..text.builtin import stdlib_labelled_docstrings
from .builtin import RESERVED_FROM, Espeak, speakable_chunks
from .corpus import SAMPLE_RATE, AudioCorpus
from .probe_task import SplitIndices, build_synthesized_task, task_audio, task_corpus
from .prepare import SILENCE_VAR

ASR_VERSION = 3           # bump when the texts, the draws or the splits below change (2: shared passages
                          # out; 3: one voice)
ASR_UTTERANCES = 600      # 480 train, 120 test
ASR_VOICE = "en-us"       # eSpeak NG's default English voice, no variant
ASR_RATE_WPM = (140, 180)
ASR_PITCH = (40, 60)
PIECE_CHARS = (30, 70)
SECONDS = (1.0, 8.0)      # kept utterances' length
TEST_EVERY = 5            # utterance i is a test utterance when i % TEST_EVERY == 0
_STREAM = 0x6173_7220     # the task's own draw stream ("asr ")
_PLAIN_WORD = re.compile(r"^[A-Za-z]+(?:'[A-Za-z]+)?[,.;:!?]?$")


def normalize_transcript(text: str) -> str:
    """Lower case; every character that is neither a letter, a digit nor an apostrophe
    becomes a space; runs of spaces become one (the character vocabulary's alphabet)."""
    text = unicodedata.normalize("NFC", text).lower()
    return " ".join("".join(c if c.isalnum() or c == "'" else " " for c in text).split())


def plain_pieces(chunk: str) -> list[str]:
    """Runs of plain words of ``chunk`` cut at word ends into PIECE_CHARS-long texts; a word
    that is not plain (a dotted name, a number, a symbol) ends a run."""
    out, cur = [], ""
    for word in chunk.split():
        if not _PLAIN_WORD.match(word):
            cur = ""
            continue
        cur = f"{cur} {word}".strip()
        if len(cur) >= PIECE_CHARS[0]:
            if len(cur) <= PIECE_CHARS[1]:
                out.append(cur)
            cur = ""
    return out


def asr_texts(n: int, workers: int | None = None, progress: bool = False) -> tuple[list[str], int]:
    """``n`` texts from the reserved modules' docstrings, spread over all of them, and the
    number of speakable passages a built-in speech corpus can draw on (those before them)."""
    texts, available, eligible = [], 0, set()
    for module, doc in stdlib_labelled_docstrings(workers, progress=progress):
        chunks = speakable_chunks(doc)
        if module < RESERVED_FROM:  # these come first in the docstrings' order
            available += len(chunks)
            eligible.update(chunks)
            continue
        # a passage that also occurs in an earlier module's docstring (a paragraph two modules
        # share) could be read into a pretraining corpus: left out
        texts.extend(piece for chunk in chunks if chunk not in eligible for piece in plain_pieces(chunk))
    if len(texts) < n:
        raise UsageError(f"speech recognition task: the reserved docstrings give only {len(texts)} texts, {n} "
                         f"asked for; ask for fewer utterances")
    pick = np.linspace(0, len(texts) - 1, n).round().astype(int)
    return [texts[i] for i in pick], available


def asr_voice(index: int) -> dict:
    rng = np.random.default_rng([_STREAM, ASR_VERSION, index])
    return {"voice": ASR_VOICE, "rate": int(rng.integers(ASR_RATE_WPM[0], ASR_RATE_WPM[1] + 1)),
            "pitch": int(rng.integers(ASR_PITCH[0], ASR_PITCH[1] + 1))}


def _synth(job: tuple[int, str]) -> tuple[str, np.ndarray | None]:
    """Worker: utterance ``index``'s name and its 16 kHz samples (None outside SECONDS or silent)."""
    from .resample import resample

    index, text = job
    engine = Espeak.get()
    v = asr_voice(index)
    wav = resample(engine.synthesize(text, **v).astype(np.float32) / 32768.0, engine.sample_rate, SAMPLE_RATE)
    ok = SECONDS[0] * SAMPLE_RATE <= len(wav) <= SECONDS[1] * SAMPLE_RATE and wav.var() > SILENCE_VAR
    return f"asr{index:05d} {v['voice']} rate={v['rate']} pitch={v['pitch']}", (wav if ok else None)


def builtin_asr_path(utterances: int = ASR_UTTERANCES) -> Path:
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / f"speech-asr-espeak-{tag}-v{ASR_VERSION}-n{utterances}"


def builtin_asr_task(utterances: int = ASR_UTTERANCES, *, workers: int | None = None, progress: bool = True) -> Path:
    """Path of the built-in speech recognition task, building it on first use (a lock makes
    that safe from several processes)."""
    if utterances < 2 * TEST_EVERY:
        raise UsageError(f"speech recognition task: {utterances} utterances; need at least {2 * TEST_EVERY}")

    def record(names, kept, texts, available, engine):
        return {"asr": {"transcripts": [normalize_transcript(texts[i]) for i in kept],
                        "splits": ["test" if i % TEST_EVERY == 0 else "train" for i in kept],
                        "texts_from_modules": f">= {RESERVED_FROM!r}", "pretraining_texts_available": available,
                        "engine": engine, "test_every": TEST_EVERY}}

    return build_synthesized_task(
        builtin_asr_path(utterances), kind=f"speech-asr:v{ASR_VERSION}",
        describe=f"speech recognition task ({utterances} utterances)",
        texts=lambda w: asr_texts(utterances, w, progress=progress), job=_synth, record=record,
        reader=read_asr_corpus, seconds=SECONDS, workers=workers, progress=progress)


@dataclass
class AsrTask(SplitIndices):
    """Utterances (``audio[i]``: float32 samples at 16 kHz), transcripts and splits."""

    audio: AudioCorpus | list
    transcripts: list[str]


def read_asr_corpus(path: str | Path, *, flag: str = "speech recognition task") -> AsrTask:
    corpus, rec = task_corpus(path, "asr", ("transcripts", "splits"), flag=flag, what="transcripts")
    return AsrTask(audio=corpus, transcripts=list(rec["transcripts"]), splits=list(rec["splits"]), source=str(path),
                   record=rec)


# ----------------------------------------------------------------------------- a user's task
def read_user_asr_task(path: str | Path, *, flag: str = "--task") -> AsrTask:
    """A JSON-lines file of ``{"audio": PATH, "text": TRANSCRIPT[, "split": "train"|"test"]}``
    (PATH relative to the file's directory; without splits every fifth line is test).
    UsageError naming the file (and line) for anything unusable."""
    from ..probe_task import json_objects

    path = Path(path)
    needs = "'audio' (a file path) and 'text' (its transcript)"
    waves, transcripts, given = [], [], []
    for n, obj in json_objects(path, flag=flag, needs=needs):
        if "audio" not in obj or "text" not in obj:
            found = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
            raise UsageError(f"{path}:{n}: needs {needs} (found {found}); add the missing field")
        text, split = obj["text"], obj.get("split")
        if not isinstance(text, str) or not normalize_transcript(text):
            raise UsageError(f"{path}:{n}: 'text' {text!r} is empty (no letters or digits); give the utterance's "
                             f"transcript or remove the line")
        if split not in (None, "train", "test"):
            raise UsageError(f"{path}:{n}: 'split' {split!r}: expected train, test or no split field")
        waves.append(task_audio(path, n, obj["audio"]))
        transcripts.append(normalize_transcript(text))
        given.append(split)
    if any(s is None for s in given) and any(s is not None for s in given):
        raise UsageError(f"{path}: some lines have a 'split' field and some do not; give it on every line or none")
    splits = [s if s is not None else ("test" if i % TEST_EVERY == 0 else "train") for i, s in enumerate(given)]
    for s in ("train", "test"):
        if s not in splits:
            raise UsageError(f"{flag} {path}: no {s} utterances ({len(splits)} in all); give at least "
                             f"{2 * TEST_EVERY} lines, or split fields with both train and test")
    return AsrTask(audio=waves, transcripts=transcripts, splits=splits, source=str(path),
                   record={"transcripts": "user's"})
