"""Run the default job (`make pretrain`) and record its wall time and loss curve in
benchmarks/results/default-job-<device>.json, the file the README's default-job numbers come from.

    python benchmarks/record_default_job.py [--recipe data2vec|data2vec2] [extra pretrain flags ...]
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
    from d2v_fast.bench import environment

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        args = " ".join(argv + ["--out", str(run), "--train.progress", "false"])
        t0 = time.perf_counter()
        subprocess.run(["make", "--no-print-directory", "pretrain", f"ARGS={args}"], cwd=ROOT, check=True)
        wall = time.perf_counter() - t0
        config = json.loads((run / "config.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    env = environment(torch.device("cpu"))
    recipe = config["recipe"]["name"]
    result = {**env, "benchmark": "default-job", "command": f"make pretrain ARGS='{' '.join(argv)}'",
              "preset": config["preset"], "recipe": recipe, "wall_s_including_install_check": round(wall, 1),
              "steps": rows[-1]["step"], "batch": config["train"]["batch_size"], "seq_len": config["data"]["seq_len"],
              "loss": {str(r["step"]): round(r["loss"], 4) for r in rows},
              "target_var": {str(r["step"]): round(r["target_var"], 4) for r in rows},
              "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r),
              "load": "other processes were running on the machine" if os.environ.get("D2V_BUSY") else "idle"}
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    suffix = "" if recipe == "data2vec" else f"-{recipe}"
    path = ROOT / "benchmarks" / "results" / f"default-job{suffix}-{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}: {wall:.0f} s, loss {rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
