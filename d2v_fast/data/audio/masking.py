"""Frame masks of the published speech recipes, made by the C++ extension in the loader
workers (``csrc/frame_masking.cpp``, GIL released), with a bit-identical pure-Python twin
below for when the extension cannot be imported (or ``D2V_FAST_NO_EXT=1``).

Both data2vec audio recipes draw masks the same way (fairseq ``compute_mask_indices`` with
static spans, ``min_masks=1``, ``require_same_masks=True``, ``add_masks=False``), with
different numbers:

- data2vec (v1): ``mask_prob=0.65, span=10`` -> ~49% of frames masked, ``masked_spec_embed``;
- data2vec 2.0: ``mask_prob=0.5, span=5`` per clone, 8 clones -> ~40% masked (the 2.0 paper says
  "exactly int(0.5 T)"; the published config's ``compute_mask_indices`` lets spans overlap
  and adds none back, so fewer are masked; we follow the published code).

Rows draw from the per-row stream of every mask in ``csrc/`` (``d2v_fast.data.masking``:
splitmix64 keyed by ``(kind, seed, epoch, index, clone)``, ``uniform()`` 53-bit,
``bounded(r)`` multiply-high), with their own kind. Per row: ``u = uniform()``,
``num = max(min_masks, floor(mask_prob * T / span + u))`` span starts drawn without
replacement from ``[0, room)`` by a partial Fisher-Yates shuffle of ``range(room)``, with
``room = T - span``, or ``T - num - 1`` when that is ``<= num`` (fairseq's rule for short
inputs); each start masks ``span`` frames (clipped at ``T``; overlaps allowed). Then every
row with more masked frames than the batch's smallest count drops a uniformly random subset
of them (partial Fisher-Yates over its masked frames in order, the row's stream continuing),
so all rows mask the same number of frames (the 2.0 student drops masked frames and needs
equal lengths; v1 keeps the same count so its loss weights rows equally). A row's spans
depend on (seed, epoch, sample index, clone) only; the thinning on the batch's smallest
count too, as published.
"""
from __future__ import annotations

import math

import torch

from ..masking import _as_u64, extension_with, _partial_shuffle, _row_key, _RowRng

__all__ = ["span_masks", "V1_AUDIO", "V2_AUDIO"]

V1_AUDIO = dict(mask_prob=0.65, span=10)
V2_AUDIO = dict(mask_prob=0.5, span=5)

_FRAME_KIND = 0x4652414D  # "FRAM"

_C = extension_with("frame_span_mask", "speech")


def _most_spans(T: int, mask_prob: float, span: int, min_masks: int) -> int:
    """The largest ``num`` any row can draw: ``floor(x + u)`` with ``u`` in [0, 1) is at
    most ``ceil(x)`` (``x`` itself when it is a whole number)."""
    return max(min_masks, math.ceil((mask_prob * T) / span))


def _fits(T: int, num: int, span: int) -> bool:
    room = T - span
    if room <= num:
        room = T - num - 1
    return room >= num and room > 0


def span_masks(num_frames: int, indices: torch.Tensor, *, mask_prob: float, span: int, seed: int,
               epoch: int, clones: int = 1, min_masks: int = 1) -> torch.Tensor:
    """bool ``[B * clones, T]`` (clones of a sample adjacent), the same count in every row.

    Raises ValueError (naming the fix) when ``num_frames`` cannot hold the spans or every
    frame would be masked."""
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob {mask_prob}: must be in [0, 1]")
    if span < 1 or clones < 1 or min_masks < 0:
        raise ValueError(f"span {span} and clones {clones} must be at least 1, min_masks {min_masks} at least 0")
    T = int(num_frames)
    if T <= span:  # one span could cover the whole crop
        raise ValueError(f"{T} frames: a crop must have more frames than a mask span ({span}); use longer crops")
    most = _most_spans(T, mask_prob, span, min_masks)
    if not all(_fits(T, n, span) for n in range(min(min_masks, most), most + 1)):
        raise ValueError(f"{T} frames cannot hold {most} mask spans of {span}; use longer crops")
    indices = torch.as_tensor(indices).to(torch.int64).contiguous()
    seed, epoch = _as_u64("seed", seed), _as_u64("epoch", epoch)
    if _C is not None:
        out = _C.frame_span_mask(T, float(mask_prob), int(span), int(min_masks), seed, epoch, indices, int(clones))
    else:
        out = _frame_span_mask_python(T, float(mask_prob), int(span), int(min_masks), seed, epoch, indices,
                                      int(clones))
    if len(out) and bool(out[0].all()):
        raise ValueError(f"every one of the {T} frames would be masked; use longer crops or a lower mask_prob")
    return out


def _frame_span_mask_python(T, mask_prob, span, min_masks, seed, epoch, indices, clones) -> torch.Tensor:
    rows, rngs = [], []
    for index in indices.tolist():
        for c in range(clones):
            rng = _RowRng(_row_key(_FRAME_KIND, seed, epoch, index, c))
            u = rng.uniform()
            num = max(min_masks, math.floor((mask_prob * T) / span + u))
            room = T - span
            if room <= num:
                room = T - num - 1
            row = [False] * T
            for start in _partial_shuffle(rng, room, num):
                for t in range(start, min(start + span, T)):
                    row[t] = True
            rows.append(row)
            rngs.append(rng)
    if not rows:
        return torch.zeros(0, T, dtype=torch.bool)
    target = min(sum(r) for r in rows)
    for row, rng in zip(rows, rngs):
        count = sum(row)
        if count > target:
            masked = [t for t in range(T) if row[t]]
            for i in _partial_shuffle(rng, count, count - target):
                row[masked[i]] = False
    return torch.tensor(rows, dtype=torch.bool)
