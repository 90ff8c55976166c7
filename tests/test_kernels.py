"""The fused kernels (d2v_fast/kernels) against their eager twins (d2v_fast/kernels/eager.py)
and against an independent float64 recomputation written here, forward and backward.

On CPU the Triton side runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before anything imports triton), in fp32 and at small, awkward shapes. The interpreter also
handles bf16 loads and stores, so the EMA test uses a real bf16 student. The `gpu` tests
need CUDA and compiled kernels:

    TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py -m gpu
"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d2v_fast import kernels, ops
from d2v_fast.kernels import ema as kema
from d2v_fast.kernels import gather as kgather
from d2v_fast.kernels import loss as kloss
from d2v_fast.kernels import targets as ktargets
from d2v_fast.kernels import eager as twin

INTERPRETED = kernels.is_interpreted(kgather._move_rows_kernel)
cpu_triton = pytest.mark.skipif(not (kernels.AVAILABLE and INTERPRETED),
                                reason="the Triton side on CPU needs triton and TRITON_INTERPRET=1 before import")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED or not kernels.AVAILABLE,
    reason="needs CUDA and triton, with the kernels compiled (run with TRITON_INTERPRET=0)")

NORM_COMBOS = list(itertools.product([None, "instance", "layer"], repeat=2))


@pytest.fixture
def triton_side(poisoned):
    ops.set_kernels("triton")
    yield
    ops.set_kernels("auto")


def close(a: torch.Tensor, b: torch.Tensor, atol=1e-5, rtol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "non-finite (unwritten?) elements"
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def random_mask(B, T, p=0.4):
    """Row 0 all true, row 1 (when B > 1) all false, the rest random."""
    m = torch.rand(B, T) < p
    m[0] = True
    if B > 1:
        m[1] = False
    return m


# ----------------------------------------------------------------------------- gather / scatter
GATHER_SHAPES = [(1, 1, 1), (3, 7, 17), (2, 13, 33), (4, 1, 5), (2, 5, 300)]


def gather_loops(x, mask):
    B, T, _ = x.shape
    rows = [x[b, t] for b in range(B) for t in range(T) if mask[b, t]]
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[-1])


def scatter_loops(rows, mask, fill):
    B, T = mask.shape
    C = rows.shape[-1]
    out = torch.zeros(B, T, C, dtype=torch.float64)
    i = 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                out[b, t] = rows[i]
                i += 1
            elif fill is not None:
                out[b, t] = fill if fill.dim() == 1 else fill[b, t]
    return out


@cpu_triton
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["mixed", "all", "none"])
def test_masked_gather(triton_side, shape, kind):
    B, T, C = shape
    mask = {"mixed": random_mask(B, T), "all": torch.ones(B, T, dtype=torch.bool),
            "none": torch.zeros(B, T, dtype=torch.bool)}[kind]
    x = torch.randn(B, T, C, requires_grad=True)
    out, ref = ops.masked_gather(x, mask), twin.masked_gather(x, mask)
    close(out, gather_loops(x.detach().double(), mask), atol=0, rtol=0)
    close(out, ref, atol=0, rtol=0)
    g = torch.randn_like(out)
    (gx,), (gr,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g)
    want = scatter_loops(g.double(), mask, None)
    close(gx, want, atol=0, rtol=0)
    close(gr, want, atol=0, rtol=0)


@cpu_triton
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fill_kind", ["vector", "full", "zeros"])
def test_masked_scatter(triton_side, shape, fill_kind):
    B, T, C = shape
    mask = random_mask(B, T)
    rows = torch.randn(int(mask.sum()), C, requires_grad=True)
    fill = {"vector": lambda: torch.randn(C, requires_grad=True),
            "full": lambda: torch.randn(B, T, C, requires_grad=True), "zeros": lambda: None}[fill_kind]()
    out, ref = ops.masked_scatter(rows, mask, fill), twin.masked_scatter(rows, mask, fill)
    want = scatter_loops(rows.detach().double(), mask, None if fill is None else fill.detach().double())
    close(out, want, atol=0, rtol=0)
    close(ref, want, atol=0, rtol=0)
    g = torch.randn(B, T, C)
    inputs = [rows] if fill is None else [rows, fill]
    grads, grads_ref = torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)
    want = [gather_loops(g.double(), mask)]
    if fill is not None:
        masked_out = g.double().masked_fill(mask[..., None], 0)
        want.append(masked_out.sum(dim=(0, 1)) if fill.dim() == 1 else masked_out)
    for a, r, w in zip(grads, grads_ref, want):
        close(a, w, atol=1e-6 if fill_kind == "vector" else 0, rtol=1e-6)
        close(r, w, atol=1e-6 if fill_kind == "vector" else 0, rtol=1e-6)


@cpu_triton
def test_masked_scatter_checks_row_count(triton_side):
    mask = random_mask(2, 5)
    with pytest.raises(RuntimeError, match="mask.sum"):
        ops.masked_scatter(torch.randn(int(mask.sum()) + 1, 3), mask, torch.zeros(3))
    with pytest.raises(ValueError, match="mask.shape"):
        ops.masked_gather(torch.randn(2, 5, 3), mask[:, :4])


# ----------------------------------------------------------------------------- multi-mask (clones)
CLONE_SHAPES = [(1, 1, 1), (2, 1, 5), (3, 7, 17), (2, 13, 33), (2, 5, 300)]  # T = 1 and primes, odd C


def clone_mask(B, T, clones, kind, p=0.4):
    """``[B*clones, T]``: for "mixed", row 0 (clone 0 of sample 0) all true, row 1 (its clone 1
    when clones > 1) all false, the rest random."""
    if kind == "all":
        return torch.ones(B * clones, T, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(B * clones, T, dtype=torch.bool)
    return random_mask(B * clones, T, p)


class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of every tensor that the ops under it create."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@cpu_triton
@pytest.mark.parametrize("clones", [1, 2, 3])
@pytest.mark.parametrize("shape", CLONE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["mixed", "all", "none"])
def test_masked_gather_clones(triton_side, clones, shape, kind):
    B, T, C = shape
    mask = clone_mask(B, T, clones, kind)
    x = torch.randn(B, T, C, requires_grad=True)
    out, ref = ops.masked_gather(x, mask), twin.masked_gather(x, mask)
    x32 = x.detach().clone().requires_grad_()
    want = x32.repeat_interleave(clones, 0)[mask]  # fp32, with the [B*clones, T, C] copy
    assert out.shape == (int(mask.sum()), C)
    close(out, want, atol=0, rtol=0)
    close(ref, want, atol=0, rtol=0)
    g = torch.randn_like(out)
    (gx,), (gr,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g)
    x64 = x.detach().double().requires_grad_()
    (gw,) = torch.autograd.grad(x64.repeat_interleave(clones, 0)[mask], x64, g.double())
    # a sum of `clones` fp32 values: one rounding per add (none for one clone); two terms
    # round the same in any order, so there the kernel and the twin agree bitwise
    tol = 0 if clones == 1 else 1e-6
    close(gx, gw, atol=tol, rtol=tol)
    close(gr, gw, atol=tol, rtol=tol)
    if clones <= 2:
        close(gx, gr, atol=0, rtol=0)
    (gx2,) = torch.autograd.grad(ops.masked_gather(x, mask), x, g)
    assert torch.equal(gx, gx2)  # no atomics: bitwise reproducible


@cpu_triton
def test_masked_gather_clones_reads_x_in_place(triton_side):
    """No [B*clones, T, C] copy of x: the largest tensor made is the [N, C] output (or its
    gradient [B, T, C]), and the backward is one launch that sums the clones in order."""
    B, T, C, clones = 2, 7, 5, 3
    mask = clone_mask(B, T, clones, "mixed", p=0.3)
    x = torch.randn(B, T, C, requires_grad=True)
    with Allocations() as alloc:
        out = ops.masked_gather(x, mask)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert all(math.prod(sh) < B * clones * T * C for sh in alloc.shapes), alloc.shapes
    close(gx, mask.reshape(B, clones, T).sum(1, dtype=torch.float32)[..., None].expand(B, T, C), atol=0, rtol=0)


@cpu_triton
@pytest.mark.parametrize("clones", [2, 3])
@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 7, 17), (2, 13, 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fill_kind", ["vector", "full", "zeros"])
def test_masked_scatter_at_clone_shapes(triton_side, clones, shape, fill_kind):
    """The data2vec 2.0 decoder input: the student's kept rows of every clone scattered back to
    ``[B*clones, T, C]``; and the round trip from the sample batch through a cloned gather."""
    B, T, C = shape
    mask = clone_mask(B, T, clones, "mixed")  # true = kept by the student
    BC = B * clones
    fill = {"vector": lambda: torch.randn(C, requires_grad=True),
            "full": lambda: torch.randn(BC, T, C, requires_grad=True), "zeros": lambda: None}[fill_kind]()
    x = torch.randn(B, T, C, requires_grad=True)
    rows = ops.masked_gather(x, mask)
    out, ref = ops.masked_scatter(rows, mask, fill), twin.masked_scatter(twin.masked_gather(x, mask), mask, fill)
    assert out.shape == (BC, T, C)
    x64 = x.detach().double().requires_grad_()
    f64 = None if fill is None else fill.detach().double().requires_grad_()
    rows64 = x64.repeat_interleave(clones, 0)[mask]
    want = scatter_loops(rows64, mask, f64)
    close(out, want, atol=0, rtol=0)
    close(ref, want, atol=0, rtol=0)
    g = torch.randn(BC, T, C)
    inputs, inputs64 = ([x], [x64]) if fill is None else ([x, fill], [x64, f64])
    grads, grads_ref = torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)
    grads64 = torch.autograd.grad(want, inputs64, g.double())
    for a, r, w in zip(grads, grads_ref, grads64):
        close(a, w, atol=1e-5, rtol=1e-6)
        close(r, w, atol=1e-5, rtol=1e-6)
    # the scatter alone, rows in the cloned space
    rows = torch.randn(int(mask.sum()), C, requires_grad=True)
    out = ops.masked_scatter(rows, mask, fill)
    close(out, scatter_loops(rows.detach().double(), mask, None if fill is None else fill.detach().double()),
          atol=0, rtol=0)
    (gr,) = torch.autograd.grad(out, rows, g)
    close(gr, gather_loops(g.double(), mask), atol=0, rtol=0)


@pytest.mark.parametrize("side", ["triton", "torch"])
def test_masked_gather_bad_clone_row_count(side, monkeypatch):
    if side == "triton" and not (kernels.AVAILABLE and INTERPRETED):
        pytest.skip("the Triton side on CPU needs triton and TRITON_INTERPRET=1 before import")
    monkeypatch.setenv("D2V_KERNELS", side)
    x = torch.randn(2, 7, 3)
    for rows in (0, 1, 3, 5):  # not a multiple of B = 2 (or fewer rows than samples)
        with pytest.raises(ValueError, match=r"\({}, 7\).*\(2, 7, 3\)".format(rows)):
            ops.masked_gather(x, torch.ones(rows, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(4, 6\).*\(2, 7, 3\)"):  # clones' T differs
        ops.masked_gather(x, torch.ones(4, 6, dtype=torch.bool))
    assert ops.masked_gather(x, torch.ones(6, 7, dtype=torch.bool)).shape == (42, 3)


# ----------------------------------------------------------------------------- targets
def targets_f64(x, pad, mask, layer_norm, final_norm, eps=1e-5):
    """Sample by sample, in float64: F.instance_norm on the real positions, F.layer_norm."""
    x = x.double()
    K, B, T, C = x.shape
    out = torch.zeros(B, T, C, dtype=torch.float64)

    def norm(y, kind, keep):  # y [T_real, C]
        if kind == "instance":
            if y.shape[0] <= 1:
                return torch.zeros_like(y)
            return F.instance_norm(y.t()[None], eps=eps)[0].t()
        if kind == "layer":
            return F.layer_norm(y, (C,), eps=eps)
        return y

    for b in range(B):
        keep = torch.ones(T, dtype=torch.bool) if pad is None else ~pad[b]
        if not keep.any():
            continue
        y = sum(norm(x[k, b, keep], layer_norm, keep) for k in range(K)) / K
        out[b, keep] = norm(y, final_norm, keep)
    return out if mask is None else out[mask]


def targets_case(K, B, T, C, padded: bool):
    x = torch.randn(K, B, T, C) * 2 + torch.randn(K, 1, 1, C)  # an offset per channel
    pad = None
    if padded:
        pad = torch.rand(B, T) < 0.3
        pad[0] = False  # no padding
        if B > 1:
            pad[1] = True  # fully padded
        if B > 2:
            pad[2] = True
            pad[2, T // 2] = False  # one real position
    mask = random_mask(B, T, 0.5)
    if pad is not None:
        mask &= ~pad
    return x, pad, mask


@cpu_triton
@pytest.mark.parametrize("layer_norm,final_norm", NORM_COMBOS, ids=lambda v: str(v))
def test_build_targets_norm_combinations(triton_side, layer_norm, final_norm):
    x, pad, mask = targets_case(3, 4, 9, 17, padded=True)
    for stacked, m, p in itertools.product([True, False], [None, mask], [None, pad]):
        kw = dict(padding_mask=p, mask=m, layer_norm=layer_norm, final_norm=final_norm)
        out = ops.build_targets(x if stacked else list(x), **kw)
        want = targets_f64(x, p, m, layer_norm, final_norm)
        close(out, want, atol=2e-5, rtol=1e-5)
        close(twin.build_targets(x, **kw), want, atol=2e-5, rtol=1e-5)
        assert out.dtype == torch.float32 and not out.requires_grad


@cpu_triton
@pytest.mark.parametrize("K,B,T,C", [(1, 1, 1, 5), (3, 3, 7, 17), (2, 3, 13, 33), (1, 2, 16, 8), (3, 1, 40, 3)])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_build_targets_shapes(triton_side, K, B, T, C, padded):
    x, pad, mask = targets_case(K, B, T, C, padded)
    for layer_norm, final_norm in [("instance", None), ("layer", "instance")]:
        for m in (None, mask):
            kw = dict(padding_mask=pad, mask=m, layer_norm=layer_norm, final_norm=final_norm)
            out = ops.build_targets(list(x), **kw)
            close(out, targets_f64(x, pad, m, layer_norm, final_norm), atol=2e-5, rtol=1e-5)


@cpu_triton
def test_build_targets_speech_length_time_axis(triton_side):
    """Speech targets normalise over time at T = 2,000 frames (40 s at 50 frames/s) and
    more: the kernel (not the fallback) against fp64, padded, with an odd length too."""
    for T in (2000, 2051):
        x, pad, mask = targets_case(2, 2, T, 12, padded=True)
        assert T <= ktargets.MAX_T  # the fused path, not the eager fallback
        kw = dict(padding_mask=pad, mask=mask, layer_norm="instance", final_norm="instance")
        close(ops.build_targets(list(x), **kw), targets_f64(x, pad, mask, "instance", "instance"),
              atol=5e-5, rtol=1e-5)


@cpu_triton
def test_build_targets_more_layers_than_pointer_arguments(triton_side):
    x, pad, mask = targets_case(ktargets.MAX_LIST_LAYERS + 2, 2, 5, 6, padded=True)
    close(ops.build_targets(list(x), padding_mask=pad, mask=mask), targets_f64(x, pad, mask, "instance", None),
          atol=2e-5, rtol=1e-5)


@cpu_triton
def test_build_targets_strided_layers_and_errors(triton_side):
    big = torch.randn(3, 6, 20)  # layers as views with a row stride of 20 and an offset
    layers = [big[:, :, 2:13] * 1.0, big[:, :, 5:16], big[:, :, 1:12]]
    want = targets_f64(torch.stack(layers), None, None, "instance", "layer")
    close(ops.build_targets(layers, final_norm="layer"), want, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer_norm"):
        ops.build_targets(layers, layer_norm="batch")
    with pytest.raises(ValueError, match="mask"):
        ops.build_targets(layers, mask=torch.ones(3, 5, dtype=torch.bool))


def clone_targets_case(K, B, T, C, clones, padded: bool):
    """``x``, a per-sample ``pad [B, T]`` (as targets_case: sample 1 fully padded, sample 2
    one real position) and a ``[B*clones, T]`` mask: row 0 all true, row 1 all false, the
    rest random; padded positions left out, except in row 0 (their targets are 0)."""
    x, pad, _ = targets_case(K, B, T, C, padded)
    mask = random_mask(B * clones, T, 0.5)
    if pad is not None:
        mask[1:] &= ~pad.repeat_interleave(clones, 0)[1:]
    return x, pad, mask


def clone_targets_f64(x, pad, mask, clones, layer_norm, final_norm):
    """Per-sample float64 targets repeated for the clones, then the cloned mask."""
    return targets_f64(x, pad, None, layer_norm, final_norm).repeat_interleave(clones, 0)[mask]


@cpu_triton
@pytest.mark.parametrize("layer_norm,final_norm", NORM_COMBOS, ids=lambda v: str(v))
def test_build_targets_clones_norm_combinations(triton_side, layer_norm, final_norm):
    clones = 2
    x, pad, mask = clone_targets_case(3, 4, 9, 17, clones, padded=True)
    for stacked, p in itertools.product([True, False], [None, pad]):
        kw = dict(padding_mask=p, mask=mask, layer_norm=layer_norm, final_norm=final_norm)
        out = ops.build_targets(x if stacked else list(x), **kw)
        want = clone_targets_f64(x, p, mask, clones, layer_norm, final_norm)
        assert out.shape == (int(mask.sum()), 17) and out.dtype == torch.float32 and not out.requires_grad
        close(out, want, atol=2e-5, rtol=1e-5)
        close(twin.build_targets(x, **kw), want, atol=2e-5, rtol=1e-5)


@cpu_triton
@pytest.mark.parametrize("clones", [1, 2, 3])
@pytest.mark.parametrize("K,B,T,C", [(1, 1, 1, 5), (2, 2, 1, 6), (3, 3, 7, 17), (2, 3, 13, 33)])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_build_targets_clones(triton_side, clones, K, B, T, C, padded):
    x, pad, mask = clone_targets_case(K, B, T, C, clones, padded)
    # the three writers: time kernel, token kernel, token kernel after the time kernel
    for layer_norm, final_norm in [("instance", None), ("layer", None), ("instance", "layer")]:
        kw = dict(padding_mask=pad, mask=mask, layer_norm=layer_norm, final_norm=final_norm)
        want = clone_targets_f64(x, pad, mask, clones, layer_norm, final_norm)
        close(ops.build_targets(list(x), **kw), want, atol=2e-5, rtol=1e-5)
        close(twin.build_targets(x, **kw), want, atol=2e-5, rtol=1e-5)
    for kind in ("all", "none"):
        m = clone_mask(B, T, clones, kind)
        want = clone_targets_f64(x, pad, m, clones, "instance", None)
        close(ops.build_targets(x, padding_mask=pad, mask=m), want, atol=2e-5, rtol=1e-5)
        close(twin.build_targets(x, padding_mask=pad, mask=m), want, atol=2e-5, rtol=1e-5)


@cpu_triton
def test_build_targets_split_method(triton_side, monkeypatch):
    """The two-pass instance norm (statistics, then the normalised mean at the selected rows)
    against fp64, over awkward shapes, padding, one and several clones, and the mixed path
    that goes through it; and it really is the split kernels that ran."""
    log = []
    monkeypatch.setattr(ktargets, "TIME_METHOD", "split")
    for name in ("_instance_stats_kernel", "_instance_finalize_kernel", "_instance_apply_kernel",
                 "_targets_time_kernel"):
        monkeypatch.setattr(ktargets, name, Launches(getattr(ktargets, name), log))
    monkeypatch.setattr(ktargets, "check_device", lambda *args: None)  # it asks the (wrapped) time kernel
    monkeypatch.setattr(ktargets, "SPLIT_BLOCK_T", 8)  # several time chunks merged at these T
    monkeypatch.setattr(ktargets, "SPLIT_MIN_PROGRAMS", 24)  # and several time splits (finalize kernel)
    for K, B, T, C in [(1, 1, 1, 5), (3, 3, 7, 17), (2, 3, 13, 33), (3, 1, 40, 3)]:
        for padded in (False, True):
            x, pad, mask = targets_case(K, B, T, C, padded)
            for m in (None, mask):
                for ln, fn in [("instance", None), ("instance", "layer")]:
                    out = ops.build_targets(list(x), padding_mask=pad, mask=m, layer_norm=ln, final_norm=fn)
                    close(out, targets_f64(x, pad, m, ln, fn), atol=2e-5, rtol=1e-5)
    for clones in (2, 3):
        x, pad, mask = clone_targets_case(3, 3, 13, 33, clones, padded=True)
        out = ops.build_targets(x, padding_mask=pad, mask=mask)
        close(out, clone_targets_f64(x, pad, mask, clones, "instance", None), atol=2e-5, rtol=1e-5)
    # mean/std = 2000: fp32 E[x^2] - E[x]^2 would be off by ~40% of the variance here; the
    # merged chunk statistics stay within fp32 rounding of x - mean
    x = torch.randn(2, 2, 64, 8) * 0.5 + 1000.0
    close(ops.build_targets(x), targets_f64(x, None, None, "instance", None), atol=1e-3, rtol=1e-4)
    monkeypatch.setattr(ktargets, "MAX_T", 8)  # the one-pass kernel's limit on T does not apply to split
    x, pad, mask = targets_case(2, 2, 20, 5, padded=True)
    close(ops.build_targets(x, padding_mask=pad, mask=mask), targets_f64(x, pad, mask, "instance", None),
          atol=2e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="T=20 > 8"):  # a final instance norm still needs the tile
        ops.build_targets(x, padding_mask=pad, mask=mask, final_norm="instance")
    stats = [(grid, kw["FINAL"]) for grid, kw in log if "FINAL" in kw]
    finalize = [grid for grid, kw in log if "HAS_PAD" not in kw]
    apply = [kw["HAS_POS"] for grid, kw in log if "HAS_POS" in kw]
    assert len(stats) == len(apply) > 0 and set(apply) == {True, False}
    assert {final for grid, final in stats} == {True, False}  # one time split and several
    assert len(finalize) == sum(not final for grid, final in stats)
    assert all(grid[2] > 1 for grid, final in stats if not final)
    assert not any("FINAL_INSTANCE" in kw for grid, kw in log)  # the one-pass time kernel never ran


class Launches:
    """Stands in for a kernel: records each launch's grid and meta-parameters."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append((grid, kw))
            return self.kernel[grid](*args, **kw)
        return launch


@cpu_triton
@pytest.mark.parametrize("layer_norm,final_norm", NORM_COMBOS, ids=lambda v: str(v))
def test_build_targets_clones_computed_once_per_sample(triton_side, monkeypatch, layer_norm, final_norm):
    """Programs cover the B samples (time kernel) or the B*T tokens (token kernel), never the
    clones; no tensor of [B*clones, T, C] elements is made."""
    K, B, T, C, clones = 2, 3, 5, 6, 3
    x = torch.randn(K, B, T, C)
    mask = torch.ones(B * clones, T, dtype=torch.bool)
    mask[1, 2] = False  # N = B*clones*T - 1: the output itself stays below the bound
    log = []
    monkeypatch.setattr(ktargets, "check_device", lambda *a: None)  # it would not recognise the stand-in
    for name in ("_targets_time_kernel", "_targets_token_kernel"):
        monkeypatch.setattr(ktargets, name, Launches(getattr(ktargets, name), log))
    with Allocations() as alloc:
        out = ops.build_targets(x, mask=mask, layer_norm=layer_norm, final_norm=final_norm)
    close(out, clone_targets_f64(x, None, mask, clones, layer_norm, final_norm), atol=2e-5, rtol=1e-5)
    assert all(math.prod(sh) < B * clones * T * C for sh in alloc.shapes), alloc.shapes
    assert log
    for grid, kw in log:
        if "BLOCK_T" in kw:  # time kernel: (channel blocks, samples)
            assert grid[1] == B
        else:  # token kernel: blocks of the B*T tokens
            assert grid[0] == math.ceil(B * T / kw["BLOCK_R"])


@pytest.mark.parametrize("side", ["triton", "torch"])
def test_build_targets_bad_clone_row_count(side, monkeypatch):
    if side == "triton" and not (kernels.AVAILABLE and INTERPRETED):
        pytest.skip("the Triton side on CPU needs triton and TRITON_INTERPRET=1 before import")
    monkeypatch.setenv("D2V_KERNELS", side)
    x = torch.randn(2, 3, 5, 4)
    for rows in (0, 2, 4, 7):  # B = 3
        with pytest.raises(ValueError, match=r"\({}, 5\).*\(3, 5, 4\)".format(rows)):
            ops.build_targets(x, mask=torch.ones(rows, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(3, 5, 4\)"):
        ops.build_targets(x, mask=torch.ones(6, 4, dtype=torch.bool))
    assert ops.build_targets(x, mask=torch.ones(6, 5, dtype=torch.bool)).shape == (30, 4)


# ----------------------------------------------------------------------------- loss
def loss_f64(pred, target, beta, scale):
    p, t = pred.detach().double().requires_grad_(), target.double()
    per = F.mse_loss(p, t, reduction="none") if beta == 0 else F.smooth_l1_loss(p, t, reduction="none", beta=beta)
    rows = per.sum(-1) * (1 / math.sqrt(p.shape[-1]) if scale is None else scale)
    return rows, p


@cpu_triton
@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
@pytest.mark.parametrize("scale", [None, 0.5])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_regression_loss(triton_side, beta, scale, reduction):
    for N, C in [(1, 1), (13, 17), (7, 33), (5, 1500)]:
        pred = (torch.randn(N, C) * 3).requires_grad_()  # both smooth-L1 branches
        target = torch.randn(N, C)
        out = ops.regression_loss(pred, target, beta=beta, scale=scale, reduction=reduction)
        ref = twin.regression_loss(pred, target, beta=beta, scale=scale, reduction=reduction)
        rows, p64 = loss_f64(pred, target, beta, scale)
        want = rows.sum() if reduction == "sum" else rows
        close(out, want, atol=1e-4, rtol=1e-5)
        close(ref, want, atol=1e-4, rtol=1e-5)
        g = torch.randn_like(out)
        (gp,), (gr,) = torch.autograd.grad(out, pred, g), torch.autograd.grad(ref, pred, g)
        (gw,) = torch.autograd.grad(want, p64, g.double())
        close(gp, gw, atol=1e-6, rtol=1e-5)
        close(gr, gw, atol=1e-6, rtol=1e-5)


@cpu_triton
def test_regression_loss_keeps_only_the_gradient_buffer(triton_side):
    pred, target = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = ops.regression_loss(pred, target, beta=1.0)
    assert [tuple(t.shape) for t in saved] == [(6, 10)] and saved[0].dtype == pred.dtype
    assert not any(t.data_ptr() in (pred.data_ptr(), target.data_ptr()) for t in saved)
    loss.backward()
    assert target.grad is None and pred.grad is not None
    with torch.no_grad():  # no gradient buffer at all
        close(ops.regression_loss(pred, target, beta=1.0), loss.detach())


# ----------------------------------------------------------------------------- EMA
def ema_f64(t, s, d):
    return d * t.double() + (1 - d) * s.double()


@cpu_triton
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay_kind", ["float", "tensor"])
def test_ema_update_flat_and_lists(triton_side, student_dtype, decay_kind, monkeypatch):
    calls = []
    for name in ("_launch_flat", "_tables"):
        fn = getattr(kema, name)
        monkeypatch.setattr(kema, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    decay = 0.9 if decay_kind == "float" else torch.tensor(0.75)
    d = float(decay)
    shapes = [(5, 3), (7,), (4097,), (1,), (2, 3, 2)]

    # (a) two flat buffers
    t, s = torch.randn(9001), torch.randn(9001).to(student_dtype)
    want = ema_f64(t, s, d)
    t2 = t.clone()
    ops.ema_update_(t, s, decay)
    twin.ema_update_(t2, s, decay)
    close(t, want, atol=1e-6, rtol=1e-6)
    close(t2, want, atol=1e-6, rtol=1e-6)
    assert calls == ["_launch_flat"]

    # (b) lists that are not views of one buffer: the multi-tensor kernel
    calls.clear()
    t = [torch.randn(sh) for sh in shapes]
    s = [torch.randn(sh).to(student_dtype) for sh in shapes]
    want = [ema_f64(a, b, d) for a, b in zip(t, s)]
    ops.ema_update_(iter(t), iter(s), decay)  # generators, as module.parameters()
    for a, w in zip(t, want):
        close(a, w, atol=1e-6, rtol=1e-6)
    assert calls == ["_tables"]

    # (c) parameter lists laid out by flatten_params_: recognised as flat
    calls.clear()
    teacher = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    student = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).to(student_dtype)
    before = [p.detach().clone() for p in teacher.parameters()]
    flat = ops.flatten_params_(teacher)
    ops.flatten_params_(student)
    assert flat.numel() == sum(p.numel() for p in teacher.parameters())
    assert all(p.data_ptr() >= flat.data_ptr() for p in teacher.parameters())
    for p, b in zip(teacher.parameters(), before):
        close(p.detach(), b, atol=0, rtol=0)
    ops.ema_update_(teacher.parameters(), student.parameters(), decay)
    for p, b, q in zip(teacher.parameters(), before, student.parameters()):
        close(p.detach(), ema_f64(b, q.detach(), d), atol=1e-6, rtol=1e-6)
    assert calls == ["_launch_flat"]


@cpu_triton
def test_ema_update_mixed_dtypes_fall_back_to_foreach(triton_side):
    t = [torch.randn(4), torch.randn(3)]
    s = [torch.randn(4), torch.randn(3).bfloat16()]
    want = [ema_f64(a, b, 0.5) for a, b in zip(t, s)]
    ops.ema_update_(t, s, 0.5)
    for a, w in zip(t, want):
        close(a, w, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="2 teacher tensors but 1"):
        ops.ema_update_(t, s[:1], 0.5)


# ----------------------------------------------------------------------------- dispatch
def test_auto_keeps_the_eager_twin_exactly_where_the_kernel_measured_slower(monkeypatch):
    """``ops.EAGER_ON_AUTO`` against the GPU kernel benchmark it was drawn from: an op is in
    it if and only if its Triton kernel took longer than its eager twin there."""
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "benchmarks/results/kernels-nvidia-h200-2026-11-28.json").read_text())
    policy_name = {"masked_gather": "masked_gather", "masked_gather_clones_fwd_bwd": "masked_gather_clones",
                   "masked_scatter": "masked_scatter", "regression_loss_fwd_bwd": "regression_loss",
                   "build_targets": "build_targets", "build_targets_clones": "build_targets",
                   "ema_update_fp32": "ema_update_", "ema_update_bf16": "ema_update_"}
    times: dict[str, dict[str, float]] = {}
    for r in doc["results"]:
        if r["op"] in policy_name:
            times.setdefault(r["op"], {})[r["provider"]] = r["time_ms"]
    slower = {policy_name[op] for op, t in times.items() if t["triton"] > t["eager"]}
    faster = {policy_name[op] for op, t in times.items() if t["triton"] <= t["eager"]}
    assert slower == set(ops.EAGER_ON_AUTO) and not slower & faster
    monkeypatch.delenv("D2V_KERNELS", raising=False)
    for op in ops.EAGER_ON_AUTO:
        assert ops.kernels_backend(torch.zeros(1), op) == "torch"
    try:
        ops.set_kernels("triton")  # forcing still runs every kernel
        assert all(ops.kernels_backend(torch.zeros(1), op) == "triton" for op in ops.EAGER_ON_AUTO)
    finally:
        ops.set_kernels("auto")


def test_dispatch_switch(monkeypatch):
    x = torch.zeros(2, 3, 4)
    monkeypatch.delenv("D2V_KERNELS", raising=False)
    assert ops.kernels_backend(x) == "torch"  # auto on CPU: the twin
    monkeypatch.setenv("D2V_KERNELS", "triton")
    assert ops.kernels_backend(x) == "triton"
    monkeypatch.setenv("D2V_KERNELS", "torch")
    assert ops.kernels_backend(x) == "torch"
    try:
        ops.set_kernels("triton")  # the config field wins over the environment
        assert ops.kernels_backend(x) == "triton"
    finally:
        ops.set_kernels("auto")
    monkeypatch.setenv("D2V_KERNELS", "cuda")
    with pytest.raises(ValueError, match="D2V_KERNELS"):
        ops.kernels_backend(x)
    with pytest.raises(ValueError, match="set_kernels"):
        ops.set_kernels("fast")


@cpu_triton
@pytest.mark.parametrize("env", ["torch", "triton", "auto"])
def test_dispatch_runs_the_chosen_side(env, monkeypatch):
    monkeypatch.setenv("D2V_KERNELS", env)
    ran = []
    for mod, side in ((kgather, "triton"), (twin, "torch")):
        fn = mod.masked_gather
        monkeypatch.setattr(mod, "masked_gather", lambda *a, _fn=fn, _s=side: ran.append(_s) or _fn(*a))
    x, mask = torch.randn(2, 3, 4), random_mask(2, 3)
    close(ops.masked_gather(x, mask), x[mask], atol=0, rtol=0)
    assert ran == ["triton" if env == "triton" else "torch"]


@cpu_triton
def test_kernels_compiled_for_gpu_refuse_cpu_tensors(monkeypatch):
    monkeypatch.setattr(kernels, "is_interpreted", lambda kernel: False)
    monkeypatch.setenv("D2V_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.regression_loss(torch.randn(2, 3), torch.randn(2, 3), beta=1.0)


def test_ops_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, d2v_fast.ops as ops\n"
            "x = torch.randn(2, 3, 4); m = torch.tensor([[True, False, True], [False, False, True]])\n"
            "assert ops.kernels_backend(x) == 'torch' and ops.masked_gather(x, m).shape == (int(m.sum()), 4)\n"
            "ops.set_kernels('triton')\n"
            "try:\n    ops.masked_gather(x, m)\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR triton is not installed" in res.stdout and "pip install triton" in res.stdout


# ----------------------------------------------------------------------------- torch.compile
@cpu_triton
def test_ops_compose_with_torch_compile(triton_side):
    """Dynamo + AOTAutograd trace through the custom ops (fake tensors, autograd formulas,
    a data-dependent row count); the aot_eager backend keeps it to seconds on CPU (Inductor
    adds ~20 s of C++ compilation here and tests nothing more about our ops)."""
    B, T, C = 2, 5, 6
    layers = torch.randn(3, B, T, C)
    mask = random_mask(B, T)
    rows = torch.randn(int(mask.sum()), C, requires_grad=True)
    fill = torch.randn(C, requires_grad=True)

    def step(rows, fill, layers, mask):
        targets = ops.build_targets(layers, final_norm="layer")
        full = ops.masked_scatter(rows, mask, fill)
        return ops.regression_loss(full, targets, beta=1.0, scale=1.0)

    def masked_targets(layers, mask):
        return ops.build_targets(layers, mask=mask)

    torch._dynamo.reset()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(rows, fill, layers, mask)
    want = twin.regression_loss(twin.masked_scatter(rows, mask, fill), twin.build_targets(layers, final_norm="layer"),
                                beta=1.0, scale=1.0)
    close(got, want, atol=1e-4)
    for a, b in zip(torch.autograd.grad(got, [rows, fill]), torch.autograd.grad(want, [rows, fill])):
        close(a, b, atol=1e-6)
    got = torch.compile(masked_targets, backend="aot_eager", fullgraph=True)(layers, mask)
    close(got, twin.build_targets(layers, mask=mask), atol=2e-5)


@cpu_triton
def test_opcheck_custom_ops():
    """Schema, fake-tensor and autograd registration of every custom op."""
    mask = random_mask(3, 4).reshape(-1)
    pos = (torch.cumsum(mask, 0, dtype=torch.int32) - 1).masked_fill_(~mask, -1)
    n = int(mask.sum())
    x = torch.randn(12, 5, requires_grad=True)
    rows = torch.randn(n, 5, requires_grad=True)
    cmask = random_mask(4, 3).reshape(-1)
    cpos = (torch.cumsum(cmask, 0, dtype=torch.int32) - 1).masked_fill_(~cmask, -1)
    cn = int(cmask.sum())
    cases = [
        (kgather.rows_to_compact, (x, pos, n)),
        (kgather.rows_to_full, (rows, pos, torch.randn(5, requires_grad=True))),
        (kgather.rows_to_full, (rows, pos, torch.randn(12, 5, requires_grad=True))),
        (kloss.regression_loss_op, (torch.randn(4, 7, requires_grad=True), torch.randn(4, 7), 1.0, 0.5, True)),
        (kloss.scale_rows, (torch.randn(4, 7), torch.randn(4))),
        (ktargets.build_targets_op, ([torch.randn(2, 3, 5, 4)], None, None, "instance", "none", 1e-5)),
        # multi-mask: x [B*T = 2*3, 5], mask [B*clones = 4, T = 3]
        (kgather.rows_to_compact, (torch.randn(6, 5, requires_grad=True), cpos, cn, 3, 2)),
        (kgather.rows_to_full, (torch.randn(cn, 5, requires_grad=True), cpos, None, 3, 2)),
        (ktargets.build_targets_op, ([torch.randn(2, 2, 3, 4)], None, cmask.view(4, 3), "instance", "none", 1e-5)),
        (ktargets.build_targets_op, ([torch.randn(2, 2, 3, 4)], None, cmask.view(4, 3), "layer", "layer", 1e-5)),
        (kema.ema_update_op, ([torch.randn(4), torch.randn(3)], [torch.randn(4), torch.randn(3)], None, 0.9)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@cpu_triton
@pytest.mark.parametrize("clones", [1, 3])
def test_direct_dispatch_matches_the_custom_ops(triton_side, monkeypatch, clones):
    """Outside torch.compile the ops call their launchers through autograd Functions
    (kernels.direct); D2V_KERNEL_DISPATCH=custom_op goes through the torch.library ops.
    Both must give the same bits, forward and backward, and the direct path must not touch
    the custom ops at all."""
    B, T, C, K = 3, 11, 19, 3
    x = torch.randn(B, T, C)
    mask = clone_mask(B, T, clones, "mixed") if clones > 1 else random_mask(B, T)
    n = int(mask.sum())
    rows, fill = torch.randn(n, C), torch.randn(C)
    smask = mask if clones == 1 else random_mask(B, T)
    srows = torch.randn(int(smask.sum()), C)
    layers = [torch.randn(B, T, C) for _ in range(K)]
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -4:] = True
    target, g_rows = torch.randn(n, C), torch.randn(n, C)
    teacher, student = torch.randn(70), torch.randn(70)

    def run():
        xg, fg, rg = x.clone().requires_grad_(), fill.clone().requires_grad_(), srows.clone().requires_grad_()
        got = ops.masked_gather(xg, mask, n if clones == 1 else None)
        (gx,) = torch.autograd.grad(got, xg, g_rows)
        sc = ops.masked_scatter(rg, smask, fg)
        g_r, g_f = torch.autograd.grad(sc, [rg, fg], torch.randn(sc.shape, generator=torch.Generator().manual_seed(1)))
        pred = rows.clone().requires_grad_()
        loss = ops.regression_loss(pred, target, beta=2.0)
        (gp,) = torch.autograd.grad(loss, pred)
        tg = [ops.build_targets(layers, padding_mask=pad, mask=mask, layer_norm=ln, final_norm=fn)
              for ln, fn in NORM_COMBOS]
        t = teacher.clone()
        ops.ema_update_(t, student, 0.99)
        return [got, gx, sc, g_r, g_f, loss, gp, t, *tg]

    calls = []
    for name in ("rows_to_compact", "rows_to_full"):
        op = getattr(kgather, name)
        monkeypatch.setattr(kgather, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    monkeypatch.setattr(kloss, "regression_loss_op",
                        lambda *a, _op=kloss.regression_loss_op: calls.append("loss") or _op(*a))
    monkeypatch.setattr(ktargets, "build_targets_op",
                        lambda *a, _op=ktargets.build_targets_op: calls.append("targets") or _op(*a))
    monkeypatch.setattr(kema, "ema_update_op", lambda *a, _op=kema.ema_update_op: calls.append("ema") or _op(*a))
    assert kernels.DISPATCH == "direct"
    fast = run()
    assert calls == []
    monkeypatch.setattr(kernels, "DISPATCH", "custom_op")
    slow = run()
    assert set(calls) == {"rows_to_compact", "rows_to_full", "loss", "targets", "ema"}
    for a, b in zip(fast, slow):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@cpu_triton
def test_direct_dispatch_keeps_what_the_custom_ops_promise(triton_side):
    """The direct path bumps the teacher's version counter as the custom op's mutates_args
    does (a graph that saved the teacher then refuses to backward), and leaves meta tensors
    and dispatch modes to the custom ops (shapes without running a kernel)."""
    t, s = torch.randn(10, requires_grad=True), torch.randn(10)
    w = t.detach()
    y = (t * t).sum()
    v = w._version
    ops.ema_update_(w, s, 0.9)
    assert w._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    x, mask = torch.randn(2, 5, 3, device="meta"), torch.ones(2, 5, dtype=torch.bool, device="meta")
    assert not kernels.direct(x, mask)
    assert ops.masked_gather(x, mask, 10).shape == (10, 3)
    assert ops.regression_loss(torch.randn(4, 3, device="meta"), torch.randn(4, 3, device="meta"),
                               beta=1.0, reduction="none").shape == (4,)
    assert kernels.direct(torch.randn(2))
    with Allocations():
        assert not kernels.direct(torch.randn(2))


def test_kernel_dispatch_env_is_checked():
    env = {**os.environ, "D2V_KERNEL_DISPATCH": "fast"}
    out = subprocess.run([sys.executable, "-c", "import d2v_fast.kernels"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "D2V_KERNEL_DISPATCH='fast'" in out.stderr


# ----------------------------------------------------------------------------- GPU, bf16
def bf16_rule(out, ref32, torch_out, atol):
    """flash-attention's rule: the kernel's error against the fp32 reference is at most twice
    PyTorch's own error in bf16, plus a small absolute term."""
    err = (out.double() - ref32.double()).abs().max().item()
    torch_err = (torch_out.double() - ref32.double()).abs().max().item()
    assert err <= 2 * torch_err + atol, f"kernel error {err:.3g} > 2 x torch bf16 error {torch_err:.3g} + {atol}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("op", ["gather", "gather_clones", "scatter", "targets", "targets_clones", "targets_split",
                                "targets_clones_split", "loss", "ema"])
def test_bf16_on_gpu(op, monkeypatch):
    dev, B, T, C = "cuda", 3, 131, 257
    mask = random_mask(B, T).to(dev)
    ops.set_kernels("triton")
    if op.endswith("_split"):
        monkeypatch.setattr(ktargets, "TIME_METHOD", "split")
        op = op[:-len("_split")]
    try:
        if op == "gather":
            x = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
            out, ref = ops.masked_gather(x, mask), twin.masked_gather(x, mask)
            assert torch.equal(out, ref)
            g = torch.randn_like(out)
            assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
        elif op == "gather_clones":
            clones = 8
            cmask = random_mask(B * clones, T, 0.48).to(dev)
            x = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
            out, ref = ops.masked_gather(x, cmask), twin.masked_gather(x, cmask)
            assert torch.equal(out, ref)
            g = torch.randn_like(out)
            gk, gt = torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0]
            x32 = x.detach().float().requires_grad_()
            (g32,) = torch.autograd.grad(x32.repeat_interleave(clones, 0)[cmask], x32, g.float())
            bf16_rule(gk, g32, gt, 1e-3 * g32.abs().max().item())
            assert torch.equal(gk, torch.autograd.grad(ops.masked_gather(x, cmask), x, g)[0])  # reproducible
        elif op == "scatter":
            rows = torch.randn(int(mask.sum()), C, device=dev, dtype=torch.bfloat16, requires_grad=True)
            fill = torch.randn(C, device=dev, dtype=torch.bfloat16, requires_grad=True)
            out, ref = ops.masked_scatter(rows, mask, fill), twin.masked_scatter(rows, mask, fill)
            assert torch.equal(out, ref)
            g = torch.randn_like(out)
            a, b = torch.autograd.grad(out, [rows, fill], g), torch.autograd.grad(ref, [rows, fill], g)
            assert torch.equal(a[0], b[0])
            fill_grad32 = g.float().masked_fill(mask[..., None], 0).sum(dim=(0, 1))
            bf16_rule(a[1], fill_grad32, b[1], 1e-3 * fill_grad32.abs().max().item())
        elif op == "targets":
            x = torch.randn(10, B, T, C, device=dev).bfloat16()
            pad = torch.zeros(B, T, dtype=torch.bool, device=dev)
            pad[1, T // 2:] = True
            for ln, fn in NORM_COMBOS:
                kw = dict(padding_mask=pad, mask=mask & ~pad, layer_norm=ln, final_norm=fn)
                ref32 = twin.build_targets(x.float(), **kw)
                bf16_rule(ops.build_targets(list(x), **kw), ref32, twin.build_targets(x, **kw), 1e-4)
        elif op == "targets_clones":
            clones = 8
            x = torch.randn(12, B, T, C, device=dev).bfloat16()
            pad = torch.zeros(B, T, dtype=torch.bool, device=dev)
            pad[1, T // 2:] = True
            cmask = random_mask(B * clones, T, 0.48).to(dev) & ~pad.repeat_interleave(clones, 0)
            for ln, fn in NORM_COMBOS:
                kw = dict(padding_mask=pad, mask=cmask, layer_norm=ln, final_norm=fn)
                ref32 = twin.build_targets(x.float(), **kw)
                bf16_rule(ops.build_targets(list(x), **kw), ref32, twin.build_targets(x, **kw), 1e-4)
                bf16_rule(ops.build_targets(x, **kw), ref32, twin.build_targets(x, **kw), 1e-4)
        elif op == "loss":
            pred32 = torch.randn(4000, 768, device=dev) * 3
            target = torch.randn(4000, 768, device=dev)
            for beta in (0.0, 4.0):
                pred = pred32.bfloat16().requires_grad_()
                p32 = pred.detach().float().requires_grad_()
                ref32 = twin.regression_loss(p32, target, beta=beta, reduction="none")
                for reduction in ("none", "sum"):
                    out = ops.regression_loss(pred, target, beta=beta, reduction=reduction)
                    tout = twin.regression_loss(pred, target, beta=beta, reduction=reduction)
                    r32 = ref32 if reduction == "none" else ref32.sum()
                    bf16_rule(out, r32, tout, 1e-3 * r32.abs().max().item())
                    g = torch.randn_like(out)
                    (gk,), (gt,) = torch.autograd.grad(out, pred, g), torch.autograd.grad(tout, pred, g)
                    (g32,) = torch.autograd.grad(r32, p32, g, retain_graph=True)
                    # The gradient buffer is stored in bf16 before the upstream gradient
                    # scales it: one more rounding than torch, allowed as the absolute term.
                    bf16_rule(gk, g32, gt, 2 ** -8 * g32.abs().max().item())
        else:
            t = torch.randn(1_000_003, device=dev)
            s = torch.randn(1_000_003, device=dev).bfloat16()
            decay = torch.tensor(0.999, device=dev)
            want = ema_f64(t, s, 0.999)
            t_k, t_t = t.clone(), t.clone()
            ops.ema_update_(t_k, s, decay)
            twin.ema_update_(t_t, s, decay)
            bf16_rule(t_k, want, t_t, 1e-7)
    finally:
        ops.set_kernels("auto")


# ----------------------------------------------------------------------------- layer_norm_dual
@cpu_triton
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 100), (4, 1023), (2, 3, 768)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_dual_kernel_against_native(triton_side, shape, affine):
    """The kernel's fp32 output, mean and 1/std against ``native_layer_norm``; its bf16 output
    equals the cast of its fp32 output bit for bit (round to nearest even)."""
    C = shape[-1]
    x = torch.randn(*shape) * 3 + 1.5
    w, b = (torch.randn(C), torch.randn(C)) if affine else (None, None)
    y, y_low, mean, rstd = ops.layer_norm_dual_fwd(x, w, b, 1e-5, torch.bfloat16)
    ry, rmean, rrstd = torch.native_layer_norm(x.double(), (C,), None if w is None else w.double(),
                                               None if b is None else b.double(), 1e-5)
    close(y, ry, atol=1e-4, rtol=1e-4)
    close(mean, rmean, atol=1e-5, rtol=1e-5)
    close(rstd, rrstd, atol=1e-4, rtol=1e-4)
    assert y_low.dtype == torch.bfloat16 and torch.equal(y_low, y.to(torch.bfloat16))
    _, _, none_mean, none_rstd = ops.layer_norm_dual_fwd(x, w, b, 1e-5, torch.bfloat16, stats=False)
    assert none_mean is None and none_rstd is None


@pytest.mark.parametrize("side", ["torch", pytest.param("triton", marks=cpu_triton)])
@pytest.mark.parametrize("use", ["both", "fp32", "low"])
def test_layer_norm_dual_gradients(side, use, poisoned):
    """Forward and backward of ``ops.layer_norm_dual`` against ``F.layer_norm`` followed by a
    cast, with gradients reaching the outputs through either or both; on the eager side bit
    for bit (the same ops, the two gradients summed in fp32 as autograd sums them)."""
    ops.set_kernels(side)
    try:
        C = 37
        x0, w0, b0 = torch.randn(2, 9, C), torch.randn(C), torch.randn(C)
        g, g_low = torch.randn(2, 9, C), torch.randn(2, 9, C).to(torch.bfloat16)

        def run(dual: bool):
            x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
            if dual:
                y, y_low = ops.layer_norm_dual(x, w, b, 1e-5, torch.bfloat16)
            else:
                y = F.layer_norm(x, (C,), w, b, 1e-5)
                y_low = y.to(torch.bfloat16)
            terms = {"both": [(y, g), (y_low, g_low)], "fp32": [(y, g)], "low": [(y_low, g_low)]}[use]
            torch.autograd.backward([t for t, _ in terms], [gr for _, gr in terms])
            return y.detach(), y_low.detach(), x.grad, w.grad, b.grad

        got, want = run(True), run(False)
        for a, e in zip(got, want):
            if side == "torch":
                assert torch.equal(a, e)
            else:
                close(a.float(), e.float(), atol=2e-2 if a.dtype == torch.bfloat16 else 1e-4, rtol=1e-2)
    finally:
        ops.set_kernels("auto")


@pytest.mark.parametrize("side", ["torch", pytest.param("triton", marks=cpu_triton)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 100), (4, 1023)])
@pytest.mark.parametrize("residual_dtype", [torch.bfloat16, torch.float32])
def test_layer_norm_dual_with_the_residual_add(side, shape, residual_dtype):
    """Without autograd the block's residual add comes into the norm's pass: the same values
    as the add first (on the Triton side the sum is the same fp32 add, so the outputs equal
    the kernel's on ``x + residual`` bit for bit); the bf16 output is the fp32 one's rounding."""
    ops.set_kernels(side)
    try:
        C = shape[-1]
        x, w, b = torch.randn(*shape) * 2 + 0.5, torch.randn(C), torch.randn(C)
        r = torch.randn(*shape).to(residual_dtype)
        with torch.no_grad():
            y, y_low = ops.layer_norm_dual(x, w, b, 1e-5, torch.bfloat16, r)
            e, e_low = ops.layer_norm_dual(x + r, w, b, 1e-5, torch.bfloat16)
        assert torch.equal(y, e) and torch.equal(y_low, e_low)
        assert torch.equal(y_low, y.to(torch.bfloat16))
        close(y, F.layer_norm((x + r).double(), (C,), w.double(), b.double(), 1e-5).float(), atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="only without statistics"):
            ops.layer_norm_dual_fwd(x, w, b, 1e-5, torch.bfloat16, stats=True, residual=r)
        # with autograd the sum is autograd's add, and gradients reach x, the residual and the affine
        xs, rs, ws = x.clone().requires_grad_(), r.float().clone().requires_grad_(), w.clone().requires_grad_()
        y2, _ = ops.layer_norm_dual(xs, ws, b, 1e-5, torch.bfloat16, rs)
        g = torch.randn_like(y2)
        y2.backward(g)
        xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
        F.layer_norm(xe + r.float(), (C,), we, b, 1e-5).backward(g)
        close(xs.grad, xe.grad, atol=1e-4, rtol=1e-4)
        assert torch.equal(xs.grad, rs.grad)
        close(ws.grad, we.grad, atol=1e-4, rtol=1e-4)
    finally:
        ops.set_kernels("auto")


def test_layer_norm_dual_without_grad_keeps_no_statistics():
    x = torch.randn(4, 16)
    with torch.no_grad():
        y, y_low = ops.layer_norm_dual(x, torch.ones(16), torch.zeros(16), 1e-5)
    assert torch.equal(y_low, y.to(torch.bfloat16))
    assert torch.equal(y, F.layer_norm(x, (16,), torch.ones(16), torch.zeros(16), 1e-5))
