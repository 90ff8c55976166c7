"""Run ``python -m d2v_fast.finetune`` and collect its results (each output directory's
finetune.json) into benchmarks/results/finetune-cpu.json, the file docs/finetune.md quotes.
Rows already in the file (same modality and seed) are replaced, others kept.

    python benchmarks/record_finetune.py --run MODALITY=RUN_DIR [--run ...] [--seeds 0 1] [--work DIR]
    python benchmarks/record_finetune.py FINETUNED_DIR [FINETUNED_DIR ...] [--pretrain-command MODALITY=CMD ...]

``--run`` fine-tunes RUN_DIR once per seed, one command after the other
(``python -m d2v_fast.finetune RUN_DIR --seed S --out WORK/ft-MODALITY-sS``, the defaults, in
this checkout, with this process's environment: set ``OMP_NUM_THREADS`` as you want it
recorded), pretraining RUN_DIR first with the modality's tiny default job
(``python -m d2v_fast.pretrain --nproc-per-node 1 --modality M --config tiny --out RUN_DIR``)
if it does not exist. Each row then also holds ``command_seconds`` and
``command_cpu_seconds``: the whole command's wall and CPU seconds (interpreter start and
imports included). The second form collects output directories made by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "finetune-cpu.json"


def row(result: dict) -> dict:
    keep = ("metric", "higher_is_better", "value", "scratch_value", "steps", "batch_size", "lr", "seconds", "seeds",
            "command", "host", "test_held_out_of_pretraining", "model")
    runs = {k: {m: v for m, v in (result.get(k) or {}).items() if m != "examples"} for k in ("pretrained", "scratch")}
    task = {k: v for k, v in result["task"].items() if k not in ("vocabulary", "class_names", "feature_extractor")}
    return {"modality": result["modality"], **{k: result.get(k) for k in keep}, "task": task, **runs}


def child_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def run_module(args: list[str]) -> tuple[float, float]:
    """Run ``python -m ARGS`` in this checkout; (wall seconds, CPU seconds)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0, c0 = time.perf_counter(), child_cpu()
    subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, env=env)
    return round(time.perf_counter() - t0, 1), round(child_cpu() - c0, 1)


def fine_tune(spec: str, seeds: list[int], work: Path, data: dict) -> list[tuple[Path, dict]]:
    modality, run = spec.split("=", 1)
    run = Path(run)
    pretrain = ["d2v_fast.pretrain", "--nproc-per-node", "1", "--modality", modality, "--config", "tiny",
                "--out", str(run)]
    if not run.exists():
        run_module(pretrain)
        data.setdefault("pretrain_commands", {})[modality] = " ".join(["python", "-m", *pretrain])
    out = []
    for seed in seeds:
        target = work / f"ft-{modality}-s{seed}"
        wall, cpu = run_module(["d2v_fast.finetune", str(run), "--seed", str(seed), "--out", str(target)])
        out.append((target, {"command_seconds": wall, "command_cpu_seconds": cpu,
                             "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="*", type=Path)
    p.add_argument("--run", action="append", default=[], metavar="MODALITY=RUN_DIR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--work", type=Path, default=Path("finetune-record"), metavar="DIR")
    p.add_argument("--pretrain-command", action="append", default=[], metavar="MODALITY=CMD")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    for spec in args.pretrain_command:
        modality, cmd = spec.split("=", 1)
        data.setdefault("pretrain_commands", {})[modality] = cmd
    if args.note:
        data["note"] = args.note
    made = [(d, {}) for d in args.dirs]
    for spec in args.run:
        made += fine_tune(spec, args.seeds, args.work, data)
    for d, extra in made:
        new = {**row(json.loads((d / "finetune.json").read_text())), **extra}
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
