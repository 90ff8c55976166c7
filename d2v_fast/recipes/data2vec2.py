"""Recipe ``data2vec2`` (data2vec 2.0, text; SPEC §1b; fairseq ``config/v2/base_text_only_task.yaml``,
``models/data2vec2.py``, ``models/modalities/{base,text}.py``).

The student never encodes masked tokens: embeddings (positions included, then dropout) are
computed once for the whole sequence, each sample is cloned ``clones`` times with its own
random mask, and only the kept tokens of every clone are gathered into the encoder
(``[B*clones, T_kept, C]``; exact mask counts make every unpadded row the same length, so
no padding mask is needed and the flash backend applies). A light conv decoder gets the
encoder output, dropped out (``decoder_dropout``, training only) and scattered back to full
length with N(0, std) noise at the masked positions, and predicts the teacher's targets
there. The teacher (EMA of the encoder blocks) runs once per sample on that same embedding
tensor the student computed, detached (the published ``ema_encoder_only`` path feeds the
student's ``local_features``): no second embedding pass. Its targets are emitted for the
masked rows of every clone with the repeat fused into ``build_targets``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models.encoder import Encoder, EncoderConfig, run_layers


class Decoder(nn.Module):
    """``layers`` × [Conv1d(→ D, kernel, same padding) → LayerNorm (no affine) → GELU], the
    first from the encoder width C, then the projection D → mult·D → C, applied only at the
    masked rows. D is C except in the published large model (768 for a 1024-wide encoder)."""

    def __init__(self, dim: int, layers: int, kernel: int, mult: int, eps: float, init_std: float = 0.02,
                 decoder_dim: int = 0):
        super().__init__()
        from .data2vec import regression_head

        self.eps = eps
        d = decoder_dim or dim
        self.convs = nn.ModuleList(nn.Conv1d(dim if i == 0 else d, d, kernel, padding=kernel // 2)
                                   for i in range(layers))
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)
        self.proj = regression_head(d, mult, init_std, out_dim=dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # [R, C, T]
        for conv in self.convs:
            h = conv(h)
            h = F.gelu(F.layer_norm(h.transpose(1, 2), h.shape[1:2], eps=self.eps).transpose(1, 2))
        return self.proj(ops.masked_gather(h.transpose(1, 2), mask))


def kept_layout(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """For rows with different kept counts (padded samples): positions ``[R, k_max]`` of the
    kept tokens in order, the padding mask of that layout (None if all rows are full) and k_max."""
    counts = keep.sum(1)
    k_max = int(counts.max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k_max]
    pad = torch.arange(k_max, device=keep.device)[None, :] >= counts[:, None]
    return order, (pad if bool(pad.any()) else None), k_max


class Student2(nn.Module):
    def __init__(self, enc: EncoderConfig, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(enc)
        self.decoder = Decoder(enc.hidden_size, cfg.decoder_layers, cfg.decoder_kernel, cfg.head_hidden_mult,
                               enc.layer_norm_eps, enc.init_std, cfg.decoder_dim)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions at the masked rows of every clone, and the teacher's input: the
        embedding output computed here (after dropout, as the published recipe's local
        encoder), detached."""
        B, T = input_ids.shape
        R = mask.shape[0]
        clones = R // B
        x = F.dropout(self.encoder.embeddings(input_ids), self.encoder.config.dropout, self.training)
        C = x.shape[-1]
        keep = ~mask
        if padding_mask is not None:
            keep = keep & ~padding_mask.repeat_interleave(clones, 0)
        if padding_mask is None:  # every row keeps the same count: one fused gather
            k = int(keep[0].sum())
            h, _ = run_layers(self.encoder.encoder.layer, ops.masked_gather(x, keep).view(R, k, C), None)
            h = F.dropout(h, self.cfg.decoder_dropout, self.training)
            rows = h.reshape(R * k, C)
        else:
            order, kpad, k = kept_layout(keep)
            src = x.repeat_interleave(clones, 0)
            xk = torch.gather(src, 1, order[..., None].expand(R, k, C))
            h, _ = run_layers(self.encoder.encoder.layer, xk, kpad)
            h = F.dropout(h, self.cfg.decoder_dropout, self.training)  # on [R, k, C], as the reference
            rows = h[~kpad] if kpad is not None else h.reshape(R * k, C)
        noise = torch.randn(R, T, C, device=x.device, dtype=rows.dtype) * self.cfg.mask_noise_std
        full = ops.masked_scatter(rows, keep, noise)
        return self.decoder(full, mask), x.detach()
