"""The optimizer, its learning-rate schedule and the peak FLOP/s table used for MFU."""
from __future__ import annotations

import math

import torch

# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 0, then cosine to 0 at ``total`` updates (then 0)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def tri_stage_factor(step: int, total: int, phases=(0.03, 0.9, 0.07), init_scale: float = 0.01,
                     final_scale: float = 0.01) -> float:
    """fairseq's ``tri_stage`` (data2vec v1 speech): linear warmup from ``init_scale``, hold
    at 1, exponential decay to ``final_scale``, then held there; the phases are shares of
    ``total`` updates (fairseq ``phase_ratio``; its default scales)."""
    warmup, hold, decay = (int(total * p) for p in phases)
    if step < warmup:
        return init_scale + (1.0 - init_scale) * step / warmup
    step -= warmup
    if step < hold:
        return 1.0
    step -= hold
    if step < decay:
        return math.exp(math.log(final_scale) * step / decay)
    return final_scale


def lr_schedule(optim_cfg, total: int):
    """The learning-rate factor by update (for ``LambdaLR``) that ``optim.schedule`` names."""
    if optim_cfg.schedule == "tri_stage":
        phases = tuple(optim_cfg.tri_stage_phases)
        return lambda s: tri_stage_factor(s, total, phases)
    warmup = optim_cfg.warmup_steps
    return lambda s: lr_factor(s, warmup, total)


def exempt_from_decay(model: torch.nn.Module, name: str, p: torch.Tensor, cfg) -> bool:
    """Whether parameter ``name`` of ``model`` gets no weight decay: biases and LayerNorm weights
    (1-D) unless the recipe decays them (``optim.decay_biases_and_norms``), and the parameters
    the model names in ``no_weight_decay`` (BEiT's CLS token)."""
    named = getattr(model, "no_weight_decay", ())
    return (not cfg.decay_biases_and_norms and p.ndim < 2) or any(name == n or name.endswith("." + n) for n in named)


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if exempt_from_decay(model, name, p, cfg) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass  # this device or dtype has no fused AdamW
    return torch.optim.AdamW(groups, foreach=True, **kw)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
