"""Run the default job (`make pretrain`) and record its wall time and loss curve in
benchmarks/results/default-job-<device>.json, the file the default-job numbers of README.md and docs/ come from.

    python benchmarks/record_default_job.py [--modality text|images] [--recipe data2vec|data2vec2] [extra pretrain flags ...]

``D2V_RECORD_NO_MAKE=1`` runs ``torch.distributed.run`` on this checkout directly (PYTHONPATH)
instead of ``make pretrain`` (which first installs this checkout).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    from d2v_fast.steptimer import environment

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        args = " ".join(argv + ["--out", str(run), "--train.progress", "false"])
        t0 = time.perf_counter()
        if os.environ.get("D2V_RECORD_NO_MAKE"):
            env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                            "-m", "d2v_fast.pretrain", *args.split()], cwd=ROOT, check=True, env=env)
        else:
            subprocess.run(["make", "--no-print-directory", "pretrain", f"ARGS={args}"], cwd=ROOT, check=True)
        wall = time.perf_counter() - t0
        config = json.loads((run / "config.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").is_file() else None
    env = environment(torch.device("cpu"))
    recipe = config["recipe"]["name"]
    modality = config.get("modality", "text")
    rows = [r for r in rows if "loss" in r]  # probe records carry no loss
    if os.environ.get("D2V_RECORD_NO_MAKE"):
        command = f"torchrun --standalone --nproc_per_node=1 -m d2v_fast.pretrain {' '.join(argv)}"
    else:
        command = f"make pretrain ARGS='{' '.join(argv)}'"
    speed = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    result = {**env, "benchmark": "default-job", "command": command, "modality": modality,
              "preset": config["preset"], "recipe": recipe, "wall_s_including_install_check": round(wall, 1),
              "steps": rows[-1]["step"], "batch": config["train"]["batch_size"],
              "loss": {str(r["step"]): round(r["loss"], 4) for r in rows},
              "target_var": {str(r["step"]): round(r["target_var"], 4) for r in rows},
              "load": "other processes were running on the machine" if os.environ.get("D2V_BUSY") else "idle",
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    if probe is not None:
        result["probe"] = {k: probe[k] for k in ("task", "accuracy", "macro_f1", "random_init", "margin", "examples")
                           if k in probe}
    if modality == "images":
        result["image_size"] = config["model"]["image_size"]
        result["patches_per_s_median"] = speed
    else:
        result["seq_len"] = config["data"]["seq_len"]
        result["tokens_per_s_median"] = speed
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    suffix = ("" if modality == "text" else f"-{modality}") + ("" if recipe == "data2vec" else f"-{recipe}")
    path = ROOT / "benchmarks" / "results" / f"default-job{suffix}-{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}: {wall:.0f} s, loss {rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
