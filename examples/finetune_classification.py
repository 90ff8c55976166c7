"""Fine-tune an exported d2v_fast model for text classification with the Hugging Face Trainer.

    python -m d2v_fast.export runs/my-run exports/my-model
    python examples/finetune_classification.py --model exports/my-model \
        --train data/train.csv --eval data/dev.csv --out runs/cls

Data: CSV (header row) or JSONL files with a text and a label column (names set by
--text-column / --label-column). Labels may be strings or integers. Prints and writes
``eval_results.json`` with the accuracy on --eval. Needs ``pip install -e ".[hf]"``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def read_examples(path: Path, text_col: str, label_col: str) -> list[tuple[str, str]]:
    if not path.is_file():
        sys.exit(f"error: {path}: no such file")
    rows = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                obj = json.loads(line)
                if text_col not in obj or label_col not in obj:
                    sys.exit(f"error: {path}:{i}: needs fields {text_col!r} and {label_col!r}; "
                             f"set --text-column/--label-column")
                rows.append((str(obj[text_col]), str(obj[label_col])))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or text_col not in reader.fieldnames or label_col not in reader.fieldnames:
                sys.exit(f"error: {path}: the header {reader.fieldnames} lacks {text_col!r} or {label_col!r}; "
                         f"set --text-column/--label-column")
            rows = [(r[text_col], str(r[label_col])) for r in reader]
    if not rows:
        sys.exit(f"error: {path}: no examples")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="directory written by python -m d2v_fast.export")
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--eval", required=True, type=Path)
    p.add_argument("--out", default="runs/finetune", type=Path)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from transformers import (AutoTokenizer, Data2VecTextForSequenceClassification, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    train = read_examples(args.train, args.text_column, args.label_column)
    dev = read_examples(args.eval, args.text_column, args.label_column)
    labels = sorted({y for _, y in train} | {y for _, y in dev})
    label_id = {y: i for i, y in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(args.model)
    max_len = min(args.max_length, tok.model_max_length)

    class Examples(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.enc = [tok(t, truncation=True, max_length=max_len) for t, _ in rows]
            self.labels = [label_id[y] for _, y in rows]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**self.enc[i], "labels": self.labels[i]}

    model = Data2VecTextForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_id)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    targs = TrainingArguments(output_dir=str(args.out), num_train_epochs=args.epochs,
                              per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
                              learning_rate=args.lr, seed=args.seed, save_strategy="no", report_to=[],
                              logging_steps=10, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=targs, train_dataset=Examples(train), eval_dataset=Examples(dev),
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"accuracy {metrics['eval_accuracy']:.4f} on {len(dev)} examples ({args.eval})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
