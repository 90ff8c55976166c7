"""Speech probe tasks: the built-in one (which eSpeak NG voice variant speaks an utterance)
and a user's (a JSON-lines file of ``audio`` paths and ``label``s).

A SUPERB-style speaker identification task on synthetic speech: every utterance is read by
one of the 12 voice variants of the built-in speech corpus (``m1`` ... ``klatt2``: each its
own pitch range, formant scaling, breathiness and voicing source, i.e. a "speaker"), in one
of its 7 English accents, at a random rate and pitch, so the label is not one easy
attribute (the mean pitch, say) and the accent and text vary within every class. Every
utterance is cut to exactly ``PROBE_SECONDS`` (3 s), so batches need no padding.

Nothing here can have been seen in pretraining on the built-in speech corpus:
- the texts are passages of the docstrings of the standard-library modules that sort from
  ``RESERVED_FROM`` ('unittest') on, which ``builtin.speech_texts`` leaves out of every
  built-in speech corpus (they come last in its order: the corpora it builds are unchanged);
- voices, rates and pitches are drawn from their own seeded stream, not ``voice_for``.

The task is cached like the corpus, under ``$D2V_FAST_CACHE``, as a prepared speech corpus
(``meta.json``, shards, ``utterances.tsv``) whose ``meta.json`` key ``probe`` holds the
classes, each utterance's label and its split (by utterance, stratified by label, seeded:
60/20/20 train/val/test).

A user task: one JSON object per line, ``{"audio": PATH, "label": ..., "split": ...}``
(``split`` optional, as for text tasks; PATH relative to the file's directory). Each file
is decoded, resampled to 16 kHz and normalised as corpus preparation does, cut to
``USER_MAX_SECONDS`` (the published training crop), and held in memory (a probe task is small).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..builtin import build_once, cache_dir, python_tag
from ..probe_task import SPLIT_SEED, complete_splits, label_classes, labelled_lines, split_by_document
from ..text.builtin import stdlib_labelled_docstrings
from .builtin import (VARIANTS, VOICES, PITCH, RATE_WPM, RESERVED_FROM, Espeak, espeak_announced, speakable_chunks,
                      synthesized)
from .corpus import SAMPLE_RATE, AudioCorpus, open_audio_corpus
from .prepare import SILENCE_VAR

PROBE_SPEECH_VERSION = 1  # bump when the texts, the draws or the cut below change
PROBE_UTTERANCES = 600    # 50 per variant: 360/120/120 train/val/test
PROBE_SECONDS = 3.0
PIECE_CHARS = (90, 160)   # texts cut at word ends: ~4 s or more of speech at the fastest rate
_STREAM = 0x7370_6b72     # the probe's own draw stream ("spkr"), apart from voice_for's


def probe_texts(n: int, workers: int | None = None, progress: bool = False) -> tuple[list[str], int]:
    """``n`` texts from the reserved modules' docstrings (passages cut into pieces of
    PIECE_CHARS at word ends, in the docstrings' order), and the number of speakable
    passages the built-in speech corpus can draw on (those before the reserved modules)."""
    texts: list[str] = []
    available = 0
    for module, doc in stdlib_labelled_docstrings(workers, progress=progress):
        chunks = speakable_chunks(doc)
        if module < RESERVED_FROM:
            available += len(chunks)
            continue
        for chunk in chunks:
            texts.extend(_pieces(chunk))
    if len(texts) < n:
        raise UsageError(f"speech probe: the reserved docstrings give only {len(texts)} texts, {n} asked for; "
                         f"ask for fewer utterances")
    # spread over all reserved modules rather than the first few
    pick = np.linspace(0, len(texts) - 1, n).round().astype(int)
    return [texts[i] for i in pick], available


def _pieces(chunk: str) -> list[str]:
    out, cur = [], ""
    for word in chunk.split():
        cur = f"{cur} {word}".strip()
        if len(cur) >= PIECE_CHARS[0]:
            out.append(cur[:PIECE_CHARS[1]])
            cur = ""
    return out


def probe_voice(index: int) -> dict:
    """Utterance ``index``'s variant (the label, balanced: index mod 12), accent, rate and pitch."""
    rng = np.random.default_rng([_STREAM, PROBE_SPEECH_VERSION, index])
    variant = VARIANTS[index % len(VARIANTS)]
    return {"voice": f"{VOICES[rng.integers(len(VOICES))]}+{variant}",
            "rate": int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
            "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1))}


def _synth(job: tuple[int, str]) -> tuple[str, np.ndarray | None]:
    """Worker: utterance ``index``'s name and its first PROBE_SECONDS at 16 kHz (None when
    the speech is shorter)."""
    from .resample import resample

    index, text = job
    engine = Espeak.get()
    v = probe_voice(index)
    wav = resample(engine.synthesize(text, **v).astype(np.float32) / 32768.0, engine.sample_rate, SAMPLE_RATE)
    n = int(PROBE_SECONDS * SAMPLE_RATE)
    # cut before preparation normalises it: each utterance is zero-mean unit-variance over
    # the 3 s the encoder sees, as Wav2Vec2FeatureExtractor would make it
    return f"probe{index:05d} {v['voice']} rate={v['rate']} pitch={v['pitch']}", \
        (wav[:n] if len(wav) >= n and wav[:n].var() > SILENCE_VAR else None)


def builtin_speech_probe_path(utterances: int = PROBE_UTTERANCES) -> Path:
    return cache_dir() / f"speech-probe-espeak-{python_tag()}-v{PROBE_SPEECH_VERSION}-n{utterances}"


def builtin_speech_probe(utterances: int = PROBE_UTTERANCES, *, workers: int | None = None,
                         progress: bool = True) -> Path:
    """Path of the built-in speech probe task (a prepared speech corpus with labels),
    building it on first use; safe from several processes at once (a lock)."""
    if utterances < 5 * len(VARIANTS):
        raise UsageError(f"speech probe: {utterances} utterances; need at least {5 * len(VARIANTS)} "
                         f"(five per class, so that train, val and test each get some)")
    def record(names, kept, texts, available, engine):
        labels = [name.split()[1].split("+")[1] for name in names]  # too short (rare): left out
        return {"probe": {
            "label": "eSpeak NG voice variant (speaker identity)", "classes": list(VARIANTS),
            "labels": [VARIANTS.index(l) for l in labels], "splits": split_by_document(labels, seed=SPLIT_SEED),
            "split_seed": SPLIT_SEED, "seconds": PROBE_SECONDS, "texts_from_modules": f">= {RESERVED_FROM!r}",
            "pretraining_texts_available": available, "engine": engine}}

    return build_synthesized_task(
        builtin_speech_probe_path(utterances), kind=f"speech-probe:v{PROBE_SPEECH_VERSION}",
        describe=f"speech probe task ({utterances} utterances, {len(VARIANTS)} voice variants)",
        texts=lambda w: probe_texts(utterances, w, progress=progress), job=_synth, record=record,
        reader=read_speech_probe, seconds=(PROBE_SECONDS, PROBE_SECONDS), workers=workers, progress=progress)


def build_synthesized_task(out: Path, *, kind: str, describe: str, texts, job, record, reader, seconds,
                           workers: int | None, progress: bool) -> Path:
    """A built-in task of eSpeak NG utterances, built once (under a lock) as a prepared speech
    corpus at ``out``: ``texts(workers)`` gives (texts, passages available to pretraining),
    ``job((index, text))`` (a module-level function, run in worker processes) gives (name,
    16 kHz samples or None to leave it out), ``record(names, indices kept, texts, available,
    engine)`` the ``meta.json`` entries of what was kept; ``reader(out)`` checks the result."""
    from ..publish import default_workers
    from .prepare import prepare_audio_corpus

    workers = default_workers() if workers is None else workers
    with build_once(out, lambda p: reader(p) is not None) as ready:
        if ready:
            return out
        version = espeak_announced(progress, lambda v: f"building the built-in {describe} by eSpeak NG {v} into {out}")
        engine = f"eSpeak NG {version}"
        all_texts, available = texts(workers)
        meta: dict = {}

        def kept():
            names, indices = [], []
            for i, (name, wav) in enumerate(synthesized(all_texts, workers, job)):
                if wav is not None:
                    names.append(name)
                    indices.append(i)
                    yield name, wav, SAMPLE_RATE
            # prepare_audio_corpus reads extra_meta after the last utterance (documented there)
            meta.update(record(names, indices, all_texts, available, engine))

        source_id = (f"espeak-ng:{engine.split()[-1]}:python-stdlib-docstrings:{sys.version.split()[0]}:{kind}"
                     f":n{len(all_texts)}")
        prepare_audio_corpus(out, utterances=kept(), source_id=source_id, min_seconds=seconds[0],
                             max_seconds=seconds[1], force=True, progress=progress, extra_meta=meta,
                             expected=len(all_texts))
        reader(out)  # every kept utterance has its record
        return out


@dataclass
class SplitIndices:
    """What the built-in speech tasks share: each example's split, where the task came from,
    its ``meta.json`` record; ``indices(split)``: the examples in that split."""

    splits: list[str]
    source: str
    record: dict

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]


def task_corpus(path: str | Path, key: str, fields: tuple[str, ...], *, flag: str, what: str):
    """(the prepared speech corpus at ``path``, its ``meta.json`` record ``key``), checked to
    hold one entry per utterance in each of ``fields``; UsageError otherwise."""
    corpus = open_audio_corpus(path, flag=flag)
    rec = corpus.meta.get(key)
    if not isinstance(rec, dict) or any(len(rec.get(f, ())) != len(corpus) for f in fields):
        raise UsageError(f"{flag} {path}: holds no {what} for its {len(corpus)} utterances (meta.json {key!r}); "
                         f"delete it so that it is rebuilt")
    return corpus, rec


@dataclass
class SpeechProbeTask(SplitIndices):
    """What ``d2v_fast.probe.linear_probe`` reads off a task (labels, classes, split indices)
    and the audio: ``corpus[i]`` is utterance ``i``."""

    corpus: AudioCorpus | list  # a list of float32 arrays for a user's task
    labels: list[int]
    classes: list[str]


def read_speech_probe(path: str | Path, *, flag: str = "speech probe task") -> SpeechProbeTask:
    corpus, rec = task_corpus(path, "probe", ("labels", "splits"), flag=flag, what="labels")
    return SpeechProbeTask(corpus=corpus, labels=[int(x) for x in rec["labels"]], classes=list(rec["classes"]),
                           splits=list(rec["splits"]), source=str(path), record=rec)


# ----------------------------------------------------------------------------- a user's task
USER_MAX_SECONDS = 20.0  # the published recipes' longest training utterance


def task_audio(path: Path, n: int, name) -> np.ndarray:
    """The recording line ``n`` of task file ``path`` names (relative to the file), decoded,
    resampled, normalised and cut to USER_MAX_SECONDS as corpus preparation does."""
    from .prepare import decode, to_corpus_audio

    if not isinstance(name, str) or not name:
        raise UsageError(f"{path}:{n}: 'audio' must be a file path (a non-empty string)")
    audio = path.parent / name
    if not audio.is_file():
        raise UsageError(f"{path}:{n}: audio file {audio} does not exist; paths are relative to the task file")
    wav, rate = decode(audio)
    wav = to_corpus_audio(wav, rate, str(audio))
    if wav is None:
        raise UsageError(f"{audio}: silent; remove it from {path}")
    return wav[:int(USER_MAX_SECONDS * SAMPLE_RATE)]


def read_user_speech_task(path: str | Path, *, flag: str = "--task", seed: int = SPLIT_SEED) -> SpeechProbeTask:
    """A JSON-lines speech task (see the module docstring); UsageError naming the line or file."""
    path = Path(path)
    waves, raw_labels, given = [], [], []
    for n, name, label, split in labelled_lines(path, "audio", flag=flag, needs="'audio' (a file path) and 'label'"):
        waves.append(task_audio(path, n, name))
        raw_labels.append(label)
        given.append(split)
    classes = label_classes(raw_labels, path, flag=flag, what="utterances")
    splits = complete_splits(raw_labels, given, path, flag=flag, seed=seed, what="utterances")
    index = {c: i for i, c in enumerate(classes)}
    return SpeechProbeTask(corpus=waves, labels=[index[l] for l in raw_labels], classes=classes, splits=splits,
                           source=str(path), record={"label": "user labels"})
