"""Host time of one op call, without the GPU work: what the Python side of each fused op
costs before its kernel runs (docs/performance.md: at batch 32 the host needed ~66 ms to launch a step
whose GPU work was ~47 ms, and the masked gather, scatter and loss measured slower than
their eager twins at base shapes).

    python -m pytest benchmarks/test_host_overhead.py -q
    D2V_BENCH_WRITE=1 python -m pytest benchmarks/test_host_overhead.py -q   # + results JSON

Every Triton kernel launch is replaced by a no-op and the ops run on small CPU tensors, so a
row is the cost of argument checks, allocations, the small torch ops around the launch
(cumsum, asserts), autograd, and the dispatch to the launcher; the launch itself (Triton's
own host code) is not in it. Providers: ``direct`` (the default: the launchers through
autograd Functions, ``d2v_fast.kernels.direct``), ``custom_op`` (through the
``torch.library`` custom ops, as under ``torch.compile``; ``D2V_KERNEL_DISPATCH=custom_op``)
and ``eager`` (the eager twin, computing for real at this tiny size). The numbers are this
machine's CPU; on a GPU host the same rows are in benchmarks/test_kernels.py as
``time_ms - device_ms``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from d2v_fast import kernels  # noqa: E402
from d2v_fast.kernels import eager as twin  # noqa: E402
from d2v_fast.kernels import ema as kema  # noqa: E402
from d2v_fast.kernels import gather as kgather  # noqa: E402
from d2v_fast.kernels import loss as kloss  # noqa: E402
from d2v_fast.kernels import targets as ktargets  # noqa: E402

from ._results import host_times, write_results  # noqa: E402

RESULTS: list[dict] = []
RESULTS_FILE = Path(__file__).parent / "results" / "host-overhead-cpu.json"
KERNELS = [(kgather, "_move_rows_kernel"), (kloss, "_regression_loss_kernel"), (kloss, "_scale_rows_kernel"),
           (ktargets, "_targets_time_kernel"), (ktargets, "_targets_token_kernel"),
           (ktargets, "_instance_stats_kernel"), (ktargets, "_instance_finalize_kernel"),
           (ktargets, "_instance_apply_kernel"), (kema, "_ema_flat_kernel"), (kema, "_ema_multi_kernel")]


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def no_launches(monkeypatch):
    if not kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, _NoLaunch())
    for module in (kgather, kloss, ktargets, kema):
        monkeypatch.setattr(module, "check_device", lambda *args: None)
    monkeypatch.setattr(kernels, "DISPATCH", kernels.DISPATCH)  # restored after the test


@pytest.fixture(scope="module", autouse=True)
def write():
    yield
    write_results(RESULTS_FILE, "host_overhead", "kernel launches replaced by no-ops; CPU tensors B=4, T=64, C=32, "
                  "K=3; host_us: 10th percentile of 1000 calls, median_us: median (microseconds)", RESULTS)


def _inputs():
    g = torch.Generator().manual_seed(0)
    B, T, C, K = 4, 64, 32, 3
    mask = torch.rand(B, T, generator=g) < 0.31
    N = int(mask.sum())
    return dict(x=torch.randn(B, T, C, generator=g, requires_grad=True), mask=mask, N=N,
                rows=torch.randn(N, C, generator=g, requires_grad=True), fill=torch.randn(C, generator=g),
                target=torch.randn(N, C, generator=g), layers=[torch.randn(B, T, C, generator=g) for _ in range(K)],
                teacher=torch.randn(5000, generator=g), student=torch.randn(5000, generator=g))


def _calls(side):
    gather, scatter = (kgather.masked_gather, kgather.masked_scatter) if side != "eager" else \
        (twin.masked_gather, twin.masked_scatter)
    loss = kloss.regression_loss if side != "eager" else twin.regression_loss
    targets = ktargets.build_targets if side != "eager" else twin.build_targets
    ema = kema.ema_update_ if side != "eager" else twin.ema_update_
    return {
        "masked_gather": lambda d: gather(d["x"], d["mask"]),
        "masked_gather_counted": lambda d: gather(d["x"], d["mask"], d["N"]),
        "masked_gather_fwd_bwd": lambda d: torch.autograd.grad(gather(d["x"], d["mask"], d["N"]).sum(), d["x"]),
        "masked_scatter": lambda d: scatter(d["rows"].detach(), d["mask"], d["fill"]),
        "regression_loss_fwd_bwd": lambda d: torch.autograd.grad(loss(d["rows"], d["target"], beta=4.0), d["rows"]),
        "build_targets_counted": lambda d: targets(d["layers"], mask=d["mask"], count=d["N"]),
        "ema_update": lambda d: ema(d["teacher"], d["student"], 0.999),
    }


@pytest.mark.parametrize("op", list(_calls("direct")))
@pytest.mark.parametrize("provider", ["direct", "custom_op", "eager"])
def test_host_overhead(benchmark, no_launches, provider, op):
    d = _inputs()
    kernels.DISPATCH = "custom_op" if provider == "custom_op" else "direct"
    fn = _calls(provider)[op]
    benchmark.group = f"host {op}"
    benchmark.pedantic(lambda: fn(d), rounds=200, iterations=1, warmup_rounds=20)
    row = {"op": op, "provider": provider, **host_times(lambda: fn(d), 1000)}
    benchmark.extra_info.update(row)
    RESULTS.append(row)
