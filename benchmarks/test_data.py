"""The data path alone: blocks → batches → masks through the DataLoader (worker
processes), in tokens/s, for both recipes' masking at T = 512. Issue target: at least 5×
the training step's token rate, so the GPU never waits on data.

    D2V_BENCH_WRITE=1 python -m pytest benchmarks/test_data.py --benchmark-only
writes benchmarks/results/data-<device>.json.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from d2v_fast.steptimer import environment
from d2v_fast.data.text.builtin import builtin_corpus
from d2v_fast.data.text.corpus import open_corpus
from d2v_fast.data.text.dataset import MaskingConfig, build_dataloader

import torch

T, BATCH = 512, 32
WORKERS = min(4, os.cpu_count() or 1)
RESULTS: list[dict] = []
MASKING = {"data2vec": MaskingConfig("span", 0.35, 4), "data2vec2": MaskingConfig("random", 0.48, clones=8)}


@pytest.fixture(scope="module")
def corpus():
    return open_corpus(builtin_corpus(progress=False))


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if os.environ.get("D2V_BENCH_WRITE") == "1" and RESULTS:
        env = environment(torch.device("cpu"))
        path = Path(__file__).parent / "results" / "data-cpu.json"
        path.write_text(json.dumps({**env, "benchmark": "data", "rows": RESULTS}, indent=2) + "\n")


@pytest.mark.parametrize("recipe", list(MASKING))
def test_dataloader_tokens_per_s(benchmark, corpus, recipe):
    def run():
        # A whole epoch, worker start-up included: a lower bound on the steady rate, and
        # free of the prefetch queue that fills while the first batch is awaited.
        t0 = time.perf_counter()
        loader = build_dataloader(corpus, seq_len=T, micro_batch_size=BATCH, global_batch_size=BATCH,
                                  masking=MASKING[recipe], num_workers=WORKERS)
        n = 0
        for batch in loader:
            n += 1
        dt = time.perf_counter() - t0
        assert n >= 10 and batch["mask"].shape[0] == BATCH * MASKING[recipe].clones
        return n * BATCH * T / dt

    tokens_per_s = benchmark.pedantic(run, rounds=1, iterations=1)
    row = {"recipe": recipe, "seq_len": T, "batch": BATCH, "workers": WORKERS, "tokens_per_s": tokens_per_s}
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    assert tokens_per_s > 0
