"""Faults, bad data and scale-out: signals, SIGKILL, NaN, corrupted corpora, FSDP,
world-size changes, elastic restarts and a kill/resume soak."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v_fast.checkpoint import load_checkpoint

from .helpers import ROOT, losses, subprocess_env

SMALL = ["--train.probe_task", "none", "--config", "tiny", "--seq-len", "64", "--batch-size", "8", "--data.num_workers", "0",
         "--train.progress", "false", "--train.log_every", "1", "--optim.total_steps", "400"]
NODROP = ["--model.dropout", "0", "--model.attention_dropout", "0"]


def pretrain(args, cache, *, nproc=None, cwd=None, timeout=300, **extra):
    launcher = [sys.executable, "-m", "d2v_fast.pretrain"] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "d2v_fast.pretrain"]
    return subprocess.run(launcher + args, env=subprocess_env(cache, **extra), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT)


def final_state(run_dir):
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"))
    return load_checkpoint(ckpts[-1])


def one_error_line(res):
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), res.stderr[-3000:]
    return lines[-1]


def wait_for(path_glob_dir, pattern, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if Path(path_glob_dir).is_dir() and list(Path(path_glob_dir).glob(pattern)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {pattern} appeared")
        time.sleep(0.01)
    raise AssertionError(f"{pattern} never appeared")


# ------------------------------------------------------------------ signals
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resume_matches(builtin_cache, tmp_path, sig):
    args = SMALL + ["--max-steps", "40", "--train.ckpt_every", "1000"]
    ref = pretrain(args + ["--out", str(tmp_path / "ref")], builtin_cache)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "d2v_fast.pretrain", *args, "--out", str(run)],
                            env=subprocess_env(builtin_cache), stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and
                                          len((run / "metrics.jsonl").read_text().splitlines()) >= 5):
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped on request" in err
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 5 <= int(ckpts[0].name[5:]) < 40  # mid-run checkpoint, no ckpt_every hit
    res = pretrain(args + ["--out", str(run)], builtin_cache)  # the same command continues
    assert res.returncode == 0, res.stderr
    assert losses(run) == losses(tmp_path / "ref")


@pytest.mark.slow
def test_second_signal_exits_at_once(builtin_cache, tmp_path):
    run = tmp_path / "run"
    slow = ["--config", "tiny", "--batch-size", "256", "--data.num_workers", "0", "--train.progress", "false",
            "--train.log_every", "1"]  # a few seconds per step: the later signals land inside a step
    proc = subprocess.Popen([sys.executable, "-m", "d2v_fast.pretrain", *slow, "--max-steps", "100000",
                             "--out", str(run)], env=subprocess_env(builtin_cache), stderr=subprocess.DEVNULL, cwd=ROOT)
    wait_for(run, "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # two pending signals of one kind would merge into one
    proc.send_signal(signal.SIGTERM)  # within a second: the same request (scheduler and launcher both sent it)
    time.sleep(1.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not (run / "checkpoints").is_dir() or not list((run / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_sigkill_at_random_points_always_resumes(builtin_cache, tmp_path):
    """Several kills, some landing inside checkpoint writes (a checkpoint every step)."""
    args = SMALL + ["--max-steps", "25", "--train.ckpt_every", "1", "--train.keep_last", "2"]
    ref = pretrain(args + ["--out", str(tmp_path / "ref")], builtin_cache)
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(os.urandom(8))
    run = tmp_path / "run"
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "d2v_fast.pretrain", *args, "--out", str(run)],
                                env=subprocess_env(builtin_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=ROOT)
        wait_for(run / "checkpoints", "*", proc)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        for ck in (run / "checkpoints").glob("step-*"):  # every complete-looking checkpoint is complete
            assert all((ck / f).is_file() for f in ("state.pt", "model.safetensors", "rng-rank0.pt", "config.json"))
    res = pretrain(args + ["--out", str(run)], builtin_cache)
    assert res.returncode == 0, res.stderr
    assert losses(run) == losses(tmp_path / "ref")


# ------------------------------------------------------------------ non-finite steps
def test_injected_nan_is_skipped_and_counted(builtin_cache, tmp_path):
    run = tmp_path / "run"
    res = pretrain(SMALL + ["--max-steps", "6", "--out", str(run)], builtin_cache, D2V_FAST_INJECT_NAN="3")
    assert res.returncode == 0, res.stderr
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]  # six good updates: the bad attempt was skipped
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in recs)
    assert "1 update(s) skipped" in res.stderr


def test_repeated_nan_stops_with_a_clear_error_and_a_good_checkpoint(builtin_cache, tmp_path):
    run = tmp_path / "run"
    res = pretrain(SMALL + ["--max-steps", "10", "--out", str(run), "--train.max_skipped_steps", "3"],
                   builtin_cache, D2V_FAST_INJECT_NAN="4,5,6,7")
    assert res.returncode == 1
    line = one_error_line(res)
    assert "3 updates in a row had non-finite loss or gradients" in line and "step 3" in line
    state = final_state(run)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------ bad data
@pytest.fixture
def corpus_copy(builtin_cache, tmp_path):
    dst = tmp_path / "corpus"
    shutil.copytree(builtin_cache, dst)
    return dst


def test_truncated_shard_is_rejected(builtin_cache, corpus_copy):
    shard = corpus_copy / "tokens-00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    res = pretrain(SMALL + ["--data", str(corpus_copy), "--max-steps", "2"], builtin_cache)
    assert res.returncode == 2
    line = one_error_line(res)
    assert str(shard) in line and "bytes, expected" in line


@pytest.mark.parametrize("mode", ["--verify-data", "background"])
def test_altered_shard_is_rejected(builtin_cache, corpus_copy, tmp_path, mode):
    shard = corpus_copy / "tokens-00000.bin"
    data = bytearray(shard.read_bytes())
    data[1000:1004] = bytes([7, 0, 8, 0]) if data[1000:1004] != bytes([7, 0, 8, 0]) else bytes([9, 0, 9, 0])
    shard.write_bytes(bytes(data))
    extra = ["--verify-data"] if mode == "--verify-data" else ["--data.verify", "background"]
    res = pretrain(SMALL + ["--data", str(corpus_copy), "--max-steps", "200", "--out", str(tmp_path / "r")] + extra,
                   builtin_cache)
    assert res.returncode == 2
    line = one_error_line(res)
    assert str(shard) in line and "sha256 differs" in line


def test_token_ids_outside_the_vocabulary_are_rejected(builtin_cache, corpus_copy):
    import hashlib

    shard = corpus_copy / "tokens-00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[500] = 60000  # the vocabulary has 8192 ids
    tokens.tofile(shard)
    meta = json.loads((corpus_copy / "meta.json").read_text())
    meta["shards"][0]["sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()  # only the id check can tell
    (corpus_copy / "meta.json").write_text(json.dumps(meta))
    res = pretrain(SMALL + ["--data", str(corpus_copy), "--verify-data", "--max-steps", "2"], builtin_cache)
    assert res.returncode == 2
    line = one_error_line(res)
    assert str(shard) in line and "token id 60000" in line and "outside the vocabulary" in line


def test_tokenizer_that_does_not_match_the_corpus_is_refused(builtin_cache, corpus_copy):
    tj = corpus_copy / "tokenizer" / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"<unk>"', '"<UNK>"', 1))
    res = pretrain(SMALL + ["--data", str(corpus_copy), "--max-steps", "2"], builtin_cache)
    assert res.returncode == 2
    line = one_error_line(res)
    assert str(tj) in line and "does not match the tokenizer checksum" in line


# ------------------------------------------------------------------ scale-out
@pytest.mark.slow
def test_fsdp_two_processes_match_one(builtin_cache, tmp_path):
    args = SMALL + NODROP + ["--max-steps", "4"]
    one = pretrain(args + ["--out", str(tmp_path / "one")], builtin_cache)
    assert one.returncode == 0, one.stderr
    two = pretrain(args + ["--out", str(tmp_path / "fsdp"), "--parallel", "fsdp"], builtin_cache, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-4 * abs(a[s]), (s, a[s], b[s])
    # the checkpoint is a full, unsharded one
    sa, sb = final_state(tmp_path / "one")["model"], final_state(tmp_path / "fsdp")["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_in_one_process(builtin_cache, tmp_path, parallel):
    args = SMALL + NODROP + ["--max-steps", "6"]
    ref = pretrain(args + ["--out", str(tmp_path / "ref")], builtin_cache)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    two = pretrain(SMALL + NODROP + ["--max-steps", "3", "--out", str(run), "--parallel", parallel],
                   builtin_cache, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = pretrain(args + ["--out", str(run)], builtin_cache)
    assert one.returncode == 0, one.stderr
    assert "resumed from" in one.stderr and "(step 3)" in one.stderr
    a, b = losses(tmp_path / "ref"), losses(run)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-4 * abs(a[s]), (s, a[s], b[s])


@pytest.mark.slow
def test_elastic_restart_resumes_automatically(builtin_cache, tmp_path):
    """A worker that dies is restarted by torchrun --max-restarts and carries on from the last
    checkpoint, with no --out given (the default run directory survives the restart)."""
    args = SMALL + ["--max-steps", "8", "--train.ckpt_every", "2"]
    ref = pretrain(args + ["--out", str(tmp_path / "ref")], builtin_cache)
    assert ref.returncode == 0, ref.stderr
    work = tmp_path / "work"
    work.mkdir()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          "--max-restarts=1", "-m", "d2v_fast.pretrain", *args],
                         env=subprocess_env(builtin_cache, D2V_FAST_CRASH_AT_STEP="5"), capture_output=True, text=True,
                         timeout=300, cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [p for p in (work / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, runs  # one run directory across the restart
    assert "resumed from" in res.stderr and "(step 4)" in res.stderr
    assert losses(runs[0]) == losses(tmp_path / "ref")


@pytest.mark.slow
def test_soak_200_steps_five_kills(builtin_cache, tmp_path):
    args = SMALL + ["--max-steps", "200", "--train.ckpt_every", "10"]
    ref = pretrain(args + ["--out", str(tmp_path / "ref")], builtin_cache)
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(os.urandom(8))
    run = tmp_path / "run"
    targets = sorted(rng.sample(range(5, 195), 5))
    for target in targets:  # each kill lands after step `target`, at a random moment
        proc = subprocess.Popen([sys.executable, "-m", "d2v_fast.pretrain", *args, "--out", str(run)],
                                env=subprocess_env(builtin_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=ROOT)
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            try:
                if lines and json.loads(lines[-1])["step"] >= target:
                    break
            except json.JSONDecodeError:
                pass
            assert proc.poll() is None, "the run ended before its kill"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = pretrain(args + ["--out", str(run)], builtin_cache)
    assert res.returncode == 0, res.stderr
    a, b = final_state(tmp_path / "ref"), final_state(run)
    assert a["step"] == b["step"] == 200
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(run) == losses(tmp_path / "ref")
