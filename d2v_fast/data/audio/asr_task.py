"""Speech recognition tasks for fine-tuning (``d2v_fast.finetune``): the built-in one
(held-out passages of the standard library's docstrings read by eSpeak NG, transcripts
known) and a user's (a JSON-lines file of ``{"audio": PATH, "text": ...}``).

The built-in task is never part of pretraining on the built-in speech corpus:
- its texts are taken only from the docstrings of the standard-library modules that sort
  from ``RESERVED_FROM`` ('unittest') on, which ``builtin.speech_texts`` skips for every
  built-in speech corpus (a run's corpus that read no more passages than come before them
  cannot hold these texts: ``meta.json`` ``asr`` records that number);
- voices, rates and pitches come from their own seeded stream, neither ``voice_for``'s nor
  the speech probe's.

Each text is a run of plain words (letters and apostrophes, sentence punctuation only at a
word's end: what eSpeak NG reads as written) of ``PIECE_CHARS`` characters, ~2-5 s of
speech; its transcript is ``normalize_transcript`` of it (lower case, punctuation dropped).
Every fifth utterance is a test utterance, the others train. The task is cached like the
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
from ..builtin import build_once, cache_dir, stdlib_labelled_docstrings
from .builtin import PITCH, RATE_WPM, RESERVED_FROM, VARIANTS, VOICES, Espeak, speakable_chunks, synthesized
from .corpus import SAMPLE_RATE, AudioCorpus, open_audio_corpus
from .prepare import SILENCE_VAR

ASR_VERSION = 1           # bump when the texts, the draws or the splits below change
ASR_UTTERANCES = 600      # 480 train, 120 test
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
    texts, available = [], 0
    for module, doc in stdlib_labelled_docstrings(workers, progress=progress):
        chunks = speakable_chunks(doc)
        if module < RESERVED_FROM:
            available += len(chunks)
            continue
        texts.extend(piece for chunk in chunks for piece in plain_pieces(chunk))
    if len(texts) < n:
        raise UsageError(f"speech recognition task: the reserved docstrings give only {len(texts)} texts, {n} "
                         f"asked for; ask for fewer utterances")
    pick = np.linspace(0, len(texts) - 1, n).round().astype(int)
    return [texts[i] for i in pick], available


def asr_voice(index: int) -> dict:
    rng = np.random.default_rng([_STREAM, ASR_VERSION, index])
    return {"voice": f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}",
            "rate": int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
            "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1))}


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
    from ..prepare import default_workers
    from .prepare import prepare_audio_corpus

    if utterances < 2 * TEST_EVERY:
        raise UsageError(f"speech recognition task: {utterances} utterances; need at least {2 * TEST_EVERY}")
    out = builtin_asr_path(utterances)
    workers = default_workers() if workers is None else workers
    with build_once(out, lambda p: read_asr_corpus(p) is not None) as ready:
        if ready:
            return out
        version = Espeak.get().version  # fails early, with one line, when espeak is missing
        if progress:
            print(f"building the built-in speech recognition task ({utterances} utterances by eSpeak NG {version}) "
                  f"into {out}", file=sys.stderr, flush=True)
        texts, available = asr_texts(utterances, workers, progress=progress)
        record: dict = {}

        def kept():
            transcripts, splits = [], []
            for (name, wav), (i, text) in zip(synthesized(texts, workers, _synth), enumerate(texts)):
                if wav is not None:
                    transcripts.append(normalize_transcript(text))
                    splits.append("test" if i % TEST_EVERY == 0 else "train")
                    yield name, wav, SAMPLE_RATE
            # prepare_audio_corpus reads extra_meta after the last utterance
            record["asr"] = {"transcripts": transcripts, "splits": splits, "texts_from_modules": f">= {RESERVED_FROM!r}",
                             "pretraining_texts_available": available, "engine": f"eSpeak NG {version}", "test_every": TEST_EVERY}

        source_id = (f"espeak-ng:{version}:python-stdlib-docstrings:{sys.version.split()[0]}:speech-asr"
                     f":v{ASR_VERSION}:n{utterances}")
        prepare_audio_corpus(out, utterances=kept(), source_id=source_id, min_seconds=SECONDS[0],
                             max_seconds=SECONDS[1], force=True, progress=progress, extra_meta=record,
                             expected=len(texts))
        read_asr_corpus(out)
        return out


@dataclass
class AsrTask:
    """Utterances (``audio[i]``: float32 samples at 16 kHz), transcripts and splits."""

    audio: AudioCorpus | list
    transcripts: list[str]
    splits: list[str]
    source: str
    record: dict

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]


def read_asr_corpus(path: str | Path, *, flag: str = "speech recognition task") -> AsrTask:
    corpus = open_audio_corpus(path, flag=flag)
    rec = corpus.meta.get("asr")
    if not isinstance(rec, dict) or len(rec.get("transcripts", ())) != len(corpus) \
            or len(rec.get("splits", ())) != len(corpus):
        raise UsageError(f"{flag} {path}: holds no transcripts for its {len(corpus)} utterances (meta.json 'asr'); "
                         f"delete it so that it is rebuilt")
    return AsrTask(audio=corpus, transcripts=list(rec["transcripts"]), splits=list(rec["splits"]), source=str(path),
                   record=rec)


# ----------------------------------------------------------------------------- a user's task
USER_MAX_SECONDS = 20.0  # the published recipes' longest training utterance


def read_user_asr_task(path: str | Path, *, flag: str = "--task") -> AsrTask:
    """A JSON-lines file of ``{"audio": PATH, "text": TRANSCRIPT[, "split": "train"|"test"]}``
    (PATH relative to the file's directory; without splits every fifth line is test).
    UsageError naming the file (and line) for anything unusable."""
    import json

    from .prepare import decode, to_corpus_audio

    path = Path(path)
    needs = "'audio' (a file path) and 'text' (its transcript)"
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file; give a .jsonl file with {needs} on every line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8 JSON lines") from None
    waves, transcripts, given = [], [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{n}: not a JSON object ({err.msg}); one object per line with {needs}") from None
        if not isinstance(obj, dict) or "audio" not in obj or "text" not in obj:
            found = ", ".join(repr(k) for k in list(obj)[:5]) if isinstance(obj, dict) else "not an object"
            raise UsageError(f"{path}:{n}: needs {needs} (found {found or 'none'}); add the missing field")
        name, text, split = obj["audio"], obj["text"], obj.get("split")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{path}:{n}: 'audio' must be a file path (a non-empty string)")
        if not isinstance(text, str) or not normalize_transcript(text):
            raise UsageError(f"{path}:{n}: 'text' {text!r} is empty (no letters or digits); give the utterance's "
                             f"transcript or remove the line")
        if split not in (None, "train", "test"):
            raise UsageError(f"{path}:{n}: 'split' {split!r}: expected train, test or no split field")
        audio = path.parent / name
        if not audio.is_file():
            raise UsageError(f"{path}:{n}: audio file {audio} does not exist; paths are relative to the task file")
        wav, rate = decode(audio)
        wav = to_corpus_audio(wav, rate, str(audio))
        if wav is None:
            raise UsageError(f"{audio}: silent; remove it from {path}")
        waves.append(wav[:int(USER_MAX_SECONDS * SAMPLE_RATE)])
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
