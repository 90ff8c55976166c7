"""Recipe ``data2vec`` (v1, text; SPEC §1, §1a), and what both recipes share.

The student encodes the span-masked input (``<mask>`` tokens) and a regression head maps
its last layer at the masked positions to the targets. The teacher is an EMA of the
student's transformer layers only; it shares the student's embeddings (computed again for
the unmasked input, without dropout), runs in eval mode on the full unmasked sentence, and
its targets are the mean of its top-K FFN outputs, each layer-normalised per token without
parameters (fairseq ``config/text/pretraining/base.yaml``: ``layer_norm_target_layer:
true``; paper §3.3: layer norm for text and images, instance norm for speech).

Where we differ from the public code on purpose: there the teacher's input holds only the
masked positions' original tokens, with padding elsewhere; we feed the full unmasked
sentence, as the paper describes (SPEC §1a).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..models.encoder import Encoder, EncoderConfig, run_layers
from ..ops import build_targets, ema_update_, regression_loss, representation_std


@dataclass
class RecipeConfig:
    name: str = "data2vec"
    top_k: int = 10  # average the last K layers' FFN outputs
    layer_norm: str = "layer"  # per-layer target norm: layer (text, images) | instance (speech, 2.0 text base) | none
    final_norm: str = "none"  # norm of the average: none | instance | layer
    head_hidden_mult: int = 2  # head: Linear(C, mult*C) -> GELU -> Linear(mult*C, C); 0 = one Linear
    loss_beta: float = 4.0  # smooth L1 beta; 0 = MSE
    loss_scale: float = 1.0  # 0 = 1/sqrt(C)
    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_end_step: int = 300_000
    mask_prob: float = 0.35
    mask_span: int = 4  # data2vec: span length of the span masks
    clones: int = 1  # data2vec2: masked copies of each sample (the teacher runs once per sample)
    decoder_layers: int = 5  # data2vec2: conv decoder blocks
    decoder_kernel: int = 9  # data2vec2: conv kernel width
    decoder_dim: int = 0  # data2vec2: conv channels of the decoder; 0 = the encoder width
    decoder_dropout: float = 0.0  # data2vec2: dropout on the encoder output before the decoder (training only)
    mask_noise_std: float = 0.01  # data2vec2: std of the noise put at masked positions for the decoder

    def norm(self, value: str) -> str | None:
        return None if value == "none" else value

    def decay_at(self, step: int) -> float:
        """EMA decay for the update after ``step`` optimizer updates: linear, then held."""
        if step >= self.ema_anneal_end_step or self.ema_anneal_end_step <= 0:
            return self.ema_end_decay
        frac = step / self.ema_anneal_end_step
        return self.ema_decay + (self.ema_end_decay - self.ema_decay) * frac


def regression_head(dim: int, mult: int, init_std: float = 0.02, out_dim: int | None = None) -> nn.Module:
    """Linear(D, mult*D) -> GELU -> Linear(mult*D, out), or one Linear(D, out) when mult is 0;
    ``out`` is ``dim`` unless given (the data2vec 2.0 large decoder runs narrower than the encoder)."""
    out_dim = out_dim or dim
    head = nn.Linear(dim, out_dim) if mult <= 0 else \
        nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, out_dim))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_std)
            nn.init.zeros_(m.bias)
    return head


class Student(nn.Module):
    """What the optimizer trains (and DDP wraps): the encoder and the regression head."""

    def __init__(self, enc: EncoderConfig, cfg: RecipeConfig):
        super().__init__()
        self.encoder = Encoder(enc)
        self.head = regression_head(enc.hidden_size, cfg.head_hidden_mult, enc.init_std)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Predictions at the masked rows, and no teacher input: the v1 teacher embeds the
        unmasked sentence itself, without the student's dropout."""
        h, _ = self.encoder.encode(input_ids, padding_mask)
        return self.head(h[mask]), None


class Data2Vec(nn.Module):
    """Student (DDP/FSDP-wrappable), EMA teacher, targets and loss, for both recipes: the
    recipes differ in the student (``Student`` or ``data2vec2.Student2``) and its input."""

    def __init__(self, enc: EncoderConfig, cfg: RecipeConfig):
        super().__init__()
        self.cfg, self.enc_cfg = cfg, enc
        if cfg.name == "data2vec2":
            from .data2vec2 import Student2

            self.student = Student2(enc, cfg)
            self.student_input = "input_ids"  # it masks by leaving tokens out
        else:
            self.student = Student(enc, cfg)
            self.student_input = "masked_input_ids"
        self.teacher = copy.deepcopy(self.student.encoder.encoder.layer)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout
        return self

    @torch.no_grad()
    def targets(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None, mask: torch.Tensor,
                teacher_input: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher pass on the unmasked input; fp32 targets ``[N, C]`` at the masked rows
        (of every clone, when ``mask`` has ``clones * B`` rows: one teacher pass per sample).
        ``teacher_input``: the embedding output the student computed (data2vec 2.0); None
        embeds ``input_ids`` with the shared embeddings, without dropout (data2vec)."""
        h = self.student.encoder.embeddings(input_ids) if teacher_input is None else teacher_input
        _, ffn = run_layers(self.teacher, h, padding_mask, collect_ffn=True)
        return build_targets(ffn[-self.cfg.top_k:], padding_mask=padding_mask, mask=mask,
                             layer_norm=self.cfg.norm(self.cfg.layer_norm),
                             final_norm=self.cfg.norm(self.cfg.final_norm))

    def loss_sum(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scale = self.cfg.loss_scale if self.cfg.loss_scale > 0 else None
        return regression_loss(pred, target, beta=self.cfg.loss_beta, scale=scale)

    @torch.no_grad()
    def ema_step(self, decay: float) -> None:
        # Under FSDP teacher and student blocks are sharded alike: update the local shards.
        local = lambda ps: [p.to_local() if hasattr(p, "to_local") else p for p in ps]
        ema_update_(local(self.teacher.parameters()), local(self.student.encoder.encoder.layer.parameters()), decay)

    @staticmethod
    def stats(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return representation_std(target), representation_std(pred.detach())
