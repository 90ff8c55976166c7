"""Eager reference of the ``data2vec`` recipe, written the plain way the public reference
code does it: a per-parameter EMA loop of ``mul_``/``add_``, instance norm layer by layer
(and sample by sample, so that padding stays out of the statistics) with
``F.instance_norm``, boolean indexing for the masked rows and ``F.smooth_l1_loss``.

It is the correctness oracle of the engine and the baseline of the benchmarks; the engine
never imports it. Unlike the public code it feeds the teacher the full unmasked sequence,
as the paper describes (SPEC §1a).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.encoder import Encoder, EncoderConfig, attention_mask
from ..recipes.data2vec import RecipeConfig, regression_head


class ReferenceData2Vec(nn.Module):
    def __init__(self, enc: EncoderConfig, cfg: RecipeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(enc)
        self.regression_head = regression_head(enc.hidden_size, cfg.head_hidden_mult, enc.init_std)
        self.ema = copy.deepcopy(self.encoder.encoder.layer)
        for p in self.ema.parameters():
            p.requires_grad = False

    # engine name prefix -> reference name prefix
    ENGINE_NAMES = {"student.encoder.": "encoder.", "student.head": "regression_head", "teacher.": "ema."}

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

    def forward(self, src_tokens, target_tokens, padding_mask, mask):
        """Returns (summed loss, number of masked positions, target std, prediction std)."""
        x, _ = self.encoder.encode(src_tokens, padding_mask)

        with torch.no_grad():
            self.ema.eval()
            h = self.encoder.embeddings(target_tokens)
            am = attention_mask(padding_mask, h)
            layer_results = []
            for layer in self.ema:
                h, ffn = layer(h, am)
                layer_results.append(ffn)
            top = layer_results[-self.cfg.top_k:]
            layer_norm = None if self.cfg.layer_norm == "none" else self.cfg.layer_norm
            top = [self._norm(tl.float(), layer_norm, padding_mask) for tl in top]
            y = sum(top) / len(top)
            final = None if self.cfg.final_norm == "none" else self.cfg.final_norm
            y = self._norm(y, final, padding_mask)
            y = y[mask]

        x = x[mask]
        x = self.regression_head(x)
        sz = x.size(-1)
        if self.cfg.loss_beta == 0:
            loss = F.mse_loss(x.float(), y, reduction="none").sum(dim=-1)
        else:
            loss = F.smooth_l1_loss(x.float(), y, reduction="none", beta=self.cfg.loss_beta).sum(dim=-1)
        scale = self.cfg.loss_scale if self.cfg.loss_scale > 0 else 1 / math.sqrt(sz)
        target_std = torch.sqrt(y.reshape(-1, sz).var(dim=0) + 1e-6).mean()
        pred_std = torch.sqrt(x.detach().float().reshape(-1, sz).var(dim=0) + 1e-6).mean()
        return loss.sum() * scale, mask.sum(), target_std, pred_std
