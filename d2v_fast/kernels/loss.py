"""regression_loss: smooth L1 with ``beta`` (MSE ``d^2`` when ``beta == 0``) summed over the
features of each row, times ``scale`` (docs/design.md#loss).

The forward kernel computes, in one pass over ``pred`` and ``target``, the per-row loss
(fp32) and the gradient ``dloss_row / dpred`` (already times ``scale``), which it stores in
``pred``'s dtype. Backward only multiplies that buffer by the upstream gradient of each
row (``_scale_rows_kernel``); ``pred`` and ``target`` are not kept for it.

Memory traffic (``N`` rows, ``C`` features; ``e_p``, ``e_t`` bytes per element):
forward reads ``N*C*(e_p + e_t)``, writes ``N*C*e_p`` (the gradient; skipped when no
gradient is needed) and ``4N``; backward reads ``N*C*e_p`` and writes ``N*C*e_p``.
Eager PyTorch keeps ``d``, ``|d|``, the branch mask and the per-element loss (``[N, C]``
fp32 each) and recomputes from them in backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import cdiv, check_device, direct, next_pow2, num_warps_for, tl, triton

BLOCK_C_MAX = 1024


@triton.jit
def _regression_loss_kernel(pred, target, loss_rows, grad, N, C, stride_p, stride_t, stride_g, beta, scale,
                            BETA_ZERO: tl.constexpr, WRITE_GRAD: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = r < N
    r64 = r.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = in_r[:, None] & (c < C)[None, :]
        p = tl.load(pred + r64 * stride_p + c[None, :], mask=m, other=0.0).to(tl.float32)
        t = tl.load(target + r64 * stride_t + c[None, :], mask=m, other=0.0).to(tl.float32)
        d = p - t  # 0 outside the tile, where both branches give 0 loss and 0 gradient
        if BETA_ZERO:
            loss = d * d
            g = 2.0 * d
        else:
            ad = tl.abs(d)
            small = ad < beta
            loss = tl.where(small, 0.5 * d * d / beta, ad - 0.5 * beta)
            g = tl.where(small, d / beta, tl.where(d > 0, 1.0, -1.0))
        acc += tl.sum(loss, axis=1)
        if WRITE_GRAD:
            tl.store(grad + r64 * stride_g + c[None, :], (g * scale).to(grad.dtype.element_ty), mask=m)
    tl.store(loss_rows + r, acc * scale, mask=in_r)


@triton.jit
def _scale_rows_kernel(g, go, out, N, C, stride_go, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_r = r < N
    m = in_r[:, None] & (c < C)[None, :]
    offs = r.to(tl.int64)[:, None] * C + c[None, :]
    s = tl.load(go + r * stride_go, mask=in_r, other=0.0).to(tl.float32)
    v = tl.load(g + offs, mask=m, other=0.0).to(tl.float32) * s[:, None]
    tl.store(out + offs, v.to(out.dtype.element_ty), mask=m)


def _blocks(N: int, C: int, block_c_max: int) -> tuple[int, int]:
    BLOCK_C = min(next_pow2(C), block_c_max)
    BLOCK_R = max(1, min(4096 // BLOCK_C, next_pow2(N)))
    return BLOCK_R, BLOCK_C


# ----------------------------------------------------------------------------- raw launchers
def _loss_rows(pred: torch.Tensor, target: torch.Tensor, beta: float, scale: float,
               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(_regression_loss_kernel, pred, target)
    N, C = pred.shape
    rows = torch.empty(N, device=pred.device, dtype=torch.float32)
    grad = pred.new_empty(N, C) if need_grad else pred.new_empty(0)
    if N == 0:
        return rows, grad
    if C == 0:
        return rows.zero_(), grad
    BLOCK_R, BLOCK_C = _blocks(N, C, BLOCK_C_MAX)
    _regression_loss_kernel[(cdiv(N, BLOCK_R),)](
        pred, target, rows, grad if need_grad else pred, N, C, pred.stride(0), target.stride(0),
        grad.stride(0) if need_grad else 0, float(beta), float(scale), BETA_ZERO=beta == 0, WRITE_GRAD=need_grad,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps_for(BLOCK_R * BLOCK_C))
    return rows, grad


def _scale_rows(g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    check_device(_scale_rows_kernel, g, go)
    N, C = g.shape
    out = g.new_empty(N, C)
    if g.numel() == 0:
        return out
    BLOCK_R, BLOCK_C = _blocks(N, C, 256)
    grid = (cdiv(N, BLOCK_R), cdiv(C, BLOCK_C))
    _scale_rows_kernel[grid](g, go, out, N, C, go.stride(0), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                             num_warps=num_warps_for(BLOCK_R * BLOCK_C))
    return out


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("d2v_fast::regression_loss", mutates_args=())
def regression_loss_op(pred: torch.Tensor, target: torch.Tensor, beta: float, scale: float,
                       need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss ``[N]`` (fp32) and its gradient w.r.t. ``pred`` (``[N, C]``, or ``[0]``)."""
    return _loss_rows(pred, target, beta, scale, need_grad)


@regression_loss_op.register_fake
def _(pred, target, beta, scale, need_grad):
    rows = pred.new_empty(pred.shape[0], dtype=torch.float32)
    return rows, (pred.new_empty(pred.shape[0], pred.shape[1]) if need_grad else pred.new_empty(0))


@torch.library.custom_op("d2v_fast::scale_rows", mutates_args=())
def scale_rows(g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """``g[N, C] * go[N, None]`` with fp32 math, in ``g``'s dtype (``g`` contiguous)."""
    return _scale_rows(g, go)


@scale_rows.register_fake
def _(g, go):
    return g.new_empty(g.shape[0], g.shape[1])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_rows, _grad_of_grad):
    (g,) = ctx.saved_tensors
    if g.numel() == 0 and grad_rows.numel() != 0:
        raise RuntimeError("regression_loss: backward through a call made without need_grad")
    return (_scale_rows(g, grad_rows) if direct(g, grad_rows) else scale_rows(g, grad_rows)), None, None, None, None


regression_loss_op.register_autograd(_backward, setup_context=_setup)


class _Loss(torch.autograd.Function):
    """``regression_loss_op`` without the custom op's dispatch (``kernels.direct``)."""

    @staticmethod
    def forward(ctx, pred, target, beta, scale, need_grad):
        rows, grad = _loss_rows(pred, target, beta, scale, need_grad)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad)
        return rows, grad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows, _grad_of_grad):
        return _backward(ctx, grad_rows, _grad_of_grad)


# ----------------------------------------------------------------------------- public
def regression_loss(pred: torch.Tensor, target: torch.Tensor, *, beta: float, scale: Optional[float] = None,
                    reduction: str = "sum") -> torch.Tensor:
    """Fused smooth L1 / MSE; same contract as ``d2v_fast.kernels.eager.regression_loss``."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"regression_loss: reduction={reduction!r}, expected 'sum' or 'none'")
    if pred.shape != target.shape:
        raise ValueError(f"regression_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    C = pred.shape[-1]
    scale = 1.0 / math.sqrt(C) if scale is None else float(scale)
    p2 = pred.reshape(-1, C)
    t2 = target.detach().reshape(-1, C)
    p2 = p2 if p2.stride(-1) == 1 else p2.contiguous()
    t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
    need_grad = torch.is_grad_enabled() and pred.requires_grad
    if not direct(p2, t2):
        rows, _ = regression_loss_op(p2, t2, float(beta), scale, need_grad)
    elif need_grad:
        rows, _ = _Loss.apply(p2, t2, float(beta), scale, True)
    else:  # no graph to record: the launcher alone, without a gradient buffer
        rows, _ = _loss_rows(p2, t2, float(beta), scale, False)
    return rows.sum() if reduction == "sum" else rows.view(pred.shape[:-1])
