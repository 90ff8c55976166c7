"""Frame masks of the published speech recipes, made by the C++ extension in the loader
workers (``csrc/frame_masking.cpp``, GIL released), with bit-identical pure-Python twins
below for when the extension cannot be imported (or ``D2V_FAST_NO_EXT=1``). Masks are drawn
on the crop the loader made (the published 2.0 collater crops a mask drawn on the whole
utterance, after which rows may differ in count; ours mask the crop, so they never do).

data2vec (v1) (fairseq ``compute_mask_indices`` with static spans, ``min_masks=1``,
``require_same_masks=True``; ``base_librispeech.yaml`` ``mask_prob: 0.65, mask_length: 10``):
``span_masks``. Per row: ``u = uniform()``, ``num = max(min_masks, floor(mask_prob * T / span
+ u))`` span starts drawn without replacement from ``[0, room)`` by a partial Fisher-Yates
shuffle of ``range(room)``, with ``room = T - span``, or ``T - num - 1`` when that is
``<= num`` (fairseq's rule for short inputs); each start masks ``span`` frames (clipped at
``T``; overlaps allowed). Then every row with more masked frames than the batch's smallest
count drops a uniformly random subset of them (partial Fisher-Yates over its masked frames in
order, the row's stream continuing), so all rows mask the same number of frames. Overlaps and
the thinning leave 40-46% of the frames masked (measured at T = 250-999 frames for batches of
8-40 utterances; 37-43% for 304 at once; ``expected_mask_fraction`` in ``modalities/audio.py``).

data2vec 2.0 (fairseq ``compute_block_mask_1d``, as the published task's empty
``precompute_mask_config`` selects; ``base_audio_only_task.yaml`` ``mask_prob: 0.5,
mask_length: 5, mask_prob_adjust: 0.05``, ``inverse_mask: false``): ``block_masks``. Per clone
row: ``int(T * (mask_prob + mask_prob_adjust) / span)`` block centres drawn with replacement
(``bounded(T)`` each), each masking frames ``centre - span // 2 .. centre - span // 2 + span -
1`` (clamped to ``[0, T)``); then exactly ``int(T * mask_prob)`` masked frames: a row with more
unmasks a uniformly random subset of its masked frames, a row with fewer masks a uniformly
random subset of its visible ones (partial Fisher-Yates over those frames in order, the row's
stream continuing). A row depends on (seed, epoch, index, clone) and T only.

Rows draw from the per-row stream of every mask in ``csrc/`` (``d2v_fast.data.masking``:
splitmix64 keyed by ``(kind, seed, epoch, index, clone)``, ``uniform()`` 53-bit,
``bounded(r)`` multiply-high), each family with its own kind.
"""
from __future__ import annotations

import math

import torch

from ..masking import _as_u64, _block_rows, extension_with, _partial_shuffle, _row_key, _RowRng

__all__ = ["span_masks", "block_masks", "V1_AUDIO", "V2_AUDIO"]

V1_AUDIO = dict(mask_prob=0.65, span=10)
V2_AUDIO = dict(mask_prob=0.5, span=5, mask_prob_adjust=0.05)

_FRAME_KIND = 0x4652414D  # "FRAM"
_FRAME_BLOCK_KIND = 0x46424C4B  # "FBLK"

_C = extension_with("frame_block_mask", "speech")


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


def block_masks(num_frames: int, indices: torch.Tensor, *, mask_prob: float, span: int, mask_prob_adjust: float,
                seed: int, epoch: int, clones: int = 1) -> torch.Tensor:
    """bool ``[B * clones, T]`` (clones of a sample adjacent), exactly ``int(mask_prob * T)``
    masked frames in every row.

    Raises ValueError (naming the fix) for arguments no mask can be made of."""
    if not 0.0 <= mask_prob < 1.0:
        raise ValueError(f"mask_prob {mask_prob}: must be in [0, 1)")
    if not 0.0 <= mask_prob_adjust <= 1.0:
        raise ValueError(f"mask_prob_adjust {mask_prob_adjust}: must be in [0, 1]")
    if span < 1 or clones < 1:
        raise ValueError(f"span {span} and clones {clones} must be at least 1")
    T = int(num_frames)
    if T <= span:
        raise ValueError(f"{T} frames: a crop must have more frames than a mask block ({span}); use longer crops")
    indices = torch.as_tensor(indices).to(torch.int64).contiguous()
    seed, epoch = _as_u64("seed", seed), _as_u64("epoch", epoch)
    args = (T, float(mask_prob), int(span), float(mask_prob_adjust), seed, epoch, indices, int(clones))
    return _C.frame_block_mask(*args) if _C is not None else _frame_block_mask_python(*args)


def _frame_block_mask_python(T, mask_prob, span, adjust, seed, epoch, indices, clones) -> torch.Tensor:
    offset = span // 2

    def stamp(row, centre):
        for k in range(span):
            row[min(max(centre + k - offset, 0), T - 1)] = True

    return _block_rows(_FRAME_BLOCK_KIND, seed, epoch, indices, clones, T, int(T * ((mask_prob + adjust) / span)),
                       int(T * mask_prob), stamp)
