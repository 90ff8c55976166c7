"""Frame masks of the published speech recipes, in NumPy (the reference the C++ extension's
speech masks will be checked against; fast enough for CPU runs).

Both data2vec audio recipes draw masks the same way (fairseq ``compute_mask_indices`` with
static spans, ``min_masks=1``, ``require_same_masks=True``), with different numbers:

- data2vec (v1): ``mask_prob=0.65, span=10`` -> ~49% of frames masked, ``masked_spec_embed``;
- data2vec 2.0: ``mask_prob=0.5, span=5`` per clone, 8 clones -> ~40% masked.

Per row: ``max(1, int(mask_prob * T / span + U(0, 1)))`` span starts drawn without
replacement from ``[0, T - span)``, each masking ``span`` frames (spans may overlap, so
fewer frames are masked than ``mask_prob * T``); then every row of the batch is thinned at
random to the batch's smallest count, so all rows mask the same number of frames (the 2.0
student drops masked frames and needs equal lengths; v1 keeps the same count so its loss
weights rows equally). Each row's draws come from (seed, epoch, sample index, clone) only;
the thinning depends on the batch's smallest count, as published.
"""
from __future__ import annotations

import numpy as np
import torch

V1_AUDIO = dict(mask_prob=0.65, span=10)
V2_AUDIO = dict(mask_prob=0.5, span=5)


def _row_spans(rng: np.random.Generator, T: int, mask_prob: float, span: int, min_masks: int) -> np.ndarray:
    num = max(min_masks, int(mask_prob * T / span + rng.random()))
    room = T - span
    if room <= num:  # short input: fairseq lets starts run closer to the end, keeping one frame free
        room = T - num - 1
    if room < num or room <= 0:
        raise ValueError(f"{T} frames cannot hold {num} mask spans of {span}; use longer crops")
    starts = rng.choice(room, num, replace=False)
    idx = (starts[:, None] + np.arange(span)[None, :]).ravel()
    return np.unique(idx[idx < T])


def span_masks(num_frames: int, indices: torch.Tensor | np.ndarray, *, mask_prob: float, span: int, seed: int,
               epoch: int, clones: int = 1, min_masks: int = 1) -> torch.Tensor:
    """bool ``[B * clones, T]`` (clones of a sample adjacent), the same count in every row."""
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob {mask_prob}: must be in [0, 1]")
    if span < 1 or clones < 1:
        raise ValueError(f"span {span} and clones {clones} must be at least 1")
    T = int(num_frames)
    ids = np.asarray(indices, dtype=np.int64).tolist()
    rows, rngs = [], []
    for index in ids:
        for clone in range(clones):
            rng = np.random.default_rng([int(seed) & 0xFFFF_FFFF, int(epoch), int(index), clone, 0xA0D10])
            rows.append(_row_spans(rng, T, mask_prob, span, min_masks))
            rngs.append(rng)
    out = np.zeros((len(rows), T), dtype=bool)
    if not rows:
        return torch.from_numpy(out)
    target = min(len(r) for r in rows)
    if target >= T:
        raise ValueError(f"every one of the {T} frames would be masked; use longer crops or a lower mask_prob")
    for i, (r, rng) in enumerate(zip(rows, rngs)):
        if len(r) > target:
            r = rng.choice(r, target, replace=False)
        out[i, r] = True
    return torch.from_numpy(out)
