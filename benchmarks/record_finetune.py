"""Collect ``python -m d2v_fast.finetune`` results (each output directory's finetune.json)
into benchmarks/results/finetune-cpu.json, the file docs/finetune.md quotes. Rows already
in the file (same modality and seed) are replaced, others kept.

    python benchmarks/record_finetune.py FINETUNED_DIR [FINETUNED_DIR ...] [--pretrain-command MODALITY=CMD ...]

Each run was made by the command recorded in its finetune.json (``command``), on a run
directory made by the modality's tiny default pretraining job (``--pretrain-command``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "finetune-cpu.json"


def row(result: dict) -> dict:
    keep = ("metric", "higher_is_better", "value", "scratch_value", "steps", "batch_size", "lr", "seconds", "seeds",
            "command", "host", "test_held_out_of_pretraining", "model")
    runs = {k: {m: v for m, v in (result.get(k) or {}).items() if m != "examples"} for k in ("pretrained", "scratch")}
    task = {k: v for k, v in result["task"].items() if k not in ("vocabulary", "class_names", "feature_extractor")}
    return {"modality": result["modality"], **{k: result.get(k) for k in keep}, "task": task, **runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--pretrain-command", action="append", default=[], metavar="MODALITY=CMD")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    for spec in args.pretrain_command:
        modality, cmd = spec.split("=", 1)
        data.setdefault("pretrain_commands", {})[modality] = cmd
    if args.note:
        data["note"] = args.note
    for d in args.dirs:
        new = row(json.loads((d / "finetune.json").read_text()))
        seed = new["seeds"]["training"]
        data["rows"] = [r for r in data["rows"] if (r["modality"], r["seeds"]["training"]) != (new["modality"], seed)]
        data["rows"].append(new)
    data["rows"].sort(key=lambda r: (r["modality"], r["seeds"]["training"]))
    tmp = RESULTS.with_name(f".{RESULTS.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    for r in data["rows"]:
        print(f"{r['modality']:6s} seed {r['seeds']['training']}: {r['metric']} {r['value']:.3f} vs "
              f"{r['scratch_value']:.3f} from scratch, {r['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
