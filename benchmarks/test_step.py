"""One full optimizer step (student fwd/bwd, teacher fwd, targets, loss, AdamW, EMA) for both
recipes (text, and images: ``test_image_step``), providers ``d2v_fast``, ``hf`` (plain Hugging Face ``transformers``, data2vec only),
``reference`` and ``reference+compile``.

On CUDA: data2vec base and data2vec2 base at T = 512, bf16 autocast, timed with device events;
on CPU: the tiny preset at a small batch, so CI keeps the file working (``reference+compile``
only on CUDA: compiling on 2 CPU cores takes minutes). Each benchmark stores tokens/s,
masked targets/s, model TFLOP/s, MFU and peak memory in extra_info;
``D2V_BENCH_WRITE=1`` also writes ``benchmarks/results/step-<device>.json``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from d2v_fast.bench import PROVIDERS, environment, measure
from d2v_fast.config import preset

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
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
    steps, warmup = (20, 5) if CUDA else (3, 1)

    def run():
        return measure(provider, cfg, device=DEVICE, batch_size=batch, steps=steps, warmup=warmup)

    row = benchmark.pedantic(run, rounds=1, iterations=1)
    row["recipe"] = recipe
    benchmark.extra_info.update(row)
    RESULTS.append(row)
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
    steps, warmup = (20, 5) if CUDA else (2, 1)

    def run():
        return measure(provider, cfg, device=DEVICE, batch_size=batch, steps=steps, warmup=warmup)

    row = benchmark.pedantic(run, rounds=1, iterations=1)
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
    path.write_text(json.dumps({**env, "benchmark": "step", "rows": RESULTS}, indent=2) + "\n")
