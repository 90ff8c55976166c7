"""Fine-tune an exported d2v_fast text model on your train/eval files: a thin front to
``python -m d2v_fast.finetune`` (docs/finetune.md), which does this for every modality and
trains a from-scratch control beside it.

    python -m d2v_fast.export runs/my-run exports/my-model
    python examples/finetune_classification.py --model exports/my-model \
        --train data/train.csv --eval data/dev.csv --out runs/cls

Data: CSV (header row) or JSONL files with a text and a label column (names set by
--text-column / --label-column). The two files become one task file with ``split`` fields
(train, test) and ``python -m d2v_fast.finetune`` runs on it; the accuracy on --eval is
printed and written to ``eval_results.json`` (``finetune.json`` holds the whole result).
Needs ``pip install -e ".[hf]"``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    p.add_argument("--model", required=True, help="directory written by python -m d2v_fast.export (or a run directory)")
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--eval", required=True, type=Path)
    p.add_argument("--out", default="runs/finetune", type=Path)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch control")
    args = p.parse_args(argv)

    from d2v_fast import finetune

    train = read_examples(args.train, args.text_column, args.label_column)
    dev = read_examples(args.eval, args.text_column, args.label_column)
    steps = max(1, math.ceil(args.epochs * len(train) / args.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp) / "task.jsonl"
        task.write_text("".join(json.dumps({"text": t, "label": y, "split": s}) + "\n"
                                for rows, s in ((train, "train"), (dev, "test")) for t, y in rows))
        rc = finetune.main([str(args.model), "--task", str(task), "--out", str(args.out), "--max-steps", str(steps),
                            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
                            *(["--no-scratch"] if args.no_scratch else [])])
    if rc:
        return rc
    result = json.loads((args.out / finetune.RESULT_FILE).read_text())
    (args.out / "eval_results.json").write_text(json.dumps({"eval_accuracy": result["value"]}, indent=2) + "\n")
    print(f"accuracy {result['value']:.4f} on {len(dev)} examples ({args.eval})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
