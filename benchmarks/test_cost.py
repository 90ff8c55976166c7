"""What one optimizer update costs the host, on the CPU (``d2v_fast/cost.py``): ops dispatched,
kernel launches, host syncs and dtype casts of the data2vec text step with the CUDA path
emulated, for the engine at its defaults and the plain Hugging Face step; the timed call is one
engine update at the narrow width (host time). The base-size rows of every modality are
``python -m d2v_fast.bench --cost --suite --json benchmarks/results/step-cost-cpu.json``; here the
tiny preset keeps CI quick.
"""
from __future__ import annotations

import pytest
import torch

from d2v_fast import cost

@pytest.fixture(scope="module")
def rows():
    pytest.importorskip("transformers", reason="the hf provider needs transformers")
    cfg = cost.cost_config("text", "data2vec", "tiny")
    return {p: cost.measure_cost(p, cfg, time_it=False) for p in ("d2v_fast", "hf")}


def test_step_cost(benchmark, rows):
    engine, hf = rows["d2v_fast"], rows["hf"]
    cfg = cost.narrow(cost.cost_config("text", "data2vec", "tiny"))
    with cost.cuda_path_on_cpu():
        step, batch = cost._make("d2v_fast", cfg, torch.device("cpu"), cost.NARROW_VOCAB)
        step(batch)
        benchmark.pedantic(lambda: step(batch), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({f"{k}_{p}": r[k] for p, r in rows.items() for k in ("ops", "kernels", "syncs",
                                                                                    "casts")})
    assert engine["finite"]
    # no wait inside an update: the finite flag is read in the next one (Trainer.settle)
    assert engine["syncs"] == 0, engine["sync_sites"]
    assert engine["ops"] < hf["ops"] and engine["kernels"] < hf["kernels"] and engine["casts"] < hf["casts"]
