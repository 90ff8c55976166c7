from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

NORMS = (None, "instance", "layer")


def _instance_norm(y: torch.Tensor, padding_mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalise over time (dim -2) per sample and channel; padded positions are left out of
    the statistics (biased variance, as F.instance_norm)."""
    if padding_mask is None:
        mean = y.mean(dim=-2, keepdim=True)
        var = (y - mean).square().mean(dim=-2, keepdim=True)
    else:
        w = (~padding_mask).to(y.dtype).unsqueeze(-1)  # [B, T, 1], broadcasts over K
        n = w.sum(dim=-2, keepdim=True).clamp_min(1.0)
        mean = (y * w).sum(dim=-2, keepdim=True) / n
        var = ((y - mean).square() * w).sum(dim=-2, keepdim=True) / n
    return (y - mean) * torch.rsqrt(var + eps)


def _norm(y: torch.Tensor, kind: str | None, padding_mask, eps: float) -> torch.Tensor:
    if kind is None:
        return y
    if kind == "instance":
        return _instance_norm(y, padding_mask, eps)
    if kind == "layer":
        return F.layer_norm(y, y.shape[-1:], eps=eps)
    raise ValueError(f"norm {kind!r}: expected one of {NORMS}")


def build_targets(layers: Sequence[torch.Tensor] | torch.Tensor, *, padding_mask: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, layer_norm: str | None = "instance",
                  final_norm: str | None = None, eps: float = 1e-5) -> torch.Tensor:
    """data2vec targets (SPEC §1 step 3): per-layer norm of each of the K layer outputs,
    their mean, an optional final norm; fp32 ``[B, T, C]``, or ``[N, C]`` at ``mask``."""
    y = layers if isinstance(layers, torch.Tensor) else torch.stack(list(layers))
    y = _norm(y.float(), layer_norm, padding_mask, eps).mean(dim=0)
    y = _norm(y, final_norm, padding_mask, eps)
    return y if mask is None else y[mask]


def regression_loss(pred: torch.Tensor, target: torch.Tensor, *, beta: float, scale: float | None = None,
                    reduction: str = "sum") -> torch.Tensor:
    """Smooth L1 with ``beta`` (MSE when ``beta == 0``) summed over features, times ``scale``
    (``1/sqrt(C)`` when None); ``reduction`` 'sum' over rows or 'none' (per row)."""
    d = pred.float() - target.float()
    if beta == 0:
        per = d.square()
    else:
        ad = d.abs()
        per = torch.where(ad < beta, 0.5 * d.square() / beta, ad - 0.5 * beta)
    per = per.sum(dim=-1) * (1.0 / math.sqrt(pred.shape[-1]) if scale is None else scale)
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"reduction {reduction!r}: expected 'sum' or 'none'")


@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], decay) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` over whole tensor lists."""
    teacher, student = list(teacher), [s.detach() for s in student]
    if isinstance(decay, torch.Tensor):
        torch._foreach_mul_(teacher, decay)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1 - decay))
    else:
        torch._foreach_mul_(teacher, decay)
        torch._foreach_add_(teacher, student, alpha=1 - decay)


def representation_std(x: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the standard deviation over rows: the collapse statistic
    logged as target_var / pred_var (data2vec's own definition)."""
    x = x.float().reshape(-1, x.shape[-1])
    if x.shape[0] < 2:
        return x.new_zeros(())
    return torch.sqrt(x.var(dim=0) + 1e-6).mean()
