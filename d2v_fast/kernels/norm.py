"""layer_norm_dual_fwd: a LayerNorm forward that writes its output twice, in fp32 and rounded to
a low-precision dtype (bf16), with the mean and 1/std its backward needs.

In a post-LN block under bf16 autocast the LayerNorm's fp32 output is both the residual
stream and the input of the next Linear, which autocast casts to bf16 (one more kernel, and
in backward the cast's gradient and an add). One program per row: the row is read once,
its statistics taken in fp32 (two-pass over the row held in registers), and both outputs
stored. The bf16 output rounds to nearest even, exactly as ``Tensor.to`` does, so it equals
the cast of the fp32 output bit for bit. Backward stays ATen's
``native_layer_norm_backward`` (``d2v_fast.ops.layer_norm_dual``).

Without a backward to come (the teacher's blocks), the block's residual add can come in too:
``residual`` is added to the row in fp32 as it is read (the value ``x + residual`` has in
eager, whose add promotes a bf16 residual to fp32 exactly), one kernel instead of two.
"""
from __future__ import annotations

import torch

from . import check_device, check_residual, next_pow2, tl, triton
from .ema import _round_to

_LOW = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _layer_norm_dual_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, low_ptr, mean_ptr, rstd_ptr, C, eps,
                            HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STATS: tl.constexpr,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=keep, other=0.0).to(tl.float32)
    if HAS_R:
        x = x + tl.load(r_ptr + row * C + cols, mask=keep, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(keep, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * C + cols, y, mask=keep)
    tl.store(low_ptr + row * C + cols, _round_to(y, low_ptr.dtype.element_ty), mask=keep)
    if STATS:
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)


def num_warps_for_row(C: int) -> int:
    """4 warps up to 2,048 columns (8-16 fp32 values a thread), 8 above."""
    return 4 if C <= 2048 else 8


def layer_norm_dual_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                        low: torch.dtype, stats: bool = True, residual: torch.Tensor | None = None):
    """``(y, y.to(low), mean, rstd)`` of a LayerNorm over the last dimension of fp32 ``x``
    (of ``x + residual`` with a ``residual`` shaped as ``x``, fp32 or low precision; only
    without ``stats``); ``mean``/``rstd`` are shaped ``x.shape[:-1] + (1,)``, as
    ``torch.native_layer_norm`` returns them, or None without ``stats`` (no backward to come:
    nothing allocated or stored)."""
    check_device(_layer_norm_dual_kernel, x)
    if low not in _LOW:
        raise ValueError(f"layer_norm_dual_fwd: low dtype {low}, expected bfloat16 or float16")
    check_residual(x, residual, stats)
    C = x.shape[-1]
    x2 = x.contiguous()
    r2 = x2 if residual is None else residual.contiguous()
    rows = x2.numel() // C if C else 0
    y = torch.empty_like(x2)  # (``empty_like``/``new_empty``: less argument parsing than ``torch.empty``)
    y_low = torch.empty_like(x2, dtype=low)
    mean = rstd = None
    if stats:
        mean = x2.new_empty((*x.shape[:-1], 1), dtype=torch.float32)
        rstd = torch.empty_like(mean)
    if rows:
        _layer_norm_dual_kernel[(rows,)](x2, r2, x2 if weight is None else weight, x2 if bias is None else bias,
                                         y, y_low, y if mean is None else mean, y if rstd is None else rstd, C,
                                         float(eps), HAS_R=residual is not None, HAS_W=weight is not None,
                                         HAS_B=bias is not None, STATS=stats, BLOCK=next_pow2(C),
                                         num_warps=num_warps_for_row(C))
    return y, y_low, mean, rstd
