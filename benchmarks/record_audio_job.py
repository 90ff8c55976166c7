"""Run the tiny speech job on the built-in speech corpus with torchrun and record its wall
time, loss curve and throughput in benchmarks/results/audio-job-<recipe>-<device>.json, the
file the README's speech numbers come from.

    python benchmarks/record_audio_job.py [--recipe data2vec|data2vec2] [extra pretrain flags ...]
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
    sys.path.insert(0, str(ROOT))
    from d2v_fast.bench import environment

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = ["torchrun", "--standalone", "--nproc_per_node=1", "-m", "d2v_fast.pretrain", "--modality", "audio",
               "--config", "tiny", *argv]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd[1:], "--out", str(run),
                        "--train.progress", "false"], cwd=ROOT, check=True, env=env)
        wall = time.perf_counter() - t0
        config = json.loads((run / "config.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    info = environment(torch.device("cpu"))
    recipe = config["recipe"]["name"]
    first, last = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10):]
    result = {**info, "benchmark": "audio-job", "command": " ".join(cmd), "preset": config["preset"],
              "recipe": recipe, "corpus": "built-in speech (eSpeak NG reading standard-library docstrings)",
              "wall_s": round(wall, 1), "steps": rows[-1]["step"], "batch_utterances": config["train"]["batch_size"],
              "crop_samples": config["data"]["max_samples"],
              "loss_first_10pct_mean": round(statistics.mean(r["loss"] for r in first), 4),
              "loss_last_10pct_mean": round(statistics.mean(r["loss"] for r in last), 4),
              "loss": {str(r["step"]): round(r["loss"], 4) for r in rows},
              "target_var": {str(r["step"]): round(r["target_var"], 4) for r in rows if "target_var" in r},
              "frames_per_s_median": statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r),
              "load": "other processes were running on the machine" if os.environ.get("D2V_BUSY") else "idle"}
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    path = ROOT / "benchmarks" / "results" / f"audio-job-{recipe}-{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}: {wall:.0f} s, loss {result['loss_first_10pct_mean']:.3f} -> "
          f"{result['loss_last_10pct_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
