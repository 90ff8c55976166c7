"""What both recipes share, for every modality: the recipe config, the regression head, the
student protocol and ``Data2Vec`` (student, EMA teacher, targets, loss, EMA step, statistics).

Nothing here knows tokens, waveforms or pixels. A modality's student (``d2v_fast.modalities``)
says which of its modules the teacher averages (``ema_source``), how the teacher runs on a
batch (``teacher_layers``) and how the student predicts (``forward``); the recipes
(``data2vec.Student``, ``data2vec2.Student2``) hold what an algorithm does the same way
everywhere.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

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
    decoder_groups: int = 1  # data2vec2: groups of the decoder convs (speech: 16)
    decoder_dropout: float = 0.0  # data2vec2: dropout on the encoder output before the decoder (training only)
    mask_noise_std: float = 0.01  # data2vec2: std of the noise put at masked positions for the decoder
    mask_patches: int = 0  # images data2vec: patches masked per image by BEiT block masking (120 of 196)
    mask_min_block: int = 16  # images data2vec: smallest BEiT mask block, in patches
    mask_prob_adjust: float = 0.0  # images data2vec2: extra share of visible-block centres drawn (fairseq 0.07)
    cls_loss_weight: float = 0.0  # images data2vec2: weight of the CLS loss against the mean patch loss

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


class StudentBase(nn.Module):
    """What the optimizer trains (and DDP/FSDP wraps): ``encoder`` (the Hugging-Face-shaped
    encoder that is exported) plus the recipe's head or decoder. A modality's student
    implements the hooks below; ``Data2Vec`` and the trainer use nothing else."""

    encoder: nn.Module
    # Where a student with layer drop draws which blocks to skip: None = the global RNG (seeded
    # per rank, so ranks skip different blocks, as DDP allows); under FSDP the trainer sets a
    # generator seeded alike on every rank, so all ranks skip the same blocks and their
    # per-block all-gathers and reduce-scatters stay in step.
    layerdrop_generator: torch.Generator | None = None

    def blocks(self) -> nn.ModuleList:
        """The student's transformer blocks: FSDP units, the flat buffer of the EMA, compile units."""
        raise NotImplementedError

    def ema_source(self) -> nn.Module:
        """What the teacher is an EMA of: a submodule of ``encoder``, or a fresh container
        (``nn.ModuleDict``, not registered here) of several. The teacher is a deep copy of it;
        the EMA pairs the two modules' ``parameters()`` in order."""
        raise NotImplementedError

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predictions ``[N, C]`` at the true entries of ``batch["mask"]`` (row-major), and
        the teacher's input when the student computed it (data2vec 2.0), else None."""
        raise NotImplementedError

    @torch.no_grad()
    def teacher_layers(self, teacher: nn.Module, batch: dict,
                       teacher_input: torch.Tensor | None) -> list[torch.Tensor]:
        """The teacher's per-layer outputs ``[B, T, C]`` that targets average, aligned with
        the T axis of ``batch["mask"]`` (the teacher is in eval mode, without gradients)."""
        raise NotImplementedError

    def target_padding(self, batch: dict) -> torch.Tensor | None:
        """Padding ``[B, T]`` of the teacher's outputs (kept out of instance-norm statistics)."""
        return batch.get("padding_mask")

    def extra_loss(self, batch: dict) -> torch.Tensor | None:
        """A summed loss term a recipe adds to the regression loss of this micro-batch's last
        forward and teacher pass (normalised with it by the global count of masked entries);
        None = none. data2vec 2.0 images: the CLS loss (``modalities/images.py``)."""
        return None


class Data2Vec(nn.Module):
    """A student, its EMA teacher, targets, loss and EMA step: the same for both recipes and
    every modality (the recipes differ in the student)."""

    def __init__(self, student: StudentBase, cfg: RecipeConfig):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.teacher = copy.deepcopy(student.ema_source())
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout
        return self

    @torch.no_grad()
    def targets(self, batch: dict, teacher_input: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 targets ``[N, C]`` at the masked rows (of every clone when ``batch["mask"]``
        has ``clones * B`` rows: one teacher pass per sample)."""
        layers = self.student.teacher_layers(self.teacher, batch, teacher_input)
        return build_targets(layers[-self.cfg.top_k:], padding_mask=self.student.target_padding(batch),
                             mask=batch["mask"], layer_norm=self.cfg.norm(self.cfg.layer_norm),
                             final_norm=self.cfg.norm(self.cfg.final_norm), count=batch.get("mask_rows"))

    def loss_sum(self, pred: torch.Tensor, target: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        """The summed regression loss, plus the student's ``extra_loss`` when ``batch`` is given."""
        scale = self.cfg.loss_scale if self.cfg.loss_scale > 0 else None
        loss = regression_loss(pred, target, beta=self.cfg.loss_beta, scale=scale)
        extra = self.student.extra_loss(batch) if batch is not None else None
        return loss if extra is None else loss + extra

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher parameters, the student parameters they average), local shards under FSDP."""
        local = lambda ps: [p.to_local() if hasattr(p, "to_local") else p for p in ps]
        return local(self.teacher.parameters()), local(self.student.ema_source().parameters())

    @torch.no_grad()
    def ema_step(self, decay: float) -> None:
        ema_update_(*self.ema_pairs(), decay)

    @staticmethod
    def stats(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return representation_std(target), representation_std(pred.detach())
