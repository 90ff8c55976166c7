"""The README's multi-process command, `python -m d2v_fast.pretrain --nproc-per-node N`: a
signal to the launcher ends with every worker's checkpoint and exit 0, the same command
resumes, and a bad flag is one line and exit 2 before any worker starts."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import ROOT, subprocess_env

LAUNCH = [sys.executable, "-m", "d2v_fast.pretrain", "--nproc-per-node", "2"]
# one loader worker per rank: the launcher's signal reaches each worker's whole process group
ARGS = ["--train.probe_task", "none", "--config", "tiny", "--seq-len", "64", "--batch-size", "8",
        "--data.num_workers", "1", "--train.progress", "false", "--train.log_every", "1",
        "--max-steps", "1000", "--train.ckpt_every", "1000", "--optim.total_steps", "400"]


def _logged_steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


def _stop_after(cmd, env, cwd, run: Path, past_step: int, sig) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` to it (the launcher) once a step after ``past_step`` is logged."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not any(s > past_step for s in _logged_steps(run)):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


@pytest.mark.slow
def test_launcher_signals_checkpoint_exit_0_and_the_same_command_resumes(builtin_cache, tmp_path):
    run = tmp_path / "run"
    cmd = LAUNCH + ARGS + ["--out", str(run)]
    env = subprocess_env(builtin_cache)

    code, err = _stop_after(cmd, env, tmp_path, run, 2, signal.SIGTERM)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err and "error:" not in err, err[-3000:]
    assert "SIGTERM: finishing this step" in err and "stopped on request at step" in err
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1, ckpts
    first = int(ckpts[0].name[5:])
    for name in ("config.json", "model.safetensors", "state.pt", "rng-rank0.pt", "rng-rank1.pt"):
        assert (ckpts[0] / name).is_file(), name

    code, err = _stop_after(cmd, env, tmp_path, run, first + 1, signal.SIGINT)  # the same command
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "error:" not in err, err[-3000:]
    assert f"resumed from {ckpts[0]} (step {first})" in err
    assert "SIGINT: finishing this step" in err and "stopped on request at step" in err
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 2 and int(ckpts[-1].name[5:]) > first + 1, ckpts


@pytest.mark.parametrize("flags, line", [
    (["--recipe.mask_prob", "2.0"], "error: --recipe.mask_prob 2.0: must be in [0, 1]"),
    (["--modality", "video"], "error: --modality 'video': unknown modality; choose one of text, audio, images"),
    (["--batch-size", "9"], "error: --batch-size 9: not divisible by the world size 2; use a multiple of 2"),
    (["--data", "/nonexistent-corpus"], "error: --data /nonexistent-corpus: no such directory; prepare one with "
                                        "`python -m d2v_fast.data.prepare --input ... --out DIR`"),
])
def test_launcher_refuses_a_bad_flag_in_one_line_before_any_worker(builtin_cache, tmp_path, flags, line):
    res = subprocess.run(LAUNCH + ARGS + flags + ["--out", str(tmp_path / "run")], env=subprocess_env(builtin_cache),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [line]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_launcher_refuses_a_damaged_checkpoint_before_any_worker(builtin_cache, tmp_path):
    """The checkpoint the run would resume from is checked by the launcher (here: weights cut short)."""
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "d2v_fast.pretrain", *ARGS, "--max-steps", "1", "--out", str(run)],
                         env=subprocess_env(builtin_cache), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    weights = next((run / "checkpoints").glob("step-*")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    res = subprocess.run(LAUNCH + ARGS + ["--out", str(run)], env=subprocess_env(builtin_cache), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"error: {weights}: its sha256 differs"), line


def test_the_workers_get_the_command_less_the_launchers_flags():
    from d2v_fast.pretrain import _worker_argv

    argv = ["--nproc-per-node", "2", "--max-steps", "3", "--nproc_per_node=4", "--rdzv-endpoint=h:1", "--max-restarts",
            "1", "--stop-timeout", "60", "--nnodes", "1", "--rdzv_id", "x", "--out", "r"]
    assert _worker_argv(argv) == ["--max-steps", "3", "--out", "r"]
