"""Text classification: ``Data2VecTextForSequenceClassification`` on the built-in task (the
probe's) or a JSONL/CSV file of ``text`` and ``label`` (optionally ``split``)."""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UsageError
from . import Job

MAX_LEN = 128  # tokens per document, <s> and </s> included (the tiny preset's length)


def _csv_rows(path: Path):
    """(line number, text, label, split or None) of a CSV file with a header row."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            for name in ("text", "label"):
                if name not in fields:
                    raise UsageError(f"{path}: the header row has no {name!r} column (found "
                                     f"{', '.join(repr(x) for x in fields[:5]) or 'none'}); name the columns text "
                                     f"and label (split optional)")
            for row in reader:
                n = reader.line_num
                if row.get("text") is None or row.get("label") is None:
                    raise UsageError(f"{path}:{n}: fewer fields than the header names; give text and label on "
                                     f"every row")
                yield n, row["text"], row["label"], (row.get("split") or None)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as err:
        raise UsageError(f"{path}: not a readable CSV file ({err}); one header row, then text,label rows") from None


def read_text_task(task: str | None, *, progress: bool):
    """(texts, labels as class indices, splits, classes, source) of the built-in task or a file."""
    from ..data.probe_task import SPLITS, complete_splits, labelled_lines

    if task is None or str(task) == "builtin":
        from ..modalities.text import load_task

        t = load_task(None, progress=progress)
        return t.texts, t.labels, t.splits, t.classes, t.source
    path = Path(task)
    if not path.is_file():
        raise UsageError(f"--task {path}: no such file; give a .jsonl or .csv file with text and label on every line "
                         f"(or builtin)")
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else labelled_lines(path, "text")
    texts, raw, given = [], [], []
    for n, text, label, split in rows:
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{path}:{n}: 'text' must be a non-empty string; fill it in or remove the line")
        if split is not None and split not in SPLITS:
            raise UsageError(f"{path}:{n}: 'split' {split!r}: expected one of {', '.join(SPLITS)} or none")
        texts.append(text)
        raw.append(str(label))
        given.append(split)
    classes = sorted(set(raw))
    if len(classes) < 2:
        found = f"only the label {classes[0]!r}" if classes else "no examples"
        raise UsageError(f"--task {path}: {found}; a classifier needs at least 2 classes")
    splits = complete_splits(raw, given, path, what="documents")
    index = {c: i for i, c in enumerate(classes)}
    return texts, [index[x] for x in raw], splits, classes, str(path)


def text_job(base: Path, task: str | None, *, run_config: dict | None, progress: bool, seed: int,
             work: Path) -> Job:
    import torch
    from transformers import (AutoConfig, AutoTokenizer, Data2VecTextForSequenceClassification,
                              DataCollatorWithPadding)

    texts, labels, splits, classes, source = read_text_task(task, progress=progress)
    try:
        if not any((base / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            raise OSError("no tokenizer files")
        tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"{base}: no usable tokenizer ({type(err).__name__}); export the run again "
                         f"(python -m d2v_fast.export RUN_DIR OUT_DIR), which copies it") from None
    max_len = min(MAX_LEN, tok.model_max_length)
    enc = tok(texts, truncation=True, max_length=max_len)
    train_ix = [i for i, s in enumerate(splits) if s in ("train", "val")]
    test_ix = [i for i, s in enumerate(splits) if s == "test"]

    def example(i):
        return {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}

    train = [example(i) for i in train_ix]
    test = [example(i) for i in test_ix]
    collator = DataCollatorWithPadding(tok)
    config = AutoConfig.from_pretrained(base, num_labels=len(classes), id2label=dict(enumerate(classes)),
                                        label2id={c: i for i, c in enumerate(classes)},
                                        architectures=["Data2VecTextForSequenceClassification"])

    def evaluate(model, device):
        from ..linear_probe import macro_f1

        preds = []
        for start in range(0, len(test), 64):
            batch = collator([{k: v for k, v in x.items() if k != "labels"} for x in test[start:start + 64]])
            preds.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu())
        pred, y = torch.cat(preds), torch.tensor([x["labels"] for x in test])
        return {"accuracy": float((pred == y).double().mean()), "macro_f1": macro_f1(pred, y, len(classes))}

    held_out = None
    if task is None or str(task) == "builtin":
        from types import SimpleNamespace

        from ..modalities.text import Probed, held_out as probe_held_out

        corpus = (run_config or {}).get("data_dir")
        if corpus:  # the run's corpus records the task file it held out
            held_out = probe_held_out(Probed(None, None, "run", base, Path(corpus)), SimpleNamespace(source=source))
    return Job(modality="text", pipeline_task="text-classification", model_class=Data2VecTextForSequenceClassification,
               config=config, base=base, train=train, collator=collator, evaluate=evaluate, metric="accuracy",
               higher_is_better=True, save=tok.save_pretrained, held_out=held_out,
               task={"source": source, "classes": len(classes), "class_names": classes,
                     "examples": {"train": len(train), "test": len(test)}, "max_len": max_len,
                     "trained_on": "train and val splits", "tested_on": "test split"})
