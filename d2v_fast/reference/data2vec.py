"""Eager reference of the ``data2vec`` recipe, written the plain way the public reference
code does it: a per-parameter EMA loop of ``mul_``/``add_``, instance norm layer by layer
(and sample by sample, so that padding stays out of the statistics) with
``F.instance_norm``, boolean indexing for the masked rows and ``F.smooth_l1_loss``.

It is the correctness oracle of the engine and the baseline of the benchmarks; the engine
never imports it. Unlike the public code it feeds the teacher the full unmasked sequence,
as the paper describes (arXiv 2202.03555 §3).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..models.encoder import Encoder, EncoderConfig, attention_mask
from ..recipes.common import RecipeConfig, regression_head
from .common import ReferenceBase


class ReferenceData2Vec(ReferenceBase):
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
            y = self.average_targets(layer_results, padding_mask)[mask]

        x = x[mask]
        x = self.regression_head(x)
        sz = x.size(-1)
        if self.cfg.loss_beta == 0:
            loss = F.mse_loss(x.float(), y, reduction="none").sum(dim=-1)
        else:
            loss = F.smooth_l1_loss(x.float(), y, reduction="none", beta=self.cfg.loss_beta).sum(dim=-1)
        scale = self.cfg.loss_scale if self.cfg.loss_scale > 0 else 1 / math.sqrt(sz)
        return (loss.sum() * scale, mask.sum(), *self.stats(x, y))
