"""Eager twins of the fused kernels in ``d2v_fast/kernels`` (docs/design.md#kernels): the same functions with
the same signatures, in plain vectorised PyTorch (whole batch, all K layers at once).

They define the semantics, are the correctness oracle of the kernels, the baseline of
``benchmarks/test_kernels.py``, and the torch side of ``d2v_fast.ops`` (what runs on CPU,
or anywhere with ``D2V_KERNELS=torch``).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import check_residual

NORMS = (None, "instance", "layer")


def mask_clones(x_shape: Sequence[int], mask_shape: Sequence[int], what: str) -> int:
    """How many clones of each sample a mask holds (data2vec 2.0 multi-mask, docs/design.md#recipes):
    ``clones`` when ``mask`` is ``[clones*B, T]`` for an input ``[B, T, ...]`` (rows
    ``b*clones .. b*clones + clones - 1`` belong to sample ``b``), 1 for ``[B, T]``; any other
    shape is a ValueError naming both."""
    x_shape, mask_shape = tuple(x_shape), tuple(mask_shape)
    if len(x_shape) >= 2 and len(mask_shape) == 2 and mask_shape[1] == x_shape[1]:
        B, rows = x_shape[0], mask_shape[0]
        if rows == B:
            return 1
        if B > 0 and rows > B and rows % B == 0:
            return rows // B
    raise ValueError(f"{what}: mask has shape {mask_shape} but the input {x_shape}; expected mask.shape == "
                     f"[B, T] or [clones*B, T] for an input [B, T, C] (clones an integer >= 1)")


def selected_rows(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The flat indices of the true entries of ``mask`` (row-major), int64 ``[count]``, where
    the caller knows ``count`` (the true entries) on the host: unlike ``mask.nonzero()`` or
    ``x[mask]``, nothing waits for the device to say how many there are. Each true entry is
    written to its slot (an exclusive cumsum); the false ones all go to one spare slot past
    the end, which is dropped. A ``count`` that disagrees with the mask fails on the device
    (an async assert), never reads past the rows."""
    m = mask.reshape(-1)
    csum = torch.cumsum(m, 0)
    if m.numel():
        torch._assert_async(csum[-1] == count, "selected_rows: count differs from mask.sum()")
    slot = torch.where(m, csum - 1, count)
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(0, slot, torch.arange(m.numel(), device=mask.device))
    return out[:count]


def masked_gather(x: torch.Tensor, mask: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """The rows of ``x[B, T, C]`` where ``mask[B, T]`` is true, in row-major order: ``[N, C]``.

    Multi-mask (data2vec 2.0): ``mask`` may be ``[clones*B, T]``, row ``r`` belonging to sample
    ``r // clones``; then each true ``mask[r, t]`` (row-major) gives ``x[r // clones, t]``. The
    index runs on an expanded view (no ``[B*clones, T, C]`` copy of ``x``); its backward sums
    the clones' gradients into ``grad_x[b, t]``.

    ``count``: ``N``, when the caller knows it on the host (``--train.host_counts``): the rows
    are then picked by ``index_select`` at ``selected_rows(mask, count)``, without a sync."""
    clones = 1 if tuple(mask.shape) == tuple(x.shape[:-1]) else mask_clones(x.shape, mask.shape, "masked_gather")
    if clones > 1 and x.dim() != 3:
        raise ValueError(f"masked_gather: a [clones*B, T] mask needs x [B, T, C], got x {tuple(x.shape)} and "
                         f"mask {tuple(mask.shape)}")
    if count is not None:
        idx = selected_rows(mask, count)
        if clones > 1:  # cloned row i = (b*clones + c)*T + t reads sample row b*T + t
            T = x.shape[1]
            idx = idx // (clones * T) * T + idx % T
        return x.reshape(-1, x.shape[-1]).index_select(0, idx)
    if clones == 1:
        return x[mask]
    B, T, C = x.shape
    return x.unsqueeze(1).expand(B, clones, T, C)[mask.reshape(B, clones, T)]


def masked_scatter(rows: torch.Tensor, mask: torch.Tensor, fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of masked_gather: ``rows[N, C]`` at the true positions of ``mask[B, T]``, ``fill``
    (a ``[C]`` vector or a ``[B, T, C]`` tensor; None = zeros) at the others; ``rows.dtype``."""
    shape = (*mask.shape, rows.shape[-1])
    base = rows.new_zeros(shape) if fill is None else fill.to(rows.dtype).expand(shape)
    if rows.shape[0] == 0:
        return base.clone()
    # Row r of ``rows`` goes to the r-th true position: each position picks row (true positions
    # before it) and ``where`` keeps the fill elsewhere. Unlike ``out[mask] = rows`` nothing here
    # asks the device how many positions are true, so the host does not wait for it.
    flat = mask.reshape(-1)
    pick = (torch.cumsum(flat, 0) - 1).clamp_min_(0)
    return torch.where(flat.unsqueeze(-1), rows.index_select(0, pick), base.reshape(-1, shape[-1])).view(shape)


def _instance_norm(y: torch.Tensor, padding_mask: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Normalise over time (dim -2) per sample and channel; padded positions are left out of
    the statistics (biased variance, as F.instance_norm). A row with one real position
    normalises to 0; a fully padded row divides by max(n, 1), so it stays finite."""
    if padding_mask is None:
        mean = y.mean(dim=-2, keepdim=True)
        var = (y - mean).square().mean(dim=-2, keepdim=True)
    else:
        w = (~padding_mask).to(y.dtype).unsqueeze(-1)  # [B, T, 1], broadcasts over K
        n = w.sum(dim=-2, keepdim=True).clamp_min(1.0)
        mean = (y * w).sum(dim=-2, keepdim=True) / n
        var = ((y - mean).square() * w).sum(dim=-2, keepdim=True) / n
    return (y - mean) * torch.rsqrt(var + eps)


def _norm(y: torch.Tensor, kind: Optional[str], padding_mask, eps: float) -> torch.Tensor:
    if kind is None:
        return y
    if kind == "instance":
        return _instance_norm(y, padding_mask, eps)
    if kind == "layer":
        return F.layer_norm(y, y.shape[-1:], eps=eps)
    raise ValueError(f"build_targets: norm {kind!r}, expected one of {NORMS}")


@torch.no_grad()
def build_targets(layers: Sequence[torch.Tensor] | torch.Tensor, *, padding_mask: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None, layer_norm: Optional[str] = "instance",
                  final_norm: Optional[str] = None, eps: float = 1e-5, count: Optional[int] = None) -> torch.Tensor:
    """data2vec targets (docs/design.md#targets): per-layer norm of each of the K layer outputs
    (``[K, B, T, C]`` or a list of K ``[B, T, C]``), their mean, an optional final norm; fp32
    ``[B, T, C]``, or ``[N, C]`` at the rows where ``mask`` is true. Padded positions are 0.

    ``padding_mask`` is per sample, ``[B, T]``. ``mask`` may be ``[B, T]`` or, for data2vec 2.0's
    multi-mask, ``[clones*B, T]`` (row ``r`` belongs to sample ``r // clones``): each true
    ``mask[r, t]`` (row-major) gives the target of sample ``r // clones`` at ``t``. The targets
    are computed once per sample and indexed through an expanded view for the clones.
    ``count``: the number of true entries of ``mask``, when known on the host (no sync)."""
    for kind, what in ((layer_norm, "layer_norm"), (final_norm, "final_norm")):
        if kind not in NORMS:
            raise ValueError(f"build_targets: {what}={kind!r}, expected one of {NORMS}")
    y = layers if isinstance(layers, torch.Tensor) else torch.stack(list(layers))
    clones = 1 if mask is None else mask_clones(y.shape[1:], mask.shape, "build_targets")
    y = _norm(y.float(), layer_norm, padding_mask, eps).mean(dim=0)
    y = _norm(y, final_norm, padding_mask, eps)
    if padding_mask is not None:
        y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    if mask is None:
        return y
    if count is not None:  # N known on the host: no sync (see masked_gather)
        return masked_gather(y, mask, count)
    if clones == 1:
        return y[mask]
    B, T, C = y.shape
    return y.unsqueeze(1).expand(B, clones, T, C)[mask.reshape(B, clones, T)]


def regression_loss(pred: torch.Tensor, target: torch.Tensor, *, beta: float, scale: Optional[float] = None,
                    reduction: str = "sum") -> torch.Tensor:
    """Smooth L1 with ``beta`` (``0.5*d^2/beta`` if ``|d| < beta`` else ``|d| - 0.5*beta``; MSE
    ``d^2`` when ``beta == 0``) summed over features, times ``scale`` (``1/sqrt(C)`` when
    None); ``reduction`` 'sum' (a scalar) or 'none' (per row). fp32; no gradient to target."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"regression_loss: reduction={reduction!r}, expected 'sum' or 'none'")
    d = pred.float() - target.detach().float()
    if beta == 0:
        per = d.square()
    else:
        ad = d.abs()
        per = torch.where(ad < beta, 0.5 * d.square() / beta, ad - 0.5 * beta)
    per = per.sum(dim=-1) * (1.0 / math.sqrt(pred.shape[-1]) if scale is None else scale)
    return per.sum() if reduction == "sum" else per


def _tensor_list(params: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


@torch.no_grad()
def ema_update_(teacher: torch.Tensor | Iterable[torch.Tensor], student: torch.Tensor | Iterable[torch.Tensor],
                decay: float | torch.Tensor) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` in place, over flat buffers or
    whole tensor lists (``torch._foreach``); ``decay`` a float or a 0-dim tensor."""
    teacher, student = _tensor_list(teacher), _tensor_list(student)
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    # A bf16 student is widened first, so that (1 - decay) * student is rounded in fp32.
    student = [s.detach().to(t.dtype) for t, s in zip(teacher, student)]
    if isinstance(decay, torch.Tensor):
        torch._foreach_mul_(teacher, decay)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1 - decay))
    else:
        torch._foreach_mul_(teacher, decay)
        torch._foreach_add_(teacher, student, alpha=1 - decay)


def layer_norm_dual_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                        low: torch.dtype, stats: bool = True, residual: Optional[torch.Tensor] = None):
    """``(y, y.to(low), mean, rstd)`` of a LayerNorm over the last dimension of ``x``, or of
    ``x + residual`` (``torch.native_layer_norm``, then the cast); ``mean``/``rstd`` None
    without ``stats``."""
    if residual is not None:
        check_residual(x, residual, stats)
        x = x + residual
    y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return (y, y.to(low), mean, rstd) if stats else (y, y.to(low), None, None)
