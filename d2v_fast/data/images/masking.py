"""Patch masks for images (docs/images.md): BEiT block masking (data2vec v1) and inverse block
masking (data2vec 2.0).

Both fill a whole batch in one call to the C++ extension ``d2v_fast._C``
(``csrc/image_masking.cpp``, GIL released). When the extension cannot be imported (or
``D2V_FAST_NO_EXT=1``), the pure-Python twin below gives bit-identical masks. Rows are
keyed like the text masks (``d2v_fast.data.masking``: splitmix64 stream from
``(kind, seed, epoch, index, clone)``, ``uniform()`` 53-bit, ``bounded(r)`` multiply-high),
with their own kinds, so a mask depends only on (seed, epoch, index[, clone]) and the
arguments: not on the batch, the worker or the thread.

block_mask (BEiT ``MaskingGenerator``, as used by data2vec_vision ``beit/``): blocks are
added until ``num_masked`` patches are masked or no block fits. Each block: up to 10 tries
of ``area = min_block + (budget - min_block) * uniform()`` (budget = patches still to
mask, at most ``max_block``), ``aspect = exp(log(min_aspect) + (log(max_aspect) -
log(min_aspect)) * uniform())``, ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area /
aspect))`` (ties to even, as Python's round), kept only if ``h < height`` and ``w < width``;
``top = bounded(height - h + 1)``, ``left = bounded(width - w + 1)``; accepted when it adds
between 1 and budget new patches. Counts vary a little per row (BEiT does not equalise
them; the v1 loss runs over each row's masked patches). On 14 x 14 with 120 / 16 / 0.3 the
mean is ~118 masked patches.

inverse_block_mask (fairseq ``compute_block_mask_2d`` with ``inverse_mask``): the blocks
are what stays *visible*. ``keep = 1 - mask_prob``; ``int(L * ((keep + adjust) / block**2))``
centres drawn with ``bounded(L)`` (repeats allowed), each making the ``block x block``
square around it visible (coordinates clamped at the border, offset ``block // 2``); then
exactly ``int(L * keep)`` visible patches: extra visible ones are hidden or missing ones
revealed, picked uniformly by a partial Fisher-Yates shuffle of those positions in index
order. Every clone of every sample masks the same count (2.0 drops masked patches).

``exp``/``log``/``sqrt`` are the C library's on both paths (CPython's ``math`` calls libm);
``sqrt`` is exact, and the shared libm gives identical ``exp``/``log`` in one process.
"""
from __future__ import annotations

import math
import operator

import torch

from ..masking import _as_u64, _block_rows, extension_with, _row_key, _RowRng

__all__ = ["block_mask", "inverse_block_mask", "BEIT_BLOCK", "DATA2VEC2_INVERSE_BLOCK"]

_BLOCK_KIND = 0x42454954  # "BEIT"
_INVERSE_KIND = 0x49424C4B  # "IBLK"

# The published settings (docs/images.md), at 224 / 16 = 14 x 14 patches.
BEIT_BLOCK = dict(num_masked=120, min_block=16, max_block=None, min_aspect=0.3, max_aspect=None)
DATA2VEC2_INVERSE_BLOCK = dict(mask_prob=0.8, block=3, mask_prob_adjust=0.07, clones=16)

_C = extension_with("inverse_block_mask", "image")


def block_mask(grid: tuple[int, int], *, num_masked: int, seed: int, epoch: int, indices: torch.Tensor,
               min_block: int = 16, max_block: int | None = None, min_aspect: float = 0.3,
               max_aspect: float | None = None) -> torch.Tensor:
    """BEiT block masks of a batch: bool [B, height * width] (row-major patches), True = masked.

    ``max_block`` defaults to ``num_masked`` (at least ``min_block``); ``max_aspect`` to ``1 / min_aspect``."""
    height, width = _check_grid(grid)
    indices = _check_indices(indices)
    num_masked = _check_int("num_masked", num_masked, 0, height * width, "patches to mask per image")
    min_block = _check_int("min_block", min_block, 1, None, "the smallest block, in patches")
    if max_block is None:
        max_block = max(num_masked, min_block)
    max_block = _check_int("max_block", max_block, min_block, None, "the largest block, in patches; >= min_block")
    min_aspect = _check_float("min_aspect", min_aspect, "e.g. 0.3")
    max_aspect = 1.0 / min_aspect if max_aspect is None else _check_float("max_aspect", max_aspect, "e.g. 3.33")
    if max_aspect < min_aspect:
        raise ValueError(f"max_aspect {max_aspect} is below min_aspect {min_aspect}")
    seed, epoch = _as_u64("seed", seed), _as_u64("epoch", epoch)
    if _C is not None:
        return _C.block_mask(height, width, num_masked, min_block, max_block, min_aspect, max_aspect,
                             seed, epoch, indices)
    return _block_mask_python(height, width, num_masked, min_block, max_block, min_aspect, max_aspect,
                              seed, epoch, indices)


def inverse_block_mask(grid: tuple[int, int], *, mask_prob: float, seed: int, epoch: int, indices: torch.Tensor,
                       block: int = 3, mask_prob_adjust: float = 0.07, clones: int = 1) -> torch.Tensor:
    """data2vec 2.0 masks: bool [B * clones, height * width], True = masked; row
    ``b * clones + c`` is clone c of sample b. Each row masks exactly
    ``L - int(L * (1 - mask_prob))`` patches (157 of 196 at 0.8)."""
    height, width = _check_grid(grid)
    indices = _check_indices(indices)
    mask_prob = _check_float("mask_prob", mask_prob, "e.g. 0.8", upper=1.0, allow_zero=True)
    block = _check_int("block", block, 1, None, "the side of a visible block, in patches")
    mask_prob_adjust = float(mask_prob_adjust)
    if not -1.0 <= mask_prob_adjust <= 1.0:
        raise ValueError(f"mask_prob_adjust must be in [-1, 1], got {mask_prob_adjust!r} (published: 0.07)")
    clones = _check_int("clones", clones, 1, None, "masks per image")
    seed, epoch = _as_u64("seed", seed), _as_u64("epoch", epoch)
    if _C is not None:
        return _C.inverse_block_mask(height, width, mask_prob, block, mask_prob_adjust, seed, epoch, indices, clones)
    return _inverse_block_mask_python(height, width, mask_prob, block, mask_prob_adjust, seed, epoch, indices, clones)


# ------------------------------------------------------------------------------ validation
def _check_grid(grid) -> tuple[int, int]:
    try:
        height, width = (operator.index(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (height, width) in patches, got {grid!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"grid {grid!r}: both sides must be >= 1 patch")
    return height, width


def _check_indices(indices) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be a 1-D integer torch.Tensor of dataset indices, got {indices!r}")
    if indices.device.type != "cpu":
        raise ValueError(f"indices is on {indices.device}, masks are built on the CPU: pass indices.cpu()")
    return indices.to(torch.int64).contiguous()


def _check_int(name, value, lo, hi, what) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int ({what}), got {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bounds} ({what}), got {v}")
    return v


def _check_float(name, value, example, upper=None, allow_zero=False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number ({example}), got {value!r}") from None
    ok = (v >= 0 if allow_zero else v > 0) and (upper is None or v <= upper) and math.isfinite(v)
    if not ok:
        raise ValueError(f"{name} out of range ({example}), got {value!r}")
    return v


# ------------------------------------------------------------- pure-Python twin (bit-identical)
def _block_mask_python(height, width, num_masked, min_block, max_block, min_aspect, max_aspect,
                       seed, epoch, indices) -> torch.Tensor:
    L = height * width
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    rows = []
    for index in indices.tolist():
        rng = _RowRng(_row_key(_BLOCK_KIND, seed, epoch, index, 0))
        cells = [False] * L
        count = 0
        while count < num_masked:
            budget = min(num_masked - count, max_block)
            added = 0
            for _ in range(10):
                area = min_block + (budget - min_block) * rng.uniform()
                aspect = math.exp(log_lo + (log_hi - log_lo) * rng.uniform())
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if w >= width or h >= height:
                    continue
                top, left = rng.bounded(height - h + 1), rng.bounded(width - w + 1)
                box = [y * width + x for y in range(top, top + h) for x in range(left, left + w)]
                fresh = sum(not cells[t] for t in box)
                if 0 < fresh <= budget:
                    for t in box:
                        cells[t] = True
                    added = fresh
                    break
            if added == 0:
                break
            count += added
        rows.append(cells)
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), L)


def _inverse_block_mask_python(height, width, mask_prob, block, adjust, seed, epoch, indices, clones):
    L = height * width
    keep = 1.0 - mask_prob
    offset = block // 2

    def stamp(visible, centre):
        cy, cx = divmod(centre, width)
        for dy in range(block):
            y = min(max(cy + dy - offset, 0), height - 1)
            for dx in range(block):
                visible[y * width + min(max(cx + dx - offset, 0), width - 1)] = True

    return _block_rows(_INVERSE_KIND, seed, epoch, indices, clones, L, max(0, int(L * ((keep + adjust) / (block * block)))),
                       int(L * keep), stamp, invert=True)
