"""Labelled text tasks for the linear probe (docs/probe.md): a JSON-lines file of
``{"text": ..., "label": ..., "split": "train"|"val"|"test"}`` objects (``split`` optional;
without it the documents are split by ``split_by_document``).

Kept free of torch: the built-in corpus writes its task from the preparation processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import UsageError
from ..probe_task import SPLIT_SEED, complete_splits, label_classes, labelled_lines


@dataclass
class Task:
    texts: list[str]
    labels: list[int]  # index into classes
    splits: list[str]
    classes: list[str]
    source: str

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]


def read_task(path: str | Path, *, flag: str = "--task", seed: int = SPLIT_SEED) -> Task:
    """Read a task file; documents without a ``split`` field are split by ``split_by_document``."""
    path = Path(path)
    texts, raw_labels, given = [], [], []
    for n, text, label, split in labelled_lines(path, "text", flag=flag):
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{path}:{n}: 'text' must be a non-empty string")
        texts.append(text)
        raw_labels.append(label)
        given.append(split)
    classes = label_classes(raw_labels, path, flag=flag)
    splits = complete_splits(raw_labels, given, path, flag=flag, seed=seed)
    index = {c: i for i, c in enumerate(classes)}
    return Task(texts=texts, labels=[index[l] for l in raw_labels], splits=list(splits), classes=classes,
                source=str(path))
