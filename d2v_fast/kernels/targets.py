"""build_targets: data2vec targets from the teacher's top-K layer outputs (docs/design.md#targets).

Per layer a norm ("instance": per sample and channel over time, padding left out of the
statistics; "layer": per token over C, no affine; or none), the mean over the K layers, an
optional final norm of the mean, fp32 output at every position or only at the masked rows.
Padded positions hold 0 in the output (they carry no target).

Two kernels, chosen by the axis the norms reduce over:

- ``_targets_time_kernel`` (instance norms): one program per (sample b, block of
  ``BLOCK_C`` channels) holds the whole time axis of that block, ``[T, BLOCK_C]``, in
  registers. For each of the K layers it loads the tile once, takes the exact mean and
  variance over the real positions (two passes over registers, not over memory), normalises
  and accumulates; then the optional final instance norm, then stores only the masked rows.
  HBM traffic: each input element is read exactly once (``K*B*T*C*e`` bytes), ``N*C*4``
  bytes written, plus the padding mask and ``pos`` (5 bytes a token, read once per channel
  block: 16 MB, 1.6% of the input at C=768 and BLOCK_C=16, nearly all L2 hits). For data2vec base (K=10, B*T=65,536,
  C=768, bf16, 31% masked) that is 1.007 GB read + 0.062 GB written; the floor of docs/design.md#kernels.
  Constraint: ``next_pow2(T) * BLOCK_C`` values live in registers, so ``BLOCK_C`` shrinks as
  T grows (16 channels = 32 bytes of a bf16 row at T=512; neighbouring programs take the
  neighbouring channel blocks, so the rest of each 64/128-byte line is an L2 hit).
  T > MAX_T is not supported here (d2v_fast.ops falls back to the torch path in auto mode).
- ``_targets_token_kernel`` (layer norms or no norm): one program per block of output rows
  holds whole rows ``[BLOCK_R, C]``; for each layer it loads the row, normalises over C and
  accumulates, then the optional final layer norm. With a mask it visits only the masked
  rows: reads ``K*N*C*e`` bytes (31% of the input), writes ``N*C*4``.

Mixed norms run both kernels with an fp32 ``[B, T, C]`` intermediate (written once, read
once: ``8*B*T*C`` extra bytes, 40% more than the floor at K=10 bf16):
("instance", "layer") = time kernel (instance, none) -> token kernel (K=1, -, layer);
("layer", "instance") = token kernel (layer, none) -> time kernel (K=1, instance, -).

Layers may come as a list (up to MAX_LIST_LAYERS pointers are passed as kernel arguments,
so nothing is copied) or stacked ``[K, B, T, C]`` (one base pointer and a layer stride).

Multi-mask (data2vec 2.0 clones, docs/design.md#recipes): ``mask`` may be ``[clones*B, T]`` (row ``r`` belongs to
sample ``r // clones``); the output is one row per true ``mask[r, t]`` (row-major), the
target of sample ``r // clones`` at ``t``. The targets are computed once per sample and the
repeat is fused into the store, driven by ``pos`` over the cloned mask (an exclusive cumsum,
``pos[(b*clones + c)*T + t]`` = compact row or -1):

- time kernel: after the (single) pass over the K tiles of sample ``b``, it loops over the
  clones and stores the finished tile at each clone's masked rows. Each input element is
  still read once; ``N*C*4`` bytes are written (``N`` counts every clone's rows).
- token kernel: programs walk the tokens ``(b, t)`` of the samples (not the output rows), load
  a token's K rows only if some clone masks it, compute its target once and store it at every
  clone's compact row. With clone_batch 8 and 48% masking nearly every token is used (all
  but 0.52^8 = 0.5%), so this reads about ``K*B*T*C*e`` (a gather of output rows would
  read ``K*N*C*e``, 3.8x more, and normalise every row ``clones`` times over).

No ``[B*clones, T, C]`` tensor exists at any point; mixed norms keep their ``[B, T, C]``
intermediate per sample.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .eager import mask_clones, selected_rows
from .gather import positions_from_cumsum
from . import cdiv, check_device, direct, next_pow2, num_warps_for, tl, triton

MAX_LIST_LAYERS = 16  # pointer arguments of the kernels; longer lists are stacked (one copy)
TILE = 8192  # values of one [T, BLOCK_C] tile held in registers by a time-kernel program
MAX_T = 8192  # beyond this BLOCK_C would be < 1: not supported by the time kernel
NORMS = (None, "instance", "layer")
# How the per-layer instance norm without a final norm (data2vec text and speech) runs:
# "fused" (one program holds a sample's [T, BLOCK_C] tile for all K layers: each input read
# once) or "split" (statistics pass + apply pass: more, smaller programs, the selected rows
# read twice). Measured by benchmarks/test_kernels.py (provider triton_split); the faster
# at base shapes is the default. D2V_TARGETS_TIME overrides.
TIME_METHODS = ("fused", "split")
TIME_METHOD = os.environ.get("D2V_TARGETS_TIME", "fused").strip().lower() or "fused"
if TIME_METHOD not in TIME_METHODS:
    raise ValueError(f"D2V_TARGETS_TIME={TIME_METHOD!r}: expected one of {TIME_METHODS} (unset means fused)")
SPLIT_BLOCK_T = 64
SPLIT_BLOCK_C = 64  # 128 contiguous bytes of a bf16 row: one full cache line
SPLIT_MIN_PROGRAMS = 1024  # statistics programs wanted (a few per SM): fewer -> split the time axis
MAX_TIME_SPLITS = 16


@triton.jit
def _layer_ptr(k, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
               stride_k, K: tl.constexpr, STACKED: tl.constexpr):
    """Base pointer of layer ``k``, a run-time loop index. The kernels below loop over the K
    layers without unrolling, so a program holds one layer's tile at a time: unrolled, ptxas
    overlapped the layers and kept several tiles live, and at data2vec base shapes the token,
    time and apply kernels reached 255 registers and spilled (sm_90, ``python -m
    d2v_fast.kernels.registers``); the statistics kernel compiled K copies of its time loop."""
    if STACKED:  # a 64-bit offset: k * stride_k may not fit in int32
        p = x0 + tl.cast(k, tl.int64) * stride_k
    else:  # a select per layer that exists (K is a compile-time constant)
        p = x0
        if K > 1:
            p = tl.where(k == 1, x1, p)
        if K > 2:
            p = tl.where(k == 2, x2, p)
        if K > 3:
            p = tl.where(k == 3, x3, p)
        if K > 4:
            p = tl.where(k == 4, x4, p)
        if K > 5:
            p = tl.where(k == 5, x5, p)
        if K > 6:
            p = tl.where(k == 6, x6, p)
        if K > 7:
            p = tl.where(k == 7, x7, p)
        if K > 8:
            p = tl.where(k == 8, x8, p)
        if K > 9:
            p = tl.where(k == 9, x9, p)
        if K > 10:
            p = tl.where(k == 10, x10, p)
        if K > 11:
            p = tl.where(k == 11, x11, p)
        if K > 12:
            p = tl.where(k == 12, x12, p)
        if K > 13:
            p = tl.where(k == 13, x13, p)
        if K > 14:
            p = tl.where(k == 14, x14, p)
        if K > 15:
            p = tl.where(k == 15, x15, p)
    return p


@triton.jit
def _instance_norm_tile(x, w, n, eps):
    """Normalise ``x[BLOCK_T, BLOCK_C]`` over axis 0 with weights ``w[BLOCK_T, 1]`` (1 at real
    positions): biased variance, exact two-pass; padded positions come out 0."""
    mean = tl.sum(x * w, axis=0) / n
    d = (x - mean[None, :]) * w
    var = tl.sum(d * d, axis=0) / n
    return d * tl.rsqrt(var + eps)[None, :]


@triton.jit
def _targets_time_kernel(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                         stride_k, stride_b, stride_t, pad, pos, out, stride_out, T, C, clones, eps,
                         K: tl.constexpr, STACKED: tl.constexpr, INSTANCE: tl.constexpr,
                         FINAL_INSTANCE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_POS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # Channel blocks vary fastest, so programs running together share each row's cache lines.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    in_t = t < T
    in_c = c < C
    if HAS_PAD:
        real = in_t & (tl.load(pad + b * T + t, mask=in_t, other=1) == 0)
    else:
        real = in_t
    w = real.to(tl.float32)[:, None]
    n = tl.maximum(tl.sum(real.to(tl.float32), axis=0), 1.0)
    m2 = in_t[:, None] & in_c[None, :]
    offs = b * stride_b + t[:, None].to(tl.int64) * stride_t + c[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in range(0, K):  # not unrolled: one layer's tile live at a time (see _layer_ptr)
        base = _layer_ptr(k, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                          stride_k, K, STACKED)
        x = tl.load(base + offs, mask=m2, other=0.0).to(tl.float32)
        if INSTANCE:
            x = _instance_norm_tile(x, w, n, eps)
        acc += x
    acc = acc * (1.0 / K)
    if FINAL_INSTANCE:
        acc = _instance_norm_tile(acc, w, n, eps)
    if HAS_PAD:
        acc = tl.where(real[:, None], acc, 0.0)
    if HAS_POS:  # only the masked rows, at their compact row; once per clone of sample b
        for cl in range(0, clones):  # the statistics above are computed once for all clones
            p = tl.load(pos + (b * clones + cl) * T + t, mask=in_t, other=-1)
            sel = p >= 0
            dst = tl.where(sel, p, 0).to(tl.int64)
            tl.store(out + dst[:, None] * stride_out + c[None, :], acc, mask=sel[:, None] & in_c[None, :])
    else:
        tl.store(out + (b * T + t[:, None]) * stride_out + c[None, :], acc, mask=m2)


@triton.jit
def _chan_merge(n, mean, m2, n_c, mean_c, m2_c):
    """Chan et al.'s pairwise update: the count, mean and summed squared deviations of two
    disjoint sets from each set's own (no E[x^2] - E[x]^2 cancellation)."""
    n_new = n + n_c
    delta = mean_c - mean
    mean = mean + delta * (n_c / tl.maximum(n_new, 1.0))
    m2 = m2 + m2_c + delta * delta * (n * n_c / tl.maximum(n_new, 1.0))
    return n_new, mean, m2


@triton.jit
def _instance_stats_kernel(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                           stride_k, stride_b, stride_t, pad, mean_out, m2_out, n_out, rstd_out, B, T, C,
                           rows_per_split, eps, K: tl.constexpr, STACKED: tl.constexpr, HAS_PAD: tl.constexpr,
                           FINAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split method, pass 1: per (layer, sample, channel) statistics over the real positions
    of time split ``s`` (``rows_per_split`` positions), streamed in [BLOCK_T, BLOCK_C] chunks,
    each chunk's mean and squared deviations exact in registers, merged with Chan's formula.
    FINAL (one split): stores mean and 1/std ``[K, B, C]``; else the partial mean, squared
    deviations ``[K, B, S, C]`` and count ``[B, S]`` for ``_instance_finalize_kernel``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    S = tl.num_programs(2)
    in_c = c < C
    t_lo = split * rows_per_split
    t_hi = tl.minimum(t_lo + rows_per_split, T)
    for k in range(0, K):  # not unrolled (see _layer_ptr)
        base = _layer_ptr(k, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                          stride_k, K, STACKED)
        n = tl.zeros((BLOCK_C,), dtype=tl.float32)  # real positions so far (the same in every column)
        mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            in_t = t < t_hi
            if HAS_PAD:
                real = in_t & (tl.load(pad + b * T + t, mask=in_t, other=1) == 0)
            else:
                real = in_t
            w = real.to(tl.float32)[:, None]
            x = tl.load(base + b * stride_b + t[:, None].to(tl.int64) * stride_t + c[None, :],
                        mask=real[:, None] & in_c[None, :], other=0.0).to(tl.float32)
            n_c = tl.sum(real.to(tl.float32), axis=0)
            mean_c = tl.sum(x, axis=0) / tl.maximum(n_c, 1.0)
            d = (x - mean_c[None, :]) * w
            n, mean, m2 = _chan_merge(n, mean, m2, n_c, mean_c, tl.sum(d * d, axis=0))
        if FINAL:
            at = (k * B + b) * C + c
            tl.store(mean_out + at, mean, mask=in_c)
            tl.store(rstd_out + at, tl.rsqrt(m2 / tl.maximum(n, 1.0) + eps), mask=in_c)
        else:
            at = ((k * B + b) * S + split) * C + c
            tl.store(mean_out + at, mean, mask=in_c)
            tl.store(m2_out + at, m2, mask=in_c)
            if k == 0:  # the same count in every column (and in every channel block's program)
                tl.store(n_out + b * S + split, tl.max(n, axis=0))


@triton.jit
def _instance_finalize_kernel(part_mean, part_m2, part_n, mean_out, rstd_out, B, C, S, eps, K: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """Split method, pass 1b (several time splits): merge the S partial statistics of each
    (layer, sample, channel) in split order; store mean and 1/std ``[K, B, C]``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    in_c = c < C
    for k in range(0, K):  # not unrolled
        n = tl.zeros((BLOCK_C,), dtype=tl.float32)
        mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for split in range(0, S):
            at = ((k * B + b) * S + split) * C + c
            n_c = tl.load(part_n + b * S + split)
            n, mean, m2 = _chan_merge(n, mean, m2, n_c, tl.load(part_mean + at, mask=in_c, other=0.0),
                                      tl.load(part_m2 + at, mask=in_c, other=0.0))
        at = (k * B + b) * C + c
        tl.store(mean_out + at, mean, mask=in_c)
        tl.store(rstd_out + at, tl.rsqrt(m2 / tl.maximum(n, 1.0) + eps), mask=in_c)


@triton.jit
def _instance_apply_kernel(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                           stride_k, stride_b, stride_t, pad, mean_in, rstd_in, pos, out, stride_out, B, T, C,
                           clones, K: tl.constexpr, STACKED: tl.constexpr, HAS_PAD: tl.constexpr,
                           HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split method, pass 2: for a [BLOCK_T, BLOCK_C] block of sample ``b``, the mean over the
    K layers of ``(x - mean) * rstd``, loading only the rows some clone's mask selects (the
    masked-off rows issue no memory requests), stored at each clone's compact row."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < T
    in_c = c < C
    if HAS_POS:
        used = in_t & (t < 0)
        for cl in range(0, clones):
            used = used | (tl.load(pos + (b * clones + cl) * T + t, mask=in_t, other=-1) >= 0)
    else:
        used = in_t
    if HAS_PAD:
        real = used & (tl.load(pad + b * T + t, mask=in_t, other=1) == 0)
    else:
        real = used
    m_load = real[:, None] & in_c[None, :]
    offs = b * stride_b + t[:, None].to(tl.int64) * stride_t + c[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in range(0, K):  # not unrolled: one layer's tile live at a time (see _layer_ptr)
        base = _layer_ptr(k, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                          stride_k, K, STACKED)
        x = tl.load(base + offs, mask=m_load, other=0.0).to(tl.float32)
        at = (k * B + b) * C + c
        mu = tl.load(mean_in + at, mask=in_c, other=0.0)
        rs = tl.load(rstd_in + at, mask=in_c, other=0.0)
        acc += (x - mu[None, :]) * rs[None, :]
    acc = tl.where(real[:, None], acc * (1.0 / K), 0.0)  # padded positions hold 0
    if HAS_POS:
        for cl in range(0, clones):
            p = tl.load(pos + (b * clones + cl) * T + t, mask=in_t, other=-1)
            sel = p >= 0
            dst = tl.where(sel, p, 0).to(tl.int64)
            tl.store(out + dst[:, None] * stride_out + c[None, :], acc, mask=sel[:, None] & in_c[None, :])
    else:
        tl.store(out + (b * T + t[:, None]) * stride_out + c[None, :], acc, mask=in_t[:, None] & in_c[None, :])


@triton.jit
def _layer_norm_rows(x, in_c, C, eps):
    mean = tl.sum(x, axis=1) / C
    d = tl.where(in_c[None, :], x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    return d * tl.rsqrt(var + eps)[:, None]


@triton.jit
def _targets_token_kernel(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                          stride_k, stride_b, stride_t, pad, idx, pos, out, stride_out, n_rows, T, C, clones,
                          eps, K: tl.constexpr, STACKED: tl.constexpr, LAYER: tl.constexpr,
                          FINAL_LAYER: tl.constexpr, HAS_PAD: tl.constexpr, HAS_IDX: tl.constexpr,
                          HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    in_r = r < n_rows
    in_c = c < C
    if HAS_IDX:  # output row r is token idx[r] (the masked rows, row-major)
        src = tl.load(idx + r, mask=in_r, other=0).to(tl.int64)
    else:
        src = r.to(tl.int64)
    bb = src // T
    tt = src - bb * T
    if HAS_POS:  # r walks the tokens (b, t); load only those that some clone of b selects
        first = (bb * clones) * T + tt
        used = in_r & (r < 0)
        for cl in range(0, clones):
            used = used | (tl.load(pos + first + cl * T, mask=in_r, other=-1) >= 0)
        m2 = used[:, None] & in_c[None, :]
    else:
        m2 = in_r[:, None] & in_c[None, :]
    offs = (bb * stride_b + tt * stride_t)[:, None] + c[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k in range(0, K):  # not unrolled: one layer's tile live at a time (see _layer_ptr)
        base = _layer_ptr(k, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                          stride_k, K, STACKED)
        x = tl.load(base + offs, mask=m2, other=0.0).to(tl.float32)
        if LAYER:
            x = _layer_norm_rows(x, in_c, C, eps)
        acc += x
    acc = acc * (1.0 / K)
    if FINAL_LAYER:
        acc = _layer_norm_rows(acc, in_c, C, eps)
    if HAS_PAD:
        padded = tl.load(pad + src, mask=in_r, other=0) != 0
        acc = tl.where(padded[:, None], 0.0, acc)
    if HAS_POS:  # computed once per token, written at the compact row of every clone that masks it
        for cl in range(0, clones):
            p = tl.load(pos + first + cl * T, mask=in_r, other=-1)
            sel = p >= 0
            dst = tl.where(sel, p, 0).to(tl.int64)
            tl.store(out + dst[:, None] * stride_out + c[None, :], acc, mask=sel[:, None] & in_c[None, :])
    else:
        tl.store(out + r[:, None].to(tl.int64) * stride_out + c[None, :], acc, mask=m2)


# ----------------------------------------------------------------------------- launchers
class _Layers:
    """The K inputs as kernel arguments: 16 base pointers (list) or one base and a stride."""

    def __init__(self, layers: Sequence[torch.Tensor] | torch.Tensor):
        if isinstance(layers, torch.Tensor):
            if layers.dim() != 4:
                raise ValueError(f"build_targets: a stacked input must be [K, B, T, C], got {tuple(layers.shape)}")
            stacked = layers if layers.stride(-1) == 1 else layers.contiguous()
            self.K, self.B, self.T, self.C = stacked.shape
            self.ptrs = [stacked] * MAX_LIST_LAYERS
            self.stride_k, self.stride_b, self.stride_t = stacked.stride(0), stacked.stride(1), stacked.stride(2)
            self.stacked, self.ref = True, stacked
            return
        layers = list(layers)
        if not layers:
            raise ValueError("build_targets: got no layers (expected K >= 1 tensors [B, T, C])")
        shape = tuple(layers[0].shape)
        for i, x in enumerate(layers):
            x0 = layers[0]
            if x.dim() != 3 or tuple(x.shape) != shape or x.dtype != x0.dtype or x.device != x0.device:
                raise ValueError(f"build_targets: layer {i} is {tuple(x.shape)} {x.dtype} on {x.device}; expected "
                                 f"every layer [B, T, C] like layer 0 ({shape} {x0.dtype} on {x0.device})")
        if len(layers) > MAX_LIST_LAYERS:  # more pointers than kernel arguments: one copy
            self.__init__(torch.stack(layers))
            return
        first = layers[0] if layers[0].stride(-1) == 1 else layers[0].contiguous()
        strides = first.stride()[:2]
        layers = [first] + [x if x.stride() == first.stride() else x.contiguous() for x in layers[1:]]
        if any(x.stride()[:2] != strides for x in layers):
            layers = [x.contiguous() for x in layers]
        self.K = len(layers)
        self.B, self.T, self.C = shape
        self.ptrs = layers + [layers[0]] * (MAX_LIST_LAYERS - len(layers))
        self.stride_k, (self.stride_b, self.stride_t) = 0, layers[0].stride()[:2]
        self.stacked, self.ref = False, layers[0]


def _run_time(src: _Layers, pad, pos, out, instance: bool, final_instance: bool, eps: float,
              clones: int = 1) -> None:
    B, T, C = src.B, src.T, src.C
    if TIME_METHOD == "split" and instance and not final_instance:
        _run_time_split(src, pad, pos, out, eps, clones)
        return
    BLOCK_T = next_pow2(T)
    BLOCK_C = max(1, min(TILE // BLOCK_T, 32, next_pow2(C)))
    grid = (cdiv(C, BLOCK_C), B)
    _targets_time_kernel[grid](*src.ptrs, src.stride_k, src.stride_b, src.stride_t,
                               out if pad is None else pad, out if pos is None else pos, out, out.stride(-2),
                               T, C, clones, eps, K=src.K, STACKED=src.stacked, INSTANCE=instance,
                               FINAL_INSTANCE=final_instance, HAS_PAD=pad is not None, HAS_POS=pos is not None,
                               BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=num_warps_for(BLOCK_T * BLOCK_C))


def split_covers(layer_norm: Optional[str], final_norm: Optional[str]) -> bool:
    """Whether the instance norm of these norms runs by the split method (TIME_METHOD
    "split", per-layer instance norm, no final instance norm), which has no limit on T."""
    return TIME_METHOD == "split" and layer_norm == "instance" and final_norm != "instance"


def _run_time_split(src: _Layers, pad, pos, out, eps: float, clones: int) -> None:
    """Per-layer instance norm, mean over K (no final norm) in two passes: the statistics
    ``[K, B, C]`` (fp32, reads every input element once), then the normalised mean at the
    rows that need it (reads those rows of the K layers again: 31% more at data2vec text's
    masking, ~100% with data2vec 2.0's clones). Many small programs instead of one
    register-resident ``[T, BLOCK_C]`` tile per program; no limit on T. When (channel
    blocks x samples) is below SPLIT_MIN_PROGRAMS (speech: 12 x 8 at base), the time axis is
    split too, and a third small launch merges the partial statistics."""
    B, T, C = src.B, src.T, src.C
    dev = out.device
    BLOCK_C = min(SPLIT_BLOCK_C, next_pow2(C))
    BLOCK_T = min(SPLIT_BLOCK_T, next_pow2(T))
    c_blocks = cdiv(C, BLOCK_C)
    want = min(MAX_TIME_SPLITS, cdiv(SPLIT_MIN_PROGRAMS, c_blocks * B), cdiv(T, BLOCK_T))
    rows_per_split = cdiv(cdiv(T, max(want, 1)), BLOCK_T) * BLOCK_T
    S = cdiv(T, rows_per_split)
    mean = torch.empty(src.K, B, C, device=dev, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    common = dict(K=src.K, STACKED=src.stacked, HAS_PAD=pad is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
                  num_warps=num_warps_for(BLOCK_T * BLOCK_C))
    pad_arg = out if pad is None else pad
    if S == 1:
        _instance_stats_kernel[(c_blocks, B, 1)](*src.ptrs, src.stride_k, src.stride_b, src.stride_t, pad_arg,
                                                mean, mean, mean, rstd, B, T, C, rows_per_split, eps, FINAL=True,
                                                **common)
    else:
        part_mean = torch.empty(src.K, B, S, C, device=dev, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mean)
        part_n = torch.empty(B, S, device=dev, dtype=torch.float32)
        _instance_stats_kernel[(c_blocks, B, S)](*src.ptrs, src.stride_k, src.stride_b, src.stride_t, pad_arg,
                                                part_mean, part_m2, part_n, rstd, B, T, C, rows_per_split, eps,
                                                FINAL=False, **common)
        _instance_finalize_kernel[(c_blocks, B)](part_mean, part_m2, part_n, mean, rstd, B, C, S, eps, K=src.K,
                                                 BLOCK_C=BLOCK_C, num_warps=num_warps_for(BLOCK_C))
    _instance_apply_kernel[(c_blocks, B, cdiv(T, BLOCK_T))](
        *src.ptrs, src.stride_k, src.stride_b, src.stride_t, pad_arg, mean, rstd, out if pos is None else pos, out,
        out.stride(-2), B, T, C, clones, HAS_POS=pos is not None, **common)


def _run_token(src: _Layers, pad, idx, pos, out, layer: bool, final_layer: bool, eps: float,
               clones: int = 1) -> None:
    """Rows: the ``idx`` tokens (one output row each), or with ``pos`` every token ``(b, t)``
    written at the compact rows of its clones, or without either every row of ``out``."""
    n_rows = src.B * src.T if pos is not None else out.numel() // src.C
    BLOCK_C = next_pow2(src.C)
    BLOCK_R = max(1, min(4096 // BLOCK_C, next_pow2(n_rows)))
    grid = (cdiv(n_rows, BLOCK_R),)
    _targets_token_kernel[grid](*src.ptrs, src.stride_k, src.stride_b, src.stride_t,
                                out if pad is None else pad, out if idx is None else idx,
                                out if pos is None else pos, out, src.C, n_rows, src.T, src.C, clones, eps,
                                K=src.K, STACKED=src.stacked, LAYER=layer, FINAL_LAYER=final_layer,
                                HAS_PAD=pad is not None, HAS_IDX=idx is not None, HAS_POS=pos is not None,
                                BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps_for(BLOCK_R * BLOCK_C))


def _targets(layers: list[torch.Tensor], padding_mask: Optional[torch.Tensor], mask: Optional[torch.Tensor],
             layer_norm: str, final_norm: str, eps: float, count: int = -1) -> torch.Tensor:
    src = _Layers(layers[0] if len(layers) == 1 and layers[0].dim() == 4 else layers)
    B, T, C = src.B, src.T, src.C
    lnorm = None if layer_norm == "none" else layer_norm
    fnorm = None if final_norm == "none" else final_norm
    dev = src.ref.device
    check_device(_targets_time_kernel, src.ref)
    if padding_mask is not None and (tuple(padding_mask.shape) != (B, T) or padding_mask.dtype != torch.bool):
        raise ValueError(f"build_targets: padding_mask is {tuple(padding_mask.shape)} {padding_mask.dtype}, "
                         f"expected ({B}, {T}) torch.bool (one row per sample)")
    clones = 1
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"build_targets: mask is {mask.dtype}, expected torch.bool")
        clones = mask_clones((B, T, C), mask.shape, "build_targets")
    pad = None if padding_mask is None else padding_mask.contiguous().view(torch.uint8)
    time_axis = lnorm == "instance" or fnorm == "instance"
    if time_axis and T > MAX_T and not split_covers(lnorm, fnorm):  # the split method has no limit on T
        raise NotImplementedError(f"build_targets: instance norm over T={T} > {MAX_T} positions is not "
                                  f"implemented in d2v_fast/kernels/targets.py; use the torch path "
                                  f"(D2V_KERNELS=torch or d2v_fast.ops.set_kernels('torch'))")

    pos = idx = None
    time_writes = fnorm == "instance" or (lnorm == "instance" and fnorm is None)  # else the token kernel
    if mask is not None:
        m = mask.reshape(-1)
        if time_writes or clones > 1:
            # pos[(b*clones + c)*T + t]: compact row of clone c of sample b at t, or -1. The
            # kernel that writes walks the samples' tokens and stores each result once per clone.
            csum = torch.cumsum(m, 0, dtype=torch.int32)
            pos = positions_from_cumsum(csum, m)
            if count >= 0:  # known on the host (--train.host_counts): no sync
                n = count
                if m.numel():
                    torch._assert_async(csum[-1] == count, "build_targets: count differs from mask.sum()")
            else:
                n = int(csum[-1]) if m.numel() else 0  # rows to allocate: one sync, as y[mask]
        else:  # one clone, token kernel: one program row per masked token
            # nonzero() waits for the device to count; with the count known it need not
            idx = (selected_rows(m, count) if count >= 0 else m.nonzero().squeeze(1)).to(torch.int32)
            n = idx.numel()
        out = torch.empty(n, C, device=dev, dtype=torch.float32)
    else:
        out = torch.empty(B, T, C, device=dev, dtype=torch.float32)
    if out.numel() == 0:
        return out

    if lnorm in (None, "layer") and fnorm in (None, "layer"):
        _run_token(src, pad, idx, pos, out, lnorm == "layer", fnorm == "layer", eps, clones)
    elif lnorm in (None, "instance") and fnorm in (None, "instance"):
        _run_time(src, pad, pos, out, lnorm == "instance", fnorm == "instance", eps, clones)
    elif lnorm == "instance":  # final layer norm: instance-normalised mean first, then per row
        mid = torch.empty(B, T, C, device=dev, dtype=torch.float32)
        _run_time(src, pad, None, mid, True, False, eps)
        _run_token(_Layers([mid]), pad, idx, pos, out, False, True, eps, clones)
    else:  # per-layer layer norm, final instance norm
        mid = torch.empty(B, T, C, device=dev, dtype=torch.float32)
        _run_token(src, pad, None, None, mid, True, False, eps)
        _run_time(_Layers([mid]), pad, pos, out, True, False, eps, clones)
    return out


@torch.library.custom_op("d2v_fast::build_targets", mutates_args=())
def build_targets_op(layers: list[torch.Tensor], padding_mask: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                     layer_norm: str, final_norm: str, eps: float, count: int = -1) -> torch.Tensor:
    return _targets(layers, padding_mask, mask, layer_norm, final_norm, eps, count)


@build_targets_op.register_fake
def _(layers, padding_mask, mask, layer_norm, final_norm, eps, count=-1):
    x = layers[0]
    C = x.shape[-1]
    if mask is None:
        return x.new_empty(*x.shape[-3:], dtype=torch.float32)
    rows = count if count >= 0 else torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(rows, C, dtype=torch.float32)


def _norm_name(kind: Optional[str], what: str) -> str:
    if kind not in NORMS:
        raise ValueError(f"build_targets: {what}={kind!r}, expected one of {NORMS}")
    return "none" if kind is None else kind


def build_targets(layers: Sequence[torch.Tensor] | torch.Tensor, *, padding_mask: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None, layer_norm: Optional[str] = "instance",
                  final_norm: Optional[str] = None, eps: float = 1e-5, count: Optional[int] = None) -> torch.Tensor:
    """Fused data2vec targets; same contract as ``d2v_fast.kernels.eager.build_targets``."""
    layers = [layers] if isinstance(layers, torch.Tensor) else list(layers)
    args = (layers, padding_mask, mask, _norm_name(layer_norm, "layer_norm"), _norm_name(final_norm, "final_norm"),
            float(eps), -1 if count is None else int(count))
    with torch.no_grad():
        if direct(padding_mask, mask, *layers):  # no gradient flows: the launchers themselves
            return _targets(*args)
        return build_targets_op(*args)
