"""What every labelled probe task shares (text: ``data/text/probe_task.py``; speech:
``data/audio/probe_task.py``): JSON-lines files of labelled examples with an optional
``split`` (train, val or test), their checks, and the seeded split by document.

Kept free of torch: the built-in corpus writes its task from the preparation processes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UsageError

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"test": 0.2, "val": 0.2}  # the rest is train
SPLIT_SEED = 0


def split_by_document(labels: Sequence, *, seed: int = SPLIT_SEED, max_per_label: int | None = None) -> list[str | None]:
    """A split name for every document, stratified by label: per label a seeded permutation
    puts the first 20% in test, the next 20% in val, the rest in train. With
    ``max_per_label`` only that many documents of a label take part (the others get None).
    Documents are never shared between splits, so nothing tested was fitted on."""
    out: list[str | None] = [None] * len(labels)
    by_label: dict = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    rng = np.random.Generator(np.random.PCG64(seed))
    for label in sorted(by_label, key=str):
        docs = by_label[label]
        order = [docs[j] for j in rng.permutation(len(docs))]
        if max_per_label is not None:
            order = order[:max_per_label]
        n_test = round(len(order) * SPLIT_FRACTIONS["test"])
        n_val = round(len(order) * SPLIT_FRACTIONS["val"])
        for k, i in enumerate(order):
            out[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return out


def task_lines(texts: Sequence[str], labels: Sequence[str], splits: Sequence[str | None]) -> bytes:
    """The JSON-lines content of a task (documents without a split are left out)."""
    rows = (json.dumps({"text": t, "label": l, "split": s}) for t, l, s in zip(texts, labels, splits) if s)
    return ("\n".join(rows) + "\n").encode()


def complete_splits(raw_labels: Sequence[str], given: Sequence[str | None], path, *, flag: str = "--task",
                    seed: int = SPLIT_SEED, what: str = "documents") -> list[str]:
    """Every example's split: the given ones, or ``split_by_document`` where none is given; a
    validation split carved from train when only train/test are given. UsageError when a
    split stays empty or only some lines give one."""
    if all(s is not None for s in given):
        splits = list(given)
    elif all(s is None for s in given):
        splits = split_by_document(raw_labels, seed=seed)
    else:
        raise UsageError(f"{path}: some lines have a 'split' field and some do not; give it on every line or none")
    if "val" not in splits:  # a file with train/test only: the classifier's validation set comes from train
        train = [i for i, s in enumerate(splits) if s == "train"]
        carved = split_by_document([raw_labels[i] for i in train], seed=seed)
        for i, c in zip(train, carved):
            if c == "val":
                splits[i] = "val"
    for s in ("train", "val", "test"):
        if s not in splits:
            raise UsageError(f"{flag} {path}: no {s} {what} ({len(splits)} in all); give more {what} per label")
    return splits


def json_objects(path: Path, *, flag: str, needs: str):
    """``(line number, object)`` of every non-empty line of a JSON-lines file; a missing
    file, non-UTF-8 text or a line that is not a JSON object is a UsageError naming the file
    (and line); ``needs`` says what every line must hold (for the message)."""
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file; give a .jsonl file with {needs} on every line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8 JSON lines") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{n}: not a JSON object ({err.msg}); one object per line") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path}:{n}: not a JSON object; one object per line with {needs}")
        yield n, obj


def labelled_lines(path: str | Path, field: str, *, flag: str = "--task", needs: str = ""):
    """The lines of a JSON-lines task file, checked: yields ``(line number, obj[field], label
    as a string, split or None)`` per non-empty line; a missing file, non-UTF-8 text, a line
    that is not an object, a missing field, a label that is neither a string nor an integer or
    an unknown split is a UsageError naming the file (and line). ``needs`` says what every
    line must hold (for the message)."""
    path = Path(path)
    needs = needs or f"{field!r} and 'label'"
    for n, obj in json_objects(path, flag=flag, needs=needs):
        for name in (field, "label"):
            if name not in obj:
                found = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
                raise UsageError(f"{path}:{n}: no {name!r} field (found {found}); every line needs {needs}")
        label, split = obj["label"], obj.get("split")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise UsageError(f"{path}:{n}: 'label' {label!r} must be a string or an integer")
        if split is not None and split not in SPLITS:
            raise UsageError(f"{path}:{n}: 'split' {split!r}: expected one of {', '.join(SPLITS)} or no split field")
        yield n, obj[field], str(label), split


def label_classes(raw_labels: list[str], path, *, flag: str = "--task", what: str = "documents") -> list[str]:
    """The sorted class names; fewer than two is a UsageError."""
    classes = sorted(set(raw_labels))
    if len(classes) < 2:
        found = f"only the label {classes[0]!r}" if classes else f"no {what}"
        raise UsageError(f"{flag} {path}: {found}; a probe needs at least 2 classes")
    return classes


