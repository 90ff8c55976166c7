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

SKIP_FLAG_READ = "aten::_local_scalar_dense at trainer.py:{}".format(
    next(i for i, line in enumerate(open(cost.__file__.replace("cost.py", "trainer.py")), 1)
         if "return bool(self._flag_host[0])" in line))


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
    # the one wait left: the host reads the update's finite flag once backward has ended (the
    # optimizer and the EMA are queued already), in Trainer._update_on_device
    assert engine["syncs"] == 1 and list(engine["sync_sites"]) == [SKIP_FLAG_READ], engine["sync_sites"]
    assert engine["ops"] < hf["ops"] and engine["kernels"] < hf["kernels"] and engine["casts"] < hf["casts"]
