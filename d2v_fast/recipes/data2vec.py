"""Recipe ``data2vec`` (v1, arXiv 2202.03555 §3; docs/design.md): the student encodes the masked input and a
regression head maps its last layer at the masked positions to the targets; the teacher (an
EMA of part of the student's encoder, ``ema_source``) encodes the unmasked input in eval mode,
and the targets are the mean of its top-K layer outputs, each normalised per the recipe.

How a modality masks its input (``<mask>`` tokens, a learned mask embedding, a mask token on
patches) and what its teacher averages are the modality's (``d2v_fast.modalities``); this
file is what the algorithm does the same way for all of them.
"""
from __future__ import annotations

import torch

from .. import ops
from .common import RecipeConfig, StudentBase, regression_head

__all__ = ["RecipeConfig", "Student"]


class Student(StudentBase):
    """Encoder + regression head. A modality implements ``masked_hidden`` (the encoder's last
    layer ``[B, T, C]`` on the masked input of ``batch``) and the teacher hooks."""

    def __init__(self, encoder: torch.nn.Module, cfg: RecipeConfig, hidden_size: int, init_std: float):
        super().__init__()
        self.encoder = encoder
        self.head = regression_head(hidden_size, cfg.head_hidden_mult, init_std)

    def masked_hidden(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> tuple[torch.Tensor, None]:
        """Predictions at the masked rows, and no teacher input: the v1 teacher embeds the
        unmasked input itself, without the student's dropout."""
        rows = ops.masked_gather(self.masked_hidden(batch), batch["mask"], batch.get("mask_rows"))
        return self.head(rows), None
