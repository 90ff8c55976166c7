"""What the two eager reference recipes share, written the plain way: the per-parameter EMA
loop of ``mul_``/``add_``, instance norm layer by layer and sample by sample with
``F.instance_norm`` (so padding stays out of the statistics), the average of the top-K
layers, and the representation statistics. Never imported by the engine."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceBase(nn.Module):
    """Subclasses set ``cfg``, ``encoder`` and ``ema`` (the teacher's copy of the encoder
    blocks), and ``ENGINE_NAMES`` (engine state-dict prefix -> their prefix)."""

    ENGINE_NAMES: dict[str, str] = {}

    def load_engine_state(self, state: dict) -> None:
        """Take the weights of an engine ``Data2Vec`` (renamed by ``ENGINE_NAMES``)."""
        mine = {}
        for k, v in state.items():
            prefix = next((p for p in self.ENGINE_NAMES if k.startswith(p)), None)
            if prefix is not None:
                mine[self.ENGINE_NAMES[prefix] + k[len(prefix):]] = v
        self.load_state_dict(mine)

    @torch.no_grad()
    def ema_step(self, decay: float) -> None:
        for ema_param, param in zip(self.ema.parameters(), self.encoder.encoder.layer.parameters()):
            ema_param.mul_(decay)
            ema_param.add_(param.detach(), alpha=1 - decay)

    def _instance_norm(self, x: torch.Tensor, padding_mask) -> torch.Tensor:
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            keep = torch.ones(x.shape[1], dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask[b]
            if keep.sum() > 1:  # a single position normalises to 0 (left as zeros)
                out[b, keep] = F.instance_norm(x[b, keep].t().unsqueeze(0)).squeeze(0).t()
        return out

    def _norm(self, x, kind, padding_mask):
        if kind == "instance":
            return self._instance_norm(x, padding_mask)
        if kind == "layer":
            return F.layer_norm(x, x.shape[-1:])
        return x

    def average_targets(self, layer_results: list[torch.Tensor], padding_mask) -> torch.Tensor:
        """Per-layer norm of the top-K layers, their mean, then the final norm: ``[B, T, C]`` fp32."""
        per_layer = None if self.cfg.layer_norm == "none" else self.cfg.layer_norm
        top = [self._norm(tl.float(), per_layer, padding_mask) for tl in layer_results[-self.cfg.top_k:]]
        y = sum(top) / len(top)
        final = None if self.cfg.final_norm == "none" else self.cfg.final_norm
        return self._norm(y, final, padding_mask)

    @staticmethod
    def stats(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sz = pred.shape[-1]
        target_std = torch.sqrt(y.reshape(-1, sz).var(dim=0) + 1e-6).mean()
        pred_std = torch.sqrt(pred.detach().float().reshape(-1, sz).var(dim=0) + 1e-6).mean()
        return target_std, pred_std


class ReferenceUpdate:
    """The reference recipes' optimizer update, shared by their steps: AdamW with the recipe's
    weight-decay groups (``optim.decay_biases_and_norms``, and the model's ``no_weight_decay``
    names), the run's learning-rate schedule
    (the engine's own function: shared, not under test), clipping, then one EMA step of the
    model's per-parameter loop."""

    def __init__(self, model: nn.Module, cfg):
        from ..schedule import lr_schedule

        t, o = cfg.train, cfg.optim
        self.model, self.recipe, self.clip = model, cfg.recipe, o.clip_norm
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the EMA teacher has none
        self.params = [p for _, p in named]
        exempt = set(getattr(model, "no_weight_decay", ()))  # names the recipe never decays
        keep = [n in exempt or not (o.decay_biases_and_norms or p.ndim >= 2) for n, p in named]
        decay = [p for (_, p), k in zip(named, keep) if not k]
        no_decay = [p for (_, p), k in zip(named, keep) if k]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_schedule(o, o.total_steps or t.max_steps))
        self.updates = 0

    def __call__(self) -> None:
        """Apply the accumulated gradients: clip, step, schedule, zero, EMA."""
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()
        self.model.ema_step(self.recipe.decay_at(self.updates))
        self.updates += 1
