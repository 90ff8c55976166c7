"""Eager reference of the ``data2vec2`` recipe (data2vec 2.0, arXiv 2212.07525), written plainly:
clones made with ``repeat_interleave``, kept tokens taken row by row with boolean indexing,
the encoder output dropped out and put back with boolean assignment into the noise tensor,
per-layer ``F.instance_norm``/``F.layer_norm`` sample by sample, targets repeated for the
clones, ``F.mse_loss``. As the published recipe (fairseq ``models/data2vec2.py``,
``ema_encoder_only``), the teacher encodes the student's own embedding output (after its
dropout), detached. The correctness oracle of the engine's recipe; the engine never imports it.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models.encoder import Encoder, EncoderConfig, attention_mask
from ..recipes.common import RecipeConfig, regression_head
from .common import ReferenceBase


class ReferenceData2Vec2(ReferenceBase):
    def __init__(self, enc: EncoderConfig, cfg: RecipeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(enc)
        C = enc.hidden_size
        D = cfg.decoder_dim or C
        self.convs = nn.ModuleList(nn.Conv1d(C if i == 0 else D, D, cfg.decoder_kernel, padding=cfg.decoder_kernel // 2)
                                   for i in range(cfg.decoder_layers))
        self.proj = regression_head(D, cfg.head_hidden_mult, enc.init_std, out_dim=C)
        self.ema = copy.deepcopy(self.encoder.encoder.layer)
        for p in self.ema.parameters():
            p.requires_grad = False

    ENGINE_NAMES = {"student.encoder.": "encoder.", "student.decoder.convs.": "convs.",
                    "student.decoder.proj": "proj", "teacher.": "ema."}

    def forward(self, tokens, padding_mask, mask):
        """Returns (summed loss, number of masked positions, target std, prediction std)."""
        B, T = tokens.shape
        clones = mask.shape[0] // B
        emb = F.dropout(self.encoder.embeddings(tokens), self.encoder.config.dropout, self.training)
        x = emb.repeat_interleave(clones, 0)
        pad = padding_mask.repeat_interleave(clones, 0) if padding_mask is not None else torch.zeros_like(mask)
        keep = ~mask & ~pad
        rows = [x[r][keep[r]] for r in range(x.shape[0])]
        k_max = max(len(r) for r in rows)
        h = x.new_zeros(x.shape[0], k_max, x.shape[-1])
        kpad = torch.ones(x.shape[0], k_max, dtype=torch.bool, device=x.device)
        for r, kept in enumerate(rows):
            h[r, :len(kept)] = kept
            kpad[r, :len(kept)] = False
        am = attention_mask(kpad if kpad.any() else None, h)
        for layer in self.encoder.encoder.layer:
            h, _ = layer(h, am)
        h = F.dropout(h, self.cfg.decoder_dropout, self.training)
        noise = torch.randn(x.shape[0], T, x.shape[-1], dtype=h.dtype, device=x.device) * self.cfg.mask_noise_std
        full = noise.clone()
        for r in range(x.shape[0]):
            full[r][keep[r]] = h[r, :int(keep[r].sum())]
        d = full.transpose(1, 2)
        for conv in self.convs:
            d = conv(d)
            d = F.gelu(F.layer_norm(d.transpose(1, 2), (d.shape[1],), eps=self.encoder.config.layer_norm_eps)
                       .transpose(1, 2))
        pred = self.proj(d.transpose(1, 2)[mask])

        with torch.no_grad():
            self.ema.eval()
            t = emb.detach()
            am = attention_mask(padding_mask, t)
            layer_results = []
            for layer in self.ema:
                t, ffn = layer(t, am)
                layer_results.append(ffn)
            y = self.average_targets(layer_results, padding_mask).repeat_interleave(clones, 0)[mask]

        loss = F.mse_loss(pred.float(), y, reduction="none").sum(dim=-1) * self.cfg.loss_scale
        return (loss.sum(), mask.sum(), *self.stats(pred, y))
