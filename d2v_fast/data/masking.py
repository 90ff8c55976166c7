"""Masks for pretraining: span masking (data2vec v1, SPEC §1a) and random clone masks
(data2vec 2.0, SPEC §1b).

Both functions mask a whole batch in one call to the C++ extension ``d2v_fast._C``
(``csrc/masking.cpp``), split over threads by rows with the GIL released. When the
extension cannot be imported, a pure-Python twin below produces bit-identical masks, so
a run's masks never depend on whether the build worked; it is only slower (it warns once).
Set ``D2V_FAST_NO_EXT=1`` to force the pure-Python path.

The algorithm, shared bit for bit by both paths. All arithmetic is on uint64.

- ``mix`` is the splitmix64 finaliser. A row's key is
  ``mix(mix(mix(mix(seed ^ KIND) ^ epoch) ^ index) ^ clone)``, with ``KIND`` separating
  span masks from random masks. The key seeds a splitmix64 stream.
- ``uniform()`` is 53 bits of the next draw scaled to [0, 1); ``bounded(r)`` is the high
  64 bits of ``next() * r`` (in [0, r)).
- Per row, ``p`` lists the maskable positions in order and ``L = len(p)``. A partial
  Fisher-Yates shuffle of ``range(L)`` picks ``n`` distinct entries.
- span_mask: ``u = uniform()`` (always drawn first), ``n = floor(mask_prob * L / span + u)``
  starts, each masking ``span`` consecutive *maskable* positions (overlaps allowed,
  clipped at the end of ``p``). Expected masked fraction ~0.30 for 0.35 / 4 (overlaps).
- random_mask: per clone, exactly ``n = int(L * mask_prob)`` positions of ``p``.

A row's mask depends only on (seed, epoch, index[, clone]) and its maskable pattern: not
on the batch it is in, its place in that batch or the thread count.
"""
from __future__ import annotations

import importlib
import math
import operator
import os
import warnings

import torch

__all__ = ["span_mask", "random_mask"]

_M64 = 0xFFFFFFFFFFFFFFFF
_SPAN_KIND = 0x5350414E  # "SPAN"
_RANDOM_KIND = 0x52414E44  # "RAND"
_GOLDEN = 0x9E3779B97F4A7C15
_NO_EXT_ENV = "D2V_FAST_NO_EXT"


def _load_extension():
    """Returns the ``d2v_fast._C`` module, or None (with one RuntimeWarning) if it fails."""
    if os.environ.get(_NO_EXT_ENV, "0") == "1":
        return None
    try:
        return importlib.import_module("d2v_fast._C")
    except ImportError as exc:
        warnings.warn(
            f"d2v_fast._C could not be imported ({exc}); masking falls back to pure Python "
            "(identical masks, ~300-500x slower). Fix: build the extension with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`), "
            f"or set {_NO_EXT_ENV}=1 to use the fallback without this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


_C = _load_extension()


def extension_with(function: str, what: str):
    """``d2v_fast._C`` if it has ``function``, else None with one RuntimeWarning: an extension
    built from an older checkout; ``what`` masks then fall back to their Python twin."""
    if _C is None or hasattr(_C, function):
        return _C
    warnings.warn(f"d2v_fast._C has no {what} masks (built from an older checkout); {what} masking falls back to "
                  "pure Python (identical masks, slower). Fix: rebuild with `pip install --no-build-isolation -e .`",
                  RuntimeWarning, stacklevel=3)
    return None


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def span_mask(
    maskable: torch.Tensor,
    *,
    mask_prob: float,
    span: int,
    seed: int,
    epoch: int,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Span mask of a batch (data2vec v1 text: ``mask_prob=0.35, span=4``).

    Args:
        maskable: bool [B, T], CPU; True where a position may be masked (special tokens
            and padding False). Non-maskable positions are never masked.
        mask_prob: in [0, 1]; ``floor(mask_prob * L / span + U(0, 1))`` span starts are
            drawn without replacement among a row's L maskable positions.
        span: >= 1, maskable positions covered by each span.
        seed, epoch: ints; with ``indices`` they fully determine each row's mask.
        indices: integer [B], the samples' dataset indices.

    Returns:
        bool [B, T], True at masked positions.
    """
    maskable, indices = _check_batch(maskable, indices)
    mask_prob = _check_mask_prob(mask_prob)
    span = _check_count("span", span, "the number of maskable positions each span covers")
    seed, epoch = _as_u64("seed", seed), _as_u64("epoch", epoch)
    if _C is not None:
        return _C.span_mask(maskable, mask_prob, span, seed, epoch, indices)
    return _span_mask_python(maskable, mask_prob, span, seed, epoch, indices)


def random_mask(
    maskable: torch.Tensor,
    *,
    mask_prob: float,
    seed: int,
    epoch: int,
    indices: torch.Tensor,
    clones: int = 1,
) -> torch.Tensor:
    """Random (MAE-style) masks with ``clones`` independent masks per sample (data2vec 2.0
    text: ``mask_prob=0.48, clones=8``).

    Each clone masks exactly ``int(L * mask_prob)`` of a row's L maskable positions.

    Returns:
        bool [B * clones, T]; row ``b * clones + c`` is clone c of sample b (clones of a
        sample are adjacent, matching ``x.repeat_interleave(clones, 0)``).
    """
    maskable, indices = _check_batch(maskable, indices)
    mask_prob = _check_mask_prob(mask_prob)
    clones = _check_count("clones", clones, "the number of masks per sample")
    seed, epoch = _as_u64("seed", seed), _as_u64("epoch", epoch)
    if _C is not None:
        return _C.random_mask(maskable, mask_prob, seed, epoch, indices, clones)
    return _random_mask_python(maskable, mask_prob, seed, epoch, indices, clones)


# ---------------------------------------------------------------------------------------
# Validation: one-line errors naming the argument, the value and the fix.
# ---------------------------------------------------------------------------------------


def _check_batch(maskable, indices) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(maskable, torch.Tensor):
        raise ValueError(f"maskable must be a torch.Tensor of dtype bool, got {type(maskable).__name__}")
    if maskable.dim() != 2 or maskable.dtype != torch.bool:
        raise ValueError(
            f"maskable must be a 2-D bool tensor [B, T], got dtype {maskable.dtype} with shape "
            f"{tuple(maskable.shape)}: pass e.g. `(ids != pad_id) & ~special`"
        )
    if maskable.device.type != "cpu":
        raise ValueError(
            f"maskable is on {maskable.device}, masks are built on the CPU: pass maskable.cpu()"
        )
    if not isinstance(indices, torch.Tensor):
        raise ValueError(
            f"indices must be an integer torch.Tensor [B], got {type(indices).__name__}: "
            "pass torch.as_tensor(indices)"
        )
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(
            f"indices must be a 1-D integer tensor [B] of dataset indices, got dtype {indices.dtype} "
            f"with shape {tuple(indices.shape)}"
        )
    if indices.shape[0] != maskable.shape[0]:
        raise ValueError(
            f"indices has length {indices.shape[0]} but maskable has batch size {maskable.shape[0]}: "
            "pass one dataset index per row"
        )
    if indices.device.type != "cpu":
        raise ValueError(f"indices is on {indices.device}, masks are built on the CPU: pass indices.cpu()")
    return maskable.contiguous(), indices.to(torch.int64).contiguous()


def _check_mask_prob(mask_prob) -> float:
    try:
        value = float(mask_prob)
    except (TypeError, ValueError):
        raise ValueError(f"mask_prob must be a float in [0, 1], got {mask_prob!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob!r} (e.g. 0.35 for span masking)")
    return value


def _check_count(name: str, value, what: str) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= 1 ({what}), got {value!r}") from None
    if count < 1:
        raise ValueError(f"{name} must be >= 1 ({what}), got {count}")
    return count


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


def _span_mask_python(maskable, mask_prob, span, seed, epoch, indices) -> torch.Tensor:
    B, T = maskable.shape
    rows = maskable.tolist()
    out = [[False] * T for _ in range(B)]
    for b, index in enumerate(indices.tolist()):
        pos = [t for t, ok in enumerate(rows[b]) if ok]
        L = len(pos)
        rng = _RowRng(_row_key(_SPAN_KIND, seed, epoch, index, 0))
        u = rng.uniform()
        n = min(math.floor((mask_prob * L) / span + u), L)
        row_out = out[b]
        for start in _partial_shuffle(rng, L, n):
            for k in range(start, min(start + span, L)):
                row_out[pos[k]] = True
    return torch.tensor(out, dtype=torch.bool).reshape(B, T)


def _random_mask_python(maskable, mask_prob, seed, epoch, indices, clones) -> torch.Tensor:
    B, T = maskable.shape
    rows = maskable.tolist()
    out = [[False] * T for _ in range(B * clones)]
    for b, index in enumerate(indices.tolist()):
        pos = [t for t, ok in enumerate(rows[b]) if ok]
        L = len(pos)
        n = min(int(L * mask_prob), L)
        for c in range(clones):
            rng = _RowRng(_row_key(_RANDOM_KIND, seed, epoch, index, c))
            row_out = out[b * clones + c]
            for i in _partial_shuffle(rng, L, n):
                row_out[pos[i]] = True
    return torch.tensor(out, dtype=torch.bool).reshape(B * clones, T)
