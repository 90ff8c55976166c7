"""Host time of one forward and backward through the step's two per-block autograd nodes,
the C++ ones (``csrc/autograd.cpp``, ``d2v_fast._C``) against their Python Functions (the
twins that run while compiling or without the extension): a shadowed Linear (the student's
bf16 weight copy, gradients to the fp32 parameters) and the dual LayerNorm (fp32 output and
its bf16 rounding, one backward node).

    python -m pytest benchmarks/test_autograd_nodes.py -q
    D2V_BENCH_WRITE=1 python -m pytest benchmarks/test_autograd_nodes.py -q   # + results JSON

Tiny CPU tensors under bf16 autocast (16 rows of 8): what is left is the host's work, Python,
the dispatcher and autograd, plus this CPU's arithmetic, the same in both rows (its bf16
GEMMs cost some microseconds even here). The dual LayerNorm's forward runs its eager twin in
both rows (on a GPU the Triton kernel), so its rows differ by the node alone.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2v_fast import ops
from d2v_fast.models import encoder

from ._results import host_times, write_results

RESULTS: list[dict] = []
RESULTS_FILE = Path(__file__).parent / "results" / "autograd-nodes-cpu.json"
C = ops.native()


@pytest.fixture(scope="module", autouse=True)
def write():
    yield
    write_results(RESULTS_FILE, "autograd_nodes", "one forward + backward, CPU tensors [16, 8] under bf16 "
                  "autocast; host_us: 10th percentile of 2000 calls, median_us: median (microseconds)", RESULTS)


def _call(op: str, provider: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    if op == "shadow_linear":
        weight = torch.randn(24, 8, generator=g, requires_grad=True)
        bias = torch.randn(24, generator=g, requires_grad=True)
        w, b = weight.detach().to(torch.bfloat16), bias.detach().to(torch.bfloat16)
        w_t = w.t()
        inputs = (x, weight, bias)
        if provider == "cpp":
            def forward():
                return C.shadow_linear(x, weight, bias, w, w_t, b, None, False)
        else:
            def forward():
                return encoder._ShadowLinearFn.apply(x, weight, bias, w, w_t, b, None)
    else:
        weight = torch.randn(8, generator=g, requires_grad=True)
        bias = torch.randn(8, generator=g, requires_grad=True)
        inputs = (x, weight, bias)
        native = [C] if provider == "cpp" else [None]

        def forward():
            saved = ops._NATIVE[:]
            ops._NATIVE[:] = native
            try:
                y, y_low = ops.layer_norm_dual(x, weight, bias, 1e-5)
            finally:
                ops._NATIVE[:] = saved
            return y + y_low  # both outputs used: the backward sums their gradients

    def fwd_bwd():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward()
        torch.autograd.backward(out, torch.ones_like(out), inputs=list(inputs))
        for t in inputs:
            t.grad = None
    return fwd_bwd


@pytest.mark.skipif(C is None, reason="d2v_fast._C without the autograd nodes (pip install --no-build-isolation -e .)")
@pytest.mark.parametrize("provider", ["cpp", "python"])
@pytest.mark.parametrize("op", ["shadow_linear", "layer_norm_dual"])
def test_autograd_node_host(benchmark, op, provider):
    fn = _call(op, provider)
    benchmark.group = f"node {op}"
    benchmark.pedantic(fn, rounds=200, iterations=1, warmup_rounds=20)
    row = {"op": op, "provider": provider, **host_times(fn, 2000)}
    benchmark.extra_info.update(row)
    RESULTS.append(row)
