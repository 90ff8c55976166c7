"""masked_gather / masked_scatter: the rows of ``x[B, T, C]`` where ``mask[B, T]`` is true,
in row-major order, and back (docs/design.md#kernels; data2vec 2.0 student input and decoder input).

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
allocate its output (one sync, as ``x[mask]``, unless the caller passes it); the scatter
needs none.

Multi-mask (data2vec 2.0 clones, docs/design.md#recipes): the gather also takes ``mask[clones*B, T]`` for
``x[B, T, C]`` (row ``r`` of the mask belongs to sample ``r // clones``). ``pos`` then lives in
the cloned space (``B*clones*T`` entries) and nothing of size ``[B*clones, T, C]`` is built:

- forward (``CLONED`` to compact): programs walk the cloned rows ``i = (b*clones + c)*T + t``
  and load the sample row ``x[b*T + t]`` for the selected ones: ``N*C*e`` read (cache hits
  where clones pick the same row), ``N*C*e`` written, as without clones.
- backward (``CLONED`` to full): one program per block of ``grad_x`` rows ``(b, t)`` loads
  ``pos`` at the ``clones`` cloned rows of each and adds the selected gradient rows in fp32,
  in clone order, then stores once: no atomics, bitwise reproducible; reads ``N*C*e``,
  writes ``B*T*C*e``.

The scatter is unchanged: its rows, mask and fill already live in the cloned space.
"""
from __future__ import annotations

from typing import Optional

import torch

from .eager import mask_clones
from . import cdiv, check_device, direct, next_pow2, num_warps_for, tl, triton

BLOCK_C_MAX = 256  # 512 contiguous bytes of a bf16 row per program: full 128-byte lines


@triton.jit
def _move_rows_kernel(src, out, pos, fill, R, C, n_sel, T, clones, stride_src, stride_out, stride_fill,
                      TO_COMPACT: tl.constexpr, FILL: tl.constexpr, CLONED: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_r = rows < R
    in_c = cols < C
    rows64 = rows.to(tl.int64)
    m_all = in_r[:, None] & in_c[None, :]
    if CLONED and not TO_COMPACT:
        # Sum over the clones (the backward of a cloned gather): this program owns full rows
        # i = b*T + t and reads their contributions at cloned rows (b*clones + c)*T + t, in a
        # fixed order c = 0, 1, ...: no atomics, bitwise reproducible.
        first = rows64 + (rows64 // T) * (clones - 1) * T  # (b*clones)*T + t
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for c in range(0, clones):
            p = tl.load(pos + first + c * T, mask=in_r, other=-1)
            sel = (p >= 0) & (p < n_sel)
            p64 = tl.where(sel, p, 0).to(tl.int64)
            v = tl.load(src + p64[:, None] * stride_src + cols[None, :], mask=sel[:, None] & in_c[None, :],
                        other=0.0)
            acc += v.to(tl.float32)
        tl.store(out + rows64[:, None] * stride_out + cols[None, :], acc.to(out.dtype.element_ty), mask=m_all)
    else:
        p = tl.load(pos + rows, mask=in_r, other=-1)
        # p >= n_sel only when pos and the compact side disagree (checked on the host side with
        # an async assert); never touch memory past the compact rows.
        sel = (p >= 0) & (p < n_sel)
        p64 = tl.where(sel, p, 0).to(tl.int64)
        m_sel = sel[:, None] & in_c[None, :]
        if TO_COMPACT:
            if CLONED:  # rows walk the cloned space i = (b*clones + c)*T + t; the data is x[b, t]
                src_rows = (rows64 // (clones * T)) * T + rows64 % T
            else:
                src_rows = rows64
            v = tl.load(src + src_rows[:, None] * stride_src + cols[None, :], mask=m_sel)
            tl.store(out + p64[:, None] * stride_out + cols[None, :], v, mask=m_sel)
        else:
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
            to_compact: bool, T: int = 1, clones: int = 1) -> torch.Tensor:
    """``clones > 1``: ``pos`` indexes the cloned space ``[B*clones*T]`` and the full side is
    ``[B*T, C]``; to compact reads sample rows for each selected clone row, to full sums the
    clones (no fill)."""
    check_device(_move_rows_kernel, src, out)
    cloned = clones > 1
    R = pos.shape[0] if to_compact or not cloned else out.shape[0]
    C = src.shape[1]
    n_sel = out.shape[0] if to_compact else src.shape[0]
    if R == 0 or C == 0 or (to_compact and n_sel == 0):
        return out
    if src.numel() == 0:  # scatter of no rows: all fill; hand the kernel a valid pointer it never reads
        src = out
    BLOCK_C = min(next_pow2(C), BLOCK_C_MAX)
    BLOCK_R = max(1, min(4096 // BLOCK_C, next_pow2(R)))
    fill_kind = 0 if fill is None else (1 if fill.dim() == 1 else 2)
    grid = (cdiv(R, BLOCK_R), cdiv(C, BLOCK_C))
    _move_rows_kernel[grid](src, out, pos, src if fill is None else fill, R, C, n_sel, max(T, 1), clones,
                            src.stride(0), out.stride(0), fill.stride(0) if fill_kind == 2 else 0,
                            TO_COMPACT=to_compact, FILL=fill_kind, CLONED=cloned, BLOCK_R=BLOCK_R,
                            BLOCK_C=BLOCK_C, num_warps=num_warps_for(BLOCK_R * BLOCK_C))
    return out


# ----------------------------------------------------------------------------- raw launchers
def _to_compact(x: torch.Tensor, pos: torch.Tensor, n: int, T: int, clones: int) -> torch.Tensor:
    return _launch(x, x.new_empty(n, x.shape[1]), pos, None, to_compact=True, T=T, clones=clones)


def _to_full(rows: torch.Tensor, pos: torch.Tensor, fill: Optional[torch.Tensor], T: int, clones: int) -> torch.Tensor:
    if clones > 1 and fill is not None:
        raise ValueError("rows_to_full: a fill is not supported with clones > 1")
    out = rows.new_empty(pos.shape[0] // max(clones, 1), rows.shape[1])
    return _launch(rows, out, pos, fill, to_compact=False, T=T, clones=clones)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("d2v_fast::rows_to_compact", mutates_args=())
def rows_to_compact(x: torch.Tensor, pos: torch.Tensor, n: int, T: int = 1, clones: int = 1) -> torch.Tensor:
    """``out[pos[i]] = x[i]`` for ``pos[i] >= 0``; ``x`` is ``[R, C]``, ``out`` ``[n, C]``. With
    ``clones > 1``, ``x`` is ``[B*T, C]``, ``pos`` ``[B*clones*T]`` and cloned row
    ``i = (b*clones + c)*T + t`` takes ``x[b*T + t]``."""
    return _to_compact(x, pos, n, T, clones)


@rows_to_compact.register_fake
def _(x, pos, n, T=1, clones=1):
    return x.new_empty(n, x.shape[1])


@torch.library.custom_op("d2v_fast::rows_to_full", mutates_args=())
def rows_to_full(rows: torch.Tensor, pos: torch.Tensor, fill: Optional[torch.Tensor], T: int = 1,
                 clones: int = 1) -> torch.Tensor:
    """``out[i] = rows[pos[i]]`` where ``pos[i] >= 0``, else 0 / ``fill`` (``[C]``) / ``fill[i]``.
    With ``clones > 1`` (no fill): ``out[b*T + t] = sum_c rows[pos[(b*clones + c)*T + t]]``
    (0 for the unselected clone rows), ``[B*T, C]``: the adjoint of the cloned compaction."""
    return _to_full(rows, pos, fill, T, clones)


@rows_to_full.register_fake
def _(rows, pos, fill, T=1, clones=1):
    return rows.new_empty(pos.shape[0] // max(clones, 1), rows.shape[1])


def _compact_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.T, ctx.clones = (inputs[3], inputs[4]) if len(inputs) > 3 else (1, 1)


def _compact_backward(ctx, grad):
    (pos,) = ctx.saved_tensors
    return full(grad.contiguous(), pos, None, ctx.T, ctx.clones), None, None, None, None


def _full_setup(ctx, inputs, output):
    rows, pos, fill = inputs[:3]
    ctx.save_for_backward(pos)
    ctx.n = rows.shape[0]
    ctx.fill_kind = 0 if fill is None else fill.dim()
    ctx.T, ctx.clones = (inputs[3], inputs[4]) if len(inputs) > 3 else (1, 1)


def _full_backward(ctx, grad):
    (pos,) = ctx.saved_tensors
    grad = grad.contiguous()
    g_rows = compact(grad, pos, ctx.n, ctx.T, ctx.clones) if ctx.needs_input_grad[0] else None
    g_fill = None
    if ctx.fill_kind and ctx.needs_input_grad[2]:
        # The fill's gradient is the gradient at the unselected rows: one elementwise pass
        # (and a column sum for a [C] fill); torch does that at the bandwidth floor already.
        g_fill = grad.masked_fill((pos >= 0)[:, None], 0)
        if ctx.fill_kind == 1:
            g_fill = g_fill.sum(dim=0)
    return g_rows, None, g_fill, None, None


rows_to_compact.register_autograd(_compact_backward, setup_context=_compact_setup)
rows_to_full.register_autograd(_full_backward, setup_context=_full_setup)


# ----------------------------------------------------------------------------- direct path
def _direct_function(name: str, setup, backward, launch) -> type:
    """An autograd Function with a custom op's setup/backward formulas around its launcher:
    the custom op without its dispatch (``kernels.direct``)."""
    def forward(ctx, *args):
        setup(ctx, args, None)
        return launch(*args)
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward)})


_Compact = _direct_function("_Compact", _compact_setup, _compact_backward, _to_compact)
_Full = _direct_function("_Full", _full_setup, _full_backward, _to_full)


def compact(x: torch.Tensor, pos: torch.Tensor, n: int, T: int = 1, clones: int = 1) -> torch.Tensor:
    """``rows_to_compact``: straight through an autograd Function when ``kernels.direct``
    allows, else the custom op (under ``torch.compile``); the same kernels either way."""
    if direct(x, pos):
        if not (x.requires_grad and torch.is_grad_enabled()):  # no graph to record: the launcher alone
            return _to_compact(x, pos, n, T, clones)
        return _Compact.apply(x, pos, n, T, clones)
    return rows_to_compact(x, pos, n, T, clones)


def full(rows: torch.Tensor, pos: torch.Tensor, fill: Optional[torch.Tensor], T: int = 1,
         clones: int = 1) -> torch.Tensor:
    """``rows_to_full``, by the same choice as ``compact``."""
    if direct(rows, pos, fill):
        if not (torch.is_grad_enabled() and (rows.requires_grad or (fill is not None and fill.requires_grad))):
            return _to_full(rows, pos, fill, T, clones)
        return _Full.apply(rows, pos, fill, T, clones)
    return rows_to_full(rows, pos, fill, T, clones)


# ----------------------------------------------------------------------------- public
def _positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos[i]`` = compact row of full row ``i`` or -1, and the number of selected rows."""
    m = mask.reshape(-1)
    csum = torch.cumsum(m, 0, dtype=torch.int32)
    count = csum[-1] if m.numel() else csum.new_zeros(())
    return positions_from_cumsum(csum, m), count


def positions_from_cumsum(csum: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``pos`` from the inclusive int32 cumsum of the flat mask ``m``: ``csum*m - 1`` is the
    compact row at a true entry and -1 at a false one (two launches; ``csum`` is kept)."""
    return (csum * m).sub_(1)


def _check_mask(x: torch.Tensor, mask: torch.Tensor, what: str) -> int:
    """Validate ``mask`` against ``x``; return its clone count (1 for ``mask.shape == x.shape[:-1]``)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"{what}: mask has dtype {mask.dtype}, expected torch.bool")
    if mask.device != x.device:
        raise ValueError(f"{what}: mask is on {mask.device}, x on {x.device}; expected the same device")
    if tuple(x.shape[:-1]) == tuple(mask.shape):
        return 1
    if x.dim() == 3:
        return mask_clones(x.shape, mask.shape, what)
    raise ValueError(f"{what}: x has shape {tuple(x.shape)} but mask {tuple(mask.shape)}; "
                     f"expected mask.shape == x.shape[:-1] (e.g. [B, T] for [B, T, C]) or [clones*B, T]")


def masked_gather(x: torch.Tensor, mask: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """``x[mask]``: the rows of ``x[B, T, C]`` where ``mask[B, T]`` is true, ``[N, C]``.

    ``mask`` may also be ``[clones*B, T]`` (data2vec 2.0 multi-mask, row ``r`` of sample
    ``r // clones``): each true ``mask[r, t]`` (row-major) gives ``x[r // clones, t]``, read
    straight from ``x`` (no cloned copy). Backward: each program owns rows ``(b, t)`` of
    ``grad_x`` and adds up their ``clones`` contributions in a fixed order (no atomics).
    ``count``: ``N``, when the caller knows it on the host (``--train.host_counts``); else it
    is read from the device (one sync, as ``x[mask]``)."""
    clones = _check_mask(x, mask, "masked_gather")
    C = x.shape[-1]
    T = x.shape[1] if x.dim() == 3 else 1
    pos, total = _positions(mask)
    if count is None:
        count = int(total)  # N for the output: the sync
    else:
        torch._assert_async(total == count, "masked_gather: count differs from mask.sum()")
    return compact(x.reshape(-1, C).contiguous(), pos, count, T, clones)


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
    return full(rows.contiguous(), pos, fill).view(shape)
