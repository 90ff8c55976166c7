"""One full optimizer step (student fwd/bwd, teacher fwd, targets, loss, AdamW, EMA) for both
recipes (text, and images: ``test_image_step``), providers ``d2v_fast``, ``hf`` (plain Hugging Face ``transformers``, data2vec only),
``reference`` and ``reference+compile``.

Each benchmark's rounds are single steps: the provider's model is built, its batch made and
its warm-up steps run before the timed function, which is one step (synchronised on CUDA),
called for several rounds. So the table's columns (min, mean, median, ...) are the time of one
step, and their ratios between providers are per-step ratios. The row's tokens/s (input units:
patches for images), masked targets/s, model TFLOP/s, MFU and peak memory, computed from the
median step, are in extra_info.

On CUDA: data2vec base and data2vec2 base at T = 512, bf16 autocast; on CPU: the tiny preset
at a small batch, so CI keeps the file working (``reference+compile`` only on CUDA: compiling
on 2 CPU cores takes minutes). ``D2V_BENCH_WRITE=1`` also writes
``benchmarks/results/step-<device>.json``.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path

import pytest
import torch

from d2v_fast.steptimer import PROVIDERS, environment, make_step, measure_batch, result_row
from d2v_fast.config import preset

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
VOCAB = 50265  # RoBERTa's, as d2v_fast.bench
RESULTS: list[dict] = []


def config_for(recipe: str):
    if CUDA:
        cfg = preset("base", recipe)
        batch = 32 if recipe == "data2vec" else 8  # data2vec2 multiplies by 8 clones
    else:
        cfg = preset("tiny", recipe)
        cfg.data.seq_len = 64
        batch = 8 if recipe == "data2vec" else 4
    cfg.data.num_workers, cfg.train.progress = 0, False
    return cfg, batch


def _sync():
    if CUDA:
        torch.cuda.synchronize(DEVICE)


def time_steps(benchmark, provider: str, cfg, batch_size: int, *, rounds: int, warmup: int) -> dict:
    """Build the provider's step and batch and warm it up untimed, then time ``rounds`` single
    steps through ``benchmark``; the row (as ``d2v_fast.steptimer.measure`` writes it) from the
    median step."""
    batch = measure_batch(cfg, DEVICE, batch_size, VOCAB)
    step = make_step(provider, cfg, DEVICE, VOCAB)
    for _ in range(warmup):
        step(batch)
    _sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats(DEVICE)
    seconds = []

    def one_step():
        t0 = time.perf_counter()
        step(batch)
        _sync()
        seconds.append(time.perf_counter() - t0)

    benchmark.pedantic(one_step, rounds=rounds, iterations=1, warmup_rounds=0)
    s = statistics.median(seconds)
    if getattr(benchmark, "stats", None) is not None:  # the table's median is this step's (not --benchmark-disable)
        table = benchmark.stats.stats.median
        assert abs(table - s) <= 0.05 * s + 1e-3, (table, s)
    peak_mem = torch.cuda.max_memory_allocated(DEVICE) if CUDA else None
    return {**result_row(provider, cfg, batch, batch_size, s, peak_mem, DEVICE), "steps_timed": len(seconds),
            "warmup_steps": warmup}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("recipe", ["data2vec", "data2vec2"])
def test_step(benchmark, recipe, provider):
    if provider == "reference+compile" and not CUDA:
        pytest.skip("reference+compile: CUDA only (torch.compile of the reference takes minutes on 2 CPU cores)")
    if provider == "hf" and recipe != "data2vec":
        pytest.skip("hf: data2vec only (data2vec 2.0's kept-token student is no plain transformers model)")
    if provider == "hf":
        pytest.importorskip("transformers", reason="the hf provider needs transformers")
    cfg, batch = config_for(recipe)
    rounds, warmup = (20, 5) if CUDA else (3, 1)
    row = time_steps(benchmark, provider, cfg, batch, rounds=rounds, warmup=warmup)
    row["recipe"] = recipe
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    assert row["steps_timed"] == (1 if benchmark.disabled else rounds)  # one step per round
    assert row["tokens_per_s"] > 0 and row["masked_targets_per_s"] > 0


@pytest.mark.parametrize("provider", ["d2v_fast", "reference"])
@pytest.mark.parametrize("recipe", ["data2vec", "data2vec2"])
def test_image_step(benchmark, recipe, provider):
    """Images: ViT-B/16 at 224 on CUDA (data2vec batch 64, data2vec2 batch 16 x 16 clones),
    the tiny preset on CPU; tokens/s counts patches."""
    pytest.importorskip("PIL", reason="images need Pillow")
    cfg = preset("base" if CUDA else "tiny", recipe, "images")
    batch = (64 if recipe == "data2vec" else 16) if CUDA else 4
    cfg.data.num_workers, cfg.train.progress = 0, False
    rounds, warmup = (20, 5) if CUDA else (3, 1)
    row = time_steps(benchmark, provider, cfg, batch, rounds=rounds, warmup=warmup)
    row["recipe"] = recipe
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    assert row["unit"] == "patches" and row["tokens_per_s"] > 0 and row["masked_targets_per_s"] > 0


@pytest.fixture(scope="module", autouse=True)
def write_results():
    """After the module: benchmarks/results/step-<device>.json, when D2V_BENCH_WRITE=1."""
    yield
    if os.environ.get("D2V_BENCH_WRITE") != "1" or not RESULTS:
        return
    env = environment(DEVICE)
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower() or DEVICE.type
    path = Path(__file__).parent / "results" / f"step-{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**env, "benchmark": "step", "rows": RESULTS}, indent=2) + "\n")
    os.replace(tmp, path)
