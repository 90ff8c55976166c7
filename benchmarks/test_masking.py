"""Masking throughput: the C++ path (`d2v_fast`), the NumPy per-row loop
(`reference`, d2v_fast/reference/masking.py) and the pure-Python fallback
(`python_fallback`), on a 256 x 512 text batch.

    python -m pytest benchmarks/test_masking.py --benchmark-only -q
    D2V_BENCH_WRITE=1 python -m pytest benchmarks/test_masking.py --benchmark-only -q

The second form also writes benchmarks/results/masking-cpu.json. Each benchmark stores
masks/s (output rows per second) and samples/s in extra_info;
test_span_mask_speedup_vs_reference asserts the C++ path is >= 20x the NumPy loop.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

from d2v_fast.data.text import masking
from d2v_fast.reference import masking as reference

B, T = 256, 512
SPAN = dict(mask_prob=0.35, span=4)  # data2vec text v1 (fairseq config/text/pretraining/base.yaml)
RANDOM = dict(mask_prob=0.48, clones=8)  # data2vec 2.0 text (config/v2/base_text_only_task.yaml)
MIN_SPEEDUP = 20.0  # C++ span_mask vs the NumPy loop, 2-core CPU
RESULTS_PATH = Path(__file__).parent / "results" / "masking-cpu.json"

# (op, provider) -> {"mean_s", "masks_per_s", "samples_per_s"}, filled as benchmarks run.
RESULTS: dict[tuple[str, str], dict] = {}
SPEEDUP: dict[str, float] = {}


def batch():
    """<s> ... </s> rows, every 16th row padded after a random length."""
    g = torch.Generator().manual_seed(0)
    maskable = torch.ones(B, T, dtype=torch.bool)
    maskable[:, 0] = False
    maskable[:, -1] = False
    for b in range(0, B, 16):
        length = int(torch.randint(T // 4, T, (1,), generator=g))
        maskable[b, length - 1 :] = False
    return maskable, torch.arange(1000, 1000 + B)


def provider_fn(op, provider, monkeypatch):
    if provider == "d2v_fast":
        if masking._C is None:
            pytest.skip("d2v_fast._C is not built: python setup.py build_ext --inplace")
        return getattr(masking, op)
    if provider == "reference":
        return getattr(reference, op)
    monkeypatch.setattr(masking, "_C", None)  # the public API, forced onto the fallback
    return getattr(masking, op)


def record(benchmark, op, provider, rows_out):
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return None
    mean, median = benchmark.stats.stats.mean, benchmark.stats.stats.median
    entry = {"mean_s": mean, "median_s": median, "masks_per_s": rows_out / mean, "samples_per_s": B / mean}
    benchmark.extra_info.update(entry)
    RESULTS[(op, provider)] = entry
    return mean


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if os.environ.get("D2V_BENCH_WRITE", "0") != "1" or not RESULTS:
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    doc = {
        "benchmark": "masking",
        "device": "cpu",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": [B, T],
        "span_mask": SPAN,
        "random_mask": RANDOM,
        "results": [{"op": op, "provider": provider, **entry} for (op, provider), entry in RESULTS.items()],
        "span_mask_speedup_vs_reference_median": SPEEDUP.get("span_mask"),
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(doc, indent=2) + "\n")


@pytest.mark.parametrize("provider", ["d2v_fast", "reference", "python_fallback"])
def test_span_mask(benchmark, provider, monkeypatch):
    benchmark.group = "span_mask 256x512 p=0.35 span=4"
    fn = provider_fn("span_mask", provider, monkeypatch)
    maskable, indices = batch()
    mask = benchmark(fn, maskable, seed=0, epoch=0, indices=indices, **SPAN)
    assert mask.shape == (B, T) and not (mask & ~maskable).any()
    record(benchmark, "span_mask", provider, B)


@pytest.mark.parametrize("provider", ["d2v_fast", "reference", "python_fallback"])
def test_random_mask(benchmark, provider, monkeypatch):
    benchmark.group = "random_mask 256x512 p=0.48 clones=8"
    fn = provider_fn("random_mask", provider, monkeypatch)
    maskable, indices = batch()
    # The fallback takes ~0.5-1 s a call here: a few rounds are enough.
    run = (lambda f, *a, **k: benchmark.pedantic(f, a, k, rounds=3, iterations=1)) \
        if provider == "python_fallback" else benchmark
    mask = run(fn, maskable, seed=0, epoch=0, indices=indices, **RANDOM)
    assert mask.shape == (B * RANDOM["clones"], T)
    record(benchmark, "random_mask", provider, B * RANDOM["clones"])


def _median_seconds(fn, rounds=11, **kwargs):
    fn(**kwargs)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(**kwargs)
        times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2]


def test_span_mask_speedup_vs_reference(benchmark):
    """C++ span_mask >= 20x the NumPy per-row loop on this batch. Medians, so that other
    processes on a shared machine do not decide it; the C++ side is measured anew, the
    reference is reused from test_span_mask[reference] when that ran."""
    if masking._C is None:
        pytest.skip("d2v_fast._C is not built: python setup.py build_ext --inplace")
    benchmark.group = "span_mask speedup"
    maskable, indices = batch()
    kwargs = dict(maskable=maskable, seed=0, epoch=0, indices=indices, **SPAN)
    benchmark(masking.span_mask, **kwargs)
    if benchmark.stats is None:
        pytest.skip("benchmarks disabled: run with --benchmark-only")
    ours = benchmark.stats.stats.median
    ref = RESULTS.get(("span_mask", "reference"), {}).get("median_s") or _median_seconds(reference.span_mask, **kwargs)
    ratio = ref / ours
    SPEEDUP["span_mask"] = ratio
    benchmark.extra_info.update(speedup_vs_reference=ratio, median_s=ours, reference_median_s=ref)
    print(f"\nspan_mask {B}x{T}: d2v_fast {B / ours:,.0f} masks/s, reference {B / ref:,.0f} masks/s, "
          f"speedup {ratio:.1f}x (medians; target >= {MIN_SPEEDUP:.0f}x)")
    assert ratio >= MIN_SPEEDUP, f"d2v_fast span_mask only {ratio:.1f}x the NumPy reference"
