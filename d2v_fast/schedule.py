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


class ListAdamW(torch.optim.AdamW):
    """torch's fused AdamW, less its per-parameter Python on every update. ``step`` of
    ``torch.optim.AdamW`` walks every parameter of every group each time, checking its gradient
    and state and building five lists, before one multi-tensor ``_fused_adamw_`` per group;
    here the parameter and state lists are built once, after the first step has made the state,
    and each later step reads the gradients into a list and issues the ops that torch's fused
    path does (``_foreach_add_`` of the step counts, ``_fused_adamw_``, and with ``found_inf``
    the ``_foreach_sub_`` that takes a skipped step back): the same update bit for bit. A
    group's step counts (one 0-d tensor per parameter) are made views of one vector when the
    lists are built, so that counting a step is one ``add_`` on it, not one per parameter (each
    count keeps its own value: a parameter that missed a step stays behind). Anything
    else (a missing gradient, a closure, a tensor lr, another device or dtype in a group, state
    loaded or groups added since) goes through torch's own ``step``."""

    _lists: list | None = None

    def step(self, closure=None):
        plan = self._lists if closure is None and self._lists_valid() else None
        grads = None
        if plan is not None:
            grads = [[p.grad for p in params] for params, *_ in plan]
            if any(g is None for gs in grads for g in gs) or any(not isinstance(g["lr"], float)
                                                                for g in self.param_groups):
                plan = None
        if plan is None:
            loss = super().step(closure)
            self._lists = self._build_lists()
            return loss
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        if any(t is not None and t.device != self._device for t in (found_inf, grad_scale)):
            return super().step(closure)
        for group, (params, exp_avgs, exp_avg_sqs, steps, counts), gs in zip(self.param_groups, plan, grads):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            if counts is not None:
                counts.add_(1)
            else:
                torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, gs, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1,
                                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                maximize=False, grad_scale=grad_scale, found_inf=found_inf)
            if found_inf is not None:
                if counts is not None:
                    counts.sub_(found_inf)
                else:
                    torch._foreach_sub_(steps, [found_inf] * len(steps))
        return None

    def _lists_valid(self) -> bool:
        return self._lists is not None and self._lists_state == len(self.state)

    def _build_lists(self) -> list | None:
        plan, devices = [], set()
        for group in self.param_groups:
            if not (group.get("fused") and group.get("decoupled_weight_decay", True)) or group["amsgrad"] \
                    or group["maximize"] or group["capturable"] or group["differentiable"]:
                return None
            params = group["params"]
            if len({(p.device, p.dtype) for p in params}) > 1 or any(p.is_complex() for p in params):
                return None
            devices.update(p.device for p in params)
            states = [self.state.get(p, {}) for p in params]
            if any(not {"exp_avg", "exp_avg_sq", "step"} <= st.keys() for st in states):
                return None
            steps = [st["step"] for st in states]
            counts = _counts_vector(steps)
            if counts is not None:  # each state's step now a view of the vector, its value kept
                steps = list(counts.unbind(0))
                for st, view in zip(states, steps):
                    st["step"] = view
            plan.append((list(params), [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                         steps, counts))
        if len(devices) > 1:
            return None
        self._device = devices.pop() if devices else None
        self._lists_state = len(self.state)
        return plan

    def load_state_dict(self, state_dict):
        self._lists = None
        return super().load_state_dict(state_dict)

    def add_param_group(self, param_group):
        self._lists = None
        return super().add_param_group(param_group)


def _counts_vector(steps: list) -> torch.Tensor | None:
    """One vector holding these step counts (0-d float32 tensors on one device, plain tensors),
    or None where they are not such (torch's step path then counts them one by one)."""
    if not steps or any(type(t) is not torch.Tensor or t.dim() != 0 or t.dtype != torch.float32 for t in steps):
        return None
    if len({t.device for t in steps}) != 1:
        return None
    base = steps[0]._base
    if base is not None and base.dim() == 1 and base.numel() == len(steps) and all(
            t._base is base and t.storage_offset() == i for i, t in enumerate(steps)):
        return base  # views of one vector already, in this order
    return torch.stack(steps)


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if exempt_from_decay(model, name, p, cfg) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused:
        try:
            return ListAdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass  # this device or dtype has no fused AdamW
    return torch.optim.AdamW(groups, foreach=True, **kw)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
