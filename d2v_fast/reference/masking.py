"""Eager NumPy masking: the baseline that benchmarks/test_masking.py compares
d2v_fast.data.text.masking against, and a distribution oracle for tests. Not used by the engine.

Written the plain way public data2vec / wav2vec reference code masks: a Python loop over
rows with a per-row NumPy generator, ``rng.choice`` for the span starts, Python lists to
expand spans, ``np.unique``, then a write into a NumPy array. Same signatures and the same
distribution as d2v_fast.data.text.masking, but a different RNG, so masks differ bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["span_mask", "random_mask"]

_M64 = 0xFFFFFFFFFFFFFFFF


def span_mask(maskable, *, mask_prob, span, seed, epoch, indices) -> torch.Tensor:
    maskable_np = maskable.cpu().numpy()
    B, T = maskable_np.shape
    out = np.zeros((B, T), dtype=bool)
    for b, index in enumerate(indices.tolist()):
        pos = np.flatnonzero(maskable_np[b])
        L = len(pos)
        rng = np.random.default_rng((seed & _M64, epoch & _M64, index & _M64))
        num = min(int(mask_prob * L / span + rng.random()), L)
        if num == 0:
            continue
        starts = rng.choice(L, num, replace=False)
        covered = []
        for s in starts:
            covered.extend(range(s, s + span))
        covered = np.unique(np.asarray(covered))
        covered = covered[covered < L]
        out[b, pos[covered]] = True
    return torch.from_numpy(out)


def random_mask(maskable, *, mask_prob, seed, epoch, indices, clones=1) -> torch.Tensor:
    maskable_np = maskable.cpu().numpy()
    B, T = maskable_np.shape
    out = np.zeros((B * clones, T), dtype=bool)
    for b, index in enumerate(indices.tolist()):
        pos = np.flatnonzero(maskable_np[b])
        L = len(pos)
        num = int(L * mask_prob)
        for c in range(clones):
            rng = np.random.default_rng((seed & _M64, epoch & _M64, index & _M64, c))
            chosen = rng.permutation(L)[:num]
            out[b * clones + c, pos[chosen]] = True
    return torch.from_numpy(out)
