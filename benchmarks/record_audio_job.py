"""Run the tiny speech job on the built-in speech corpus with the documented launch command and
record its wall time, loss curve and throughput in
benchmarks/results/audio-job-<recipe>-<device>.json, the file docs/speech.md's numbers come
from. The built-in speech corpus and the speech probe's task are first built in a fresh cache
and timed on their own (``corpus_build_s``, ``probe_task_build_s``), so ``wall_s`` is the job
itself (training and its end-of-job probe).

    python benchmarks/record_audio_job.py [--seeds 0,1,2] [--recipe data2vec|data2vec2] [extra pretrain flags ...]

With ``--seeds`` the job runs once per seed on the one corpus build; the file's top level is the
first seed's run and ``runs`` holds every seed's loss at steps 10 and 300 and its probe.

Set ``D2V_BUSY=1`` when other work shares the machine (recorded as ``load``).
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
sys.path.insert(0, str(ROOT))
from d2v_fast.steptimer import environment  # noqa: E402


def _timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, env=env)
    return time.perf_counter() - t0


def _job(cmd: list[str], run: Path, env: dict) -> tuple[float, dict, list[dict], dict | None]:
    wall = _timed([sys.executable, *cmd[1:], "--out", str(run), "--train.progress", "false"], env)
    config = json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").is_file() else None
    return wall, config, [r for r in rows if "loss" in r], probe


def _probe_summary(probe: dict | None) -> dict | None:
    if probe is None:
        return None
    return {k: probe.get(k) for k in ("accuracy", "margin", "seconds")} | {
        "random_init_accuracy": (probe.get("random_init") or {}).get("accuracy")}


def main(argv: list[str]) -> int:
    seeds = [0]
    if argv[:1] == ["--seeds"]:
        seeds, argv = [int(v) for v in argv[1].split(",")], argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   D2V_FAST_CACHE=str(Path(tmp) / "cache"))
        corpus_s = _timed([sys.executable, "-m", "d2v_fast.data.audio.builtin"], env)
        probe_s = _timed([sys.executable, "-c", "from d2v_fast.data.audio.probe_task import builtin_speech_probe; "
                                                "builtin_speech_probe()"], env)
        cmd = ["python", "-m", "d2v_fast.pretrain", "--nproc-per-node", "1", "--modality", "audio",
               "--config", "tiny", *argv]
        jobs = []
        for seed in seeds:  # the file is rewritten after every seed, so a stopped recording keeps the ones done
            jobs.append((seed, _job([*cmd, "--seed", str(seed)], Path(tmp) / f"run{seed}", env)))
            _write(jobs, cmd, seeds, corpus_s, probe_s, environment(torch.device("cpu")))
    return 0


def _write(jobs, cmd, seeds, corpus_s, probe_s, info) -> None:
    wall, config, rows, probe = jobs[0][1]
    recipe = config["recipe"]["name"]
    first, last = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10):]
    loss_at = lambda rs, step: next((round(r["loss"], 4) for r in rs if r["step"] == step), None)
    result = {**info, "benchmark": "audio-job", "command": " ".join(cmd) + (" --seed S" if len(seeds) > 1 else ""),
              "preset": config["preset"], "recipe": recipe, "seed": seeds[0],
              "corpus": "built-in speech (eSpeak NG reading standard-library docstrings)",
              "corpus_build_s": round(corpus_s, 1), "probe_task_build_s": round(probe_s, 1),
              "wall_s": round(wall, 1), "steps": rows[-1]["step"], "batch_utterances": config["train"]["batch_size"],
              "crop_samples": config["data"]["max_samples"],
              "loss_first_10pct_mean": round(statistics.mean(r["loss"] for r in first), 4),
              "loss_last_10pct_mean": round(statistics.mean(r["loss"] for r in last), 4),
              "loss": {str(r["step"]): round(r["loss"], 4) for r in rows},
              "target_var": {str(r["step"]): round(r["target_var"], 4) for r in rows if "target_var" in r},
              "pred_var": {str(r["step"]): round(r["pred_var"], 4) for r in rows if "pred_var" in r},
              "frames_per_s_median": statistics.median(r["frames_per_s"] for r in rows),
              "probe": _probe_summary(probe),
              "runs": [{"seed": seed, "wall_s": round(w, 1), "loss_step_10": loss_at(rs, 10),
                        "loss_step_300": loss_at(rs, rs[-1]["step"]), "steps": rs[-1]["step"],
                        "probe": _probe_summary(pr)} for seed, (w, _, rs, pr) in jobs],
              "load": "other processes were running on the machine" if os.environ.get("D2V_BUSY") else "idle"}
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    path = ROOT / "benchmarks" / "results" / f"audio-job-{recipe}-{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    for r in result["runs"]:
        p = r["probe"] or {}
        print(f"seed {r['seed']}: loss {r['loss_step_10']} (step 10) -> {r['loss_step_300']} (step {r['steps']}); "
              f"probe {p.get('accuracy')} vs {p.get('random_init_accuracy')} at random init")
    print(f"wrote {path.relative_to(ROOT)}: corpus {corpus_s:.0f} s, job {wall:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
