"""Run the tiny speech default job (which ends with the built-in speaker probe) for the given
recipes and seeds and record each run's probe result against its random-init floor in
benchmarks/results/probe-default-job-audio-cpu.json, the file docs/probe.md's speech probe
numbers come from. Runs already in the file (same recipe and seed) are replaced, others kept.

    python benchmarks/record_audio_probe.py [--recipes data2vec,data2vec2] [--seeds 0,1] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "probe-default-job-audio-cpu.json"
COMMAND = ("OMP_NUM_THREADS=1 python -m d2v_fast.pretrain --modality audio --config tiny --recipe R --seed S "
           "--train.progress false")


def run_one(recipe: str, seed: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "d2v_fast.pretrain", "--modality", "audio", "--config", "tiny",
                           "--recipe", recipe, "--seed", str(seed), "--out", str(out), "--train.progress", "false"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} seed {seed} failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "probe.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    return {"recipe": recipe, "seed": seed, "steps": losses[-1]["step"], "final_loss": round(losses[-1]["loss"], 4),
            "printed": proc.stdout.strip().splitlines()[-1], "accuracy": round(res["accuracy"], 4),
            "random_init_accuracy": round(res["random_init"]["accuracy"], 4), "margin": round(res["margin"], 4),
            "macro_f1": round(res["macro_f1"], 4), "random_init_macro_f1": round(res["random_init"]["macro_f1"], 4),
            "weight_decay": res["weight_decay"],
            "random_init_weight_decays": [r["weight_decay"] for r in res["random_init"]["inits"]],
            "test_held_out_of_pretraining": res["test_held_out_of_pretraining"],
            "probe_s": round(res["seconds"], 1), "job_wall_s": round(wall, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="data2vec,data2vec2")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--keep", metavar="DIR", help="keep the run directories under DIR (default: a temporary directory)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from d2v_fast.steptimer import environment

    info = environment(torch.device("cpu"))
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    runs = old.get("runs", [])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for recipe in args.recipes.split(","):
            for seed in map(int, args.seeds.split(",")):
                row = run_one(recipe, seed, base / f"{recipe}-seed{seed}")
                runs = [r for r in runs if (r["recipe"], r["seed"]) != (recipe, seed)] + [row]
                runs.sort(key=lambda r: (r["recipe"], r["seed"]))
                result = {**info, "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                          "benchmark": "probe-default-job-audio", "command": COMMAND, "preset": "tiny",
                          "task": res_task(base / f"{recipe}-seed{seed}"), "runs": runs,
                          "load": "2 shared cores, other sessions' jobs running"}
                tmp_path = RESULTS.with_name(RESULTS.name + ".tmp")
                tmp_path.write_text(json.dumps(result, indent=2) + "\n")
                os.replace(tmp_path, RESULTS)
                print(f"{recipe} seed {seed}: {row['printed']} (margin {row['margin']:+.3f}); job {row['job_wall_s']:.0f} s",
                      flush=True)
    return 0


def res_task(run: Path) -> str:
    res = json.loads((run / "probe.json").read_text())
    ex = res["examples"]
    return (f"built-in speaker task: {res['task']}, {res['classes']} classes, "
            f"{ex['train']}/{ex['val']}/{ex['test']} train/val/test utterances of 3 s")


if __name__ == "__main__":
    sys.exit(main())
