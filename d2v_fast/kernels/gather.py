"""masked_gather / masked_scatter: the rows of ``x[B, T, C]`` where ``mask[B, T]`` is true,
in row-major order, and back (SPEC §3; data2vec 2.0 student input and decoder input).

One kernel moves rows in either direction. Both directions are driven by ``pos[B*T]``:
``pos[i]`` is the compact row of full row ``i`` (an exclusive cumsum of the mask) or -1.

- to compact (gather, and the backward of scatter): programs walk the full rows and store
  ``out[pos[i]] = x[i]`` for the selected ones; unselected rows are masked off, so their
  data is never loaded.
- to full (scatter, and the backward of gather): programs walk the full rows and store
  ``out[i] = rows[pos[i]]`` or the fill value (zero, a ``[C]`` vector, or ``fill[i]``).

Memory traffic per call (``R = B*T`` rows, ``N`` selected, ``e`` bytes per element):
gather reads ``N*C*e`` and writes ``N*C*e``; scatter reads ``N*C*e`` (+ ``(R-N)*C*e`` for a
full fill) and writes ``R*C*e``; both read ``pos`` (4 bytes a row, once per column block).
That is the floor: one read and one write of the selected rows. ``pos`` costs a cumsum
over the mask (``R`` bytes in, ``4R`` out); the gather also needs ``N`` on the host to
allocate its output (one sync, as ``x[mask]``); the scatter needs none.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import check_device, num_warps_for, tl, triton

BLOCK_C_MAX = 256  # 512 contiguous bytes of a bf16 row per program: full 128-byte lines


@triton.jit
def _move_rows_kernel(src, out, pos, fill, R, C, n_sel, stride_src, stride_out, stride_fill,
                      TO_COMPACT: tl.constexpr, FILL: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_r = rows < R
    in_c = cols < C
    p = tl.load(pos + rows, mask=in_r, other=-1)
    # p >= n_sel only when pos and the compact side disagree (checked on the host side with
    # an async assert); never touch memory past the compact rows.
    sel = (p >= 0) & (p < n_sel)
    rows64 = rows.to(tl.int64)
    p64 = tl.where(sel, p, 0).to(tl.int64)
    m_sel = sel[:, None] & in_c[None, :]
    if TO_COMPACT:
        v = tl.load(src + rows64[:, None] * stride_src + cols[None, :], mask=m_sel)
        tl.store(out + p64[:, None] * stride_out + cols[None, :], v, mask=m_sel)
    else:
        m_all = in_r[:, None] & in_c[None, :]
        v = tl.load(src + p64[:, None] * stride_src + cols[None, :], mask=m_sel, other=0.0)
        if FILL == 1:  # one [C] vector at every unselected row
            f = tl.load(fill + cols, mask=in_c, other=0.0)
            v = tl.where(sel[:, None], v, f[None, :].to(v.dtype))
        elif FILL == 2:  # a full [R, C] tensor: read only at the unselected rows
            f = tl.load(fill + rows64[:, None] * stride_fill + cols[None, :],
                        mask=(~sel)[:, None] & m_all, other=0.0)
            v = tl.where(sel[:, None], v, f.to(v.dtype))
        tl.store(out + rows64[:, None] * stride_out + cols[None, :], v, mask=m_all)


def _launch(src: torch.Tensor, out: torch.Tensor, pos: torch.Tensor, fill: Optional[torch.Tensor],
            to_compact: bool) -> torch.Tensor:
    check_device(_move_rows_kernel, src, out)
    R = pos.shape[0]
    C = src.shape[1]
    n_sel = out.shape[0] if to_compact else src.shape[0]
    if R == 0 or C == 0 or (to_compact and n_sel == 0):
        return out
    if src.numel() == 0:  # scatter of no rows: all fill; hand the kernel a valid pointer it never reads
        src = out
    BLOCK_C = min(triton.next_power_of_2(C), BLOCK_C_MAX)
    BLOCK_R = max(1, min(4096 // BLOCK_C, triton.next_power_of_2(R)))
    fill_kind = 0 if fill is None else (1 if fill.dim() == 1 else 2)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _move_rows_kernel[grid](src, out, pos, src if fill is None else fill, R, C, n_sel,
                            src.stride(0), out.stride(0), fill.stride(0) if fill_kind == 2 else 0,
                            TO_COMPACT=to_compact, FILL=fill_kind, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                            num_warps=num_warps_for(BLOCK_R * BLOCK_C))
    return out


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("d2v_fast::rows_to_compact", mutates_args=())
def rows_to_compact(x: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """``out[pos[i]] = x[i]`` for ``pos[i] >= 0``; ``x`` is ``[R, C]``, ``out`` ``[n, C]``."""
    return _launch(x, x.new_empty(n, x.shape[1]), pos, None, to_compact=True)


@rows_to_compact.register_fake
def _(x, pos, n):
    return x.new_empty(n, x.shape[1])


@torch.library.custom_op("d2v_fast::rows_to_full", mutates_args=())
def rows_to_full(rows: torch.Tensor, pos: torch.Tensor, fill: Optional[torch.Tensor]) -> torch.Tensor:
    """``out[i] = rows[pos[i]]`` where ``pos[i] >= 0``, else 0 / ``fill`` (``[C]``) / ``fill[i]``."""
    return _launch(rows, rows.new_empty(pos.shape[0], rows.shape[1]), pos, fill, to_compact=False)


@rows_to_full.register_fake
def _(rows, pos, fill):
    return rows.new_empty(pos.shape[0], rows.shape[1])


def _compact_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _compact_backward(ctx, grad):
    (pos,) = ctx.saved_tensors
    return rows_to_full(grad.contiguous(), pos, None), None, None


def _full_setup(ctx, inputs, output):
    rows, pos, fill = inputs
    ctx.save_for_backward(pos)
    ctx.n = rows.shape[0]
    ctx.fill_kind = 0 if fill is None else fill.dim()


def _full_backward(ctx, grad):
    (pos,) = ctx.saved_tensors
    grad = grad.contiguous()
    g_rows = rows_to_compact(grad, pos, ctx.n) if ctx.needs_input_grad[0] else None
    g_fill = None
    if ctx.fill_kind and ctx.needs_input_grad[2]:
        # The fill's gradient is the gradient at the unselected rows: one elementwise pass
        # (and a column sum for a [C] fill); torch does that at the bandwidth floor already.
        g_fill = grad.masked_fill((pos >= 0)[:, None], 0)
        if ctx.fill_kind == 1:
            g_fill = g_fill.sum(dim=0)
    return g_rows, None, g_fill


rows_to_compact.register_autograd(_compact_backward, setup_context=_compact_setup)
rows_to_full.register_autograd(_full_backward, setup_context=_full_setup)


# ----------------------------------------------------------------------------- public
def _positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos[i]`` = compact row of full row ``i`` or -1, and the number of selected rows."""
    m = mask.reshape(-1)
    csum = torch.cumsum(m, 0, dtype=torch.int32)
    count = csum[-1] if m.numel() else csum.new_zeros(())
    return (csum - 1).masked_fill_(~m, -1), count


def _check_mask(x: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{what}: mask has dtype {mask.dtype}, expected torch.bool")
    if mask.device != x.device:
        raise ValueError(f"{what}: mask is on {mask.device}, x on {x.device}; expected the same device")
    if tuple(x.shape[:-1]) != tuple(mask.shape):
        raise ValueError(f"{what}: x has shape {tuple(x.shape)} but mask {tuple(mask.shape)}; "
                         f"expected mask.shape == x.shape[:-1] (e.g. [B, T] for [B, T, C])")


def masked_gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[mask]``: the rows of ``x[B, T, C]`` where ``mask[B, T]`` is true, ``[N, C]``."""
    _check_mask(x, mask, "masked_gather")
    C = x.shape[-1]
    pos, count = _positions(mask)
    return rows_to_compact(x.reshape(-1, C).contiguous(), pos, int(count))  # int(): N for the output


def masked_scatter(rows: torch.Tensor, mask: torch.Tensor, fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of masked_gather: ``rows[N, C]`` at the true positions of ``mask[B, T]``, ``fill``
    (``[C]`` or ``[B, T, C]``; None = zeros) elsewhere; ``[B, T, C]`` in ``rows.dtype``."""
    C = rows.shape[-1]
    shape = (*mask.shape, C)
    if mask.dtype != torch.bool or mask.device != rows.device:
        raise ValueError(f"masked_scatter: mask is {mask.dtype} on {mask.device}, expected torch.bool on "
                         f"{rows.device} (where rows is)")
    if fill is not None:
        if tuple(fill.shape) not in ((C,), shape):
            raise ValueError(f"masked_scatter: fill has shape {tuple(fill.shape)}, expected ({C},) or {shape}")
        fill = fill.to(rows.dtype)
        fill = fill.contiguous() if fill.dim() == 1 else fill.reshape(-1, C).contiguous()
    pos, count = _positions(mask)
    torch._assert_async(count == rows.shape[0], "masked_scatter: rows.shape[0] differs from mask.sum()")
    return rows_to_full(rows.contiguous(), pos, fill).view(shape)
