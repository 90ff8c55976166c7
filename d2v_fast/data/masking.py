"""The keyed per-row random stream every modality's masks draw from (text, speech, images;
``csrc/`` has the same in C++); the C++ extension ``d2v_fast._C`` it uses is loaded by
``d2v_fast.extension``.

All arithmetic is on uint64.

- ``mix`` is the splitmix64 finaliser. A row's key is
  ``mix(mix(mix(mix(seed ^ KIND) ^ epoch) ^ index) ^ clone)``, with ``KIND`` separating
  one kind of mask from another. The key seeds a splitmix64 stream.
- ``uniform()`` is 53 bits of the next draw scaled to [0, 1); ``bounded(r)`` is the high
  64 bits of ``next() * r`` (in [0, r)).
- A partial Fisher-Yates shuffle of ``range(L)`` picks ``n`` distinct entries.

A row's mask depends only on (seed, epoch, index[, clone]) and its maskable pattern: not
on the batch it is in, its place in that batch or the thread count.
"""
from __future__ import annotations

import operator

from .. import extension

_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
_C = extension.C


def extension_with(function: str, what: str):
    """``d2v_fast._C`` if it has ``function``, else None with one RuntimeWarning: an extension
    built from an older checkout; ``what`` masks then fall back to their Python twin."""
    return extension.with_function(_C, function, f"{what} masking falls back to pure Python (identical masks, slower)",
                                   stacklevel=4)


# ---------------------------------------------------------------------------------------
# Validation: one-line errors naming the argument, the value and the fix.
# ---------------------------------------------------------------------------------------


def _as_u64(name: str, value) -> int:
    try:
        return operator.index(value) & _M64
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


# ---------------------------------------------------------------------------------------
# Pure-Python twin of csrc/masking.cpp (bit-identical; plain ints, no numpy RNG).
# ---------------------------------------------------------------------------------------


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _row_key(kind: int, seed: int, epoch: int, index: int, clone: int) -> int:
    k = _mix((seed & _M64) ^ kind)
    k = _mix(k ^ (epoch & _M64))
    k = _mix(k ^ (index & _M64))
    return _mix(k ^ (clone & _M64))


class _RowRng:
    __slots__ = ("s",)

    def __init__(self, key: int):
        self.s = key

    def next(self) -> int:
        self.s = (self.s + _GOLDEN) & _M64
        return _mix(self.s)

    def uniform(self) -> float:
        return (self.next() >> 11) * 2.0**-53

    def bounded(self, r: int) -> int:
        return (self.next() * r) >> 64


def _partial_shuffle(rng: _RowRng, L: int, n: int) -> list[int]:
    perm = list(range(L))
    for i in range(n):
        j = i + rng.bounded(L - i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm[:n]


def _set_count(rng: _RowRng, cells: list[bool], target: int) -> None:
    """Flips uniformly random cells until exactly ``target`` are True: a partial Fisher-Yates
    shuffle over the cells to flip, in index order (``flip_random`` in ``csrc/row_rng.h``)."""
    n = sum(cells)
    if n != target:
        flip_from = n > target
        pos = [t for t, v in enumerate(cells) if v == flip_from]
        for i in _partial_shuffle(rng, len(pos), abs(n - target)):
            cells[pos[i]] = not flip_from


def _block_rows(kind: int, seed: int, epoch: int, indices, clones: int, cells: int, centres: int, target: int,
                stamp, *, invert: bool = False):
    """The Python twin's loop of the block masks (speech 2.0's frame blocks, the images' inverse
    blocks): per (index, clone) row, ``centres`` draws of ``bounded(cells)``, each handed to
    ``stamp(row, centre)``, then exactly ``target`` cells set (``_set_count``); ``invert``
    returns the complement of every row. ``[len(indices) * clones, cells]`` bool."""
    import torch

    rows = []
    for index in indices.tolist():
        for c in range(clones):
            rng = _RowRng(_row_key(kind, seed, epoch, index, c))
            row = [False] * cells
            for _ in range(centres):
                stamp(row, rng.bounded(cells))
            _set_count(rng, row, target)
            rows.append([not v for v in row] if invert else row)
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), cells)
