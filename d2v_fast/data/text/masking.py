"""Masks for text: span masking (data2vec v1, fairseq config/text/pretraining/base.yaml) and
random clone masks (data2vec 2.0, config/v2/base_text_only_task.yaml).

Both functions mask a whole batch in one call to the C++ extension ``d2v_fast._C``
(``csrc/masking.cpp``), split over threads by rows with the GIL released. When the
extension cannot be imported, a pure-Python twin below produces bit-identical masks, so
a run's masks never depend on whether the build worked; it is only slower (it warns once).
Set ``D2V_FAST_NO_EXT=1`` to force the pure-Python path. Each row draws from the keyed
stream of ``d2v_fast/data/masking.py``:

- Per row, ``p`` lists the maskable positions in order and ``L = len(p)``. A partial
  Fisher-Yates shuffle of ``range(L)`` picks ``n`` distinct entries.
- span_mask: ``u = uniform()`` (always drawn first), ``n = floor(mask_prob * L / span + u)``
  starts, each masking ``span`` consecutive *maskable* positions (overlaps allowed,
  clipped at the end of ``p``). Expected masked fraction ~0.30 for 0.35 / 4 (overlaps).
- random_mask: per clone, exactly ``n = int(L * mask_prob)`` positions of ``p``.
"""
from __future__ import annotations

import math
import operator

import torch

from ..masking import _as_u64, _partial_shuffle, _row_key, _RowRng, extension_with

__all__ = ["span_mask", "random_mask"]

_SPAN_KIND = 0x5350414E  # "SPAN"
_RANDOM_KIND = 0x52414E44  # "RAND"
_C = extension_with("random_mask", "text")


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
    maskable, indices, mask_prob, span, seed, epoch = _checked(
        maskable, indices, mask_prob, ("span", span, "the number of maskable positions each span covers"), seed, epoch)
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
    maskable, indices, mask_prob, clones, seed, epoch = _checked(
        maskable, indices, mask_prob, ("clones", clones, "the number of masks per sample"), seed, epoch)
    if _C is not None:
        return _C.random_mask(maskable, mask_prob, seed, epoch, indices, clones)
    return _random_mask_python(maskable, mask_prob, seed, epoch, indices, clones)


def _checked(maskable, indices, mask_prob, count, seed, epoch) -> tuple:
    """Both masks' arguments, checked in this order; ``count``: (name, value, what it counts)."""
    maskable, indices = _check_batch(maskable, indices)
    return (maskable, indices, _check_mask_prob(mask_prob), _check_count(*count), _as_u64("seed", seed),
            _as_u64("epoch", epoch))


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
