"""Recipe ``data2vec2`` (data2vec 2.0, arXiv 2212.07525; fairseq ``models/data2vec2.py``,
``models/modalities/``).

The student never encodes masked positions: each sample is cloned ``clones`` times with its
own mask, and only the kept positions of every clone enter the encoder (a modality's
``encode_visible``). A light decoder gets the encoder output, dropped out
(``decoder_dropout``, training only) and scattered back to full length with N(0, std) noise
at the masked positions, and predicts the teacher's targets there. The teacher runs once per
sample; its targets are emitted for the masked rows of every clone with the repeat fused
into ``build_targets``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .common import StudentBase, regression_head


class Decoder(nn.Module):
    """``layers`` × [Conv1d(→ D, kernel, same padding) → LayerNorm (no affine) → GELU], the
    first from the encoder width C, then the projection D → mult·D → C, applied only at the
    masked rows. D is C except in the published large model (768 for a 1024-wide encoder)."""

    def __init__(self, dim: int, layers: int, kernel: int, mult: int, eps: float, init_std: float = 0.02,
                 decoder_dim: int = 0):
        super().__init__()
        self.eps = eps
        d = decoder_dim or dim
        self.convs = nn.ModuleList(nn.Conv1d(dim if i == 0 else d, d, kernel, padding=kernel // 2)
                                   for i in range(layers))
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)
        self.proj = regression_head(d, mult, init_std, out_dim=dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
        h = x.transpose(1, 2)  # [R, C, T]
        for conv in self.convs:
            h = conv(h)
            h = F.gelu(F.layer_norm(h.transpose(1, 2), h.shape[1:2], eps=self.eps).transpose(1, 2))
        return self.proj(ops.masked_gather(h.transpose(1, 2), mask, count))


def kept_layout(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """For rows with different kept counts (padded samples): positions ``[R, k_max]`` of the
    kept positions in order, the padding mask of that layout (None if all rows are full) and k_max."""
    counts = keep.sum(1)
    k_max = int(counts.max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k_max]
    pad = torch.arange(k_max, device=keep.device)[None, :] >= counts[:, None]
    return order, (pad if bool(pad.any()) else None), k_max


class Student2(StudentBase):
    """Encoder + decoder. A modality implements ``encode_visible(batch) -> (h, kpad, keep,
    teacher_input)``: the encoder output ``[R, k, C]`` of the kept positions of every clone,
    its padding ``[R, k]`` (None when every row keeps k), the kept positions ``[R, T]`` and
    what the teacher consumes; and sets ``self.decoder`` (``decoder(full [R, T, C], mask,
    count)`` -> predictions at the ``count`` masked rows; ``count`` None: read from the device)."""

    def __init__(self, encoder: nn.Module, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder

    def encode_visible(self, batch: dict):
        raise NotImplementedError

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predictions at the masked rows of every clone, and the teacher's input."""
        h, kpad, keep, teacher_input = self.encode_visible(batch)
        R, k, C = h.shape
        h = F.dropout(h, self.cfg.decoder_dropout, self.training)  # on [R, k, C], as the reference
        rows = h[~kpad] if kpad is not None else h.reshape(R * k, C)
        noise = torch.randn(R, keep.shape[1], C, device=h.device, dtype=rows.dtype) * self.cfg.mask_noise_std
        full = ops.masked_scatter(rows, keep, noise)
        return self.decoder(full, batch["mask"], batch.get("mask_rows")), teacher_input
