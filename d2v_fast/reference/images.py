"""Eager references of the two image recipes (docs/images.md), written plainly and apart from the
engine's path: attention as ``softmax(q kᵀ/√d + bias) v`` (no SDPA), the mask token put in
with boolean indexing, visible patches taken row by row, the decoder's convs in a loop, the
targets with ``F.layer_norm``/``F.instance_norm`` layer by layer, ``F.smooth_l1_loss`` /
``F.mse_loss`` and a per-parameter EMA loop. Only the parameters (module tree of
``models.vision.VisionEncoder``) and the data pipeline (masks, augmentation: shared, not
under test) are the engine's.

The correctness oracle of ``d2v_fast.modalities.images``; the engine never imports it.
Dropout, attention dropout and stochastic depth are left out (the parity tests switch them
off): the reference draws nothing at random except the 2.0 mask noise, at the same point
of the step as the engine.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vision import VisionConfig, VisionEncoder
from .common import ReferenceBase, ReferenceUpdate


def _layer(layer, h: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``Data2VecVisionLayer`` (eval semantics): (block output, FFN output)."""
    B, T, C = h.shape
    H = layer.num_heads
    d = C // H
    x = F.layer_norm(h, (C,), layer.layernorm_before.weight, layer.layernorm_before.bias,
                     layer.layernorm_before.eps)
    sa = layer.attention.attention
    q = F.linear(x, sa.query.weight, sa.query.bias).view(B, T, H, d).permute(0, 2, 1, 3)
    k = F.linear(x, sa.key.weight).view(B, T, H, d).permute(0, 2, 1, 3)
    v = F.linear(x, sa.value.weight, sa.value.bias).view(B, T, H, d).permute(0, 2, 1, 3)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    a = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).reshape(B, T, C)
    a = layer.attention.output.dense(a)
    if layer.lambda_1 is not None:
        a = a * layer.lambda_1
    h = h + a
    ln = layer.layernorm_after
    ffn = layer.output.dense(F.gelu(layer.intermediate.dense(F.layer_norm(h, (C,), ln.weight, ln.bias, ln.eps))))
    f = ffn * layer.lambda_2 if layer.lambda_2 is not None else ffn
    return h + f, ffn


def _bias(enc: VisionEncoder) -> torch.Tensor | None:
    """The shared relative position bias [1, heads, T, T], looked up entry by entry's index."""
    rpb = enc.encoder.relative_position_bias
    if rpb is None:
        return None
    table, index = rpb.relative_position_bias_table, rpb.relative_position_index
    return table[index].permute(2, 0, 1).unsqueeze(0)


def _patches(enc: VisionEncoder, pixels: torch.Tensor) -> torch.Tensor:
    proj = enc.embeddings.patch_embeddings.projection
    return F.conv2d(pixels, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)


def _run(enc: VisionEncoder, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(final-layernorm output, block outputs, FFN outputs)."""
    bias = _bias(enc)
    blocks, ffns = [], []
    for layer in enc.encoder.layer:
        h, ffn = _layer(layer, h, bias)
        blocks.append(h)
        ffns.append(ffn)
    ln = enc.layernorm
    return F.layer_norm(h, h.shape[-1:], ln.weight, ln.bias, ln.eps), blocks, ffns


def _instance_norm_patches(y: torch.Tensor) -> torch.Tensor:
    """Per sample and channel over the patches (fairseq: BTC -> BCT, F.instance_norm)."""
    return F.instance_norm(y.transpose(1, 2)).transpose(1, 2)


def _norm(y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "instance":
        return _instance_norm_patches(y)
    if kind == "layer":
        return F.layer_norm(y, y.shape[-1:])
    return y


class _ReferenceBase(ReferenceBase):
    """The image teachers average the whole encoder, not only its blocks."""

    @torch.no_grad()
    def ema_step(self, decay: float) -> None:
        for ema_param, param in zip(self.ema.parameters(), self.encoder.parameters()):
            ema_param.mul_(decay)
            ema_param.add_(param.detach(), alpha=1 - decay)

    def _targets(self, pixels: torch.Tensor, which: str) -> torch.Tensor:
        """[B, N, C] fp32 targets for every patch (CLS dropped before any norm)."""
        cfg = self.cfg
        with torch.no_grad():
            h = _patches(self.ema, pixels)
            h = torch.cat([self.ema.embeddings.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
            if self.ema.embeddings.position_embeddings is not None:
                h = h + self.ema.embeddings.position_embeddings
            _, blocks, ffns = _run(self.ema, h)
            top = (blocks if which == "block" else ffns)[-cfg.top_k:]
            top = [_norm(t[:, 1:].float(), cfg.layer_norm) for t in top]
            y = sum(top) / len(top)
            return _norm(y, cfg.final_norm)


class ReferenceImages(_ReferenceBase):
    """data2vec v1 images (data2vec_vision ``beit/`` ``engine_for_cyclical.py``)."""

    ENGINE_NAMES = {"student.encoder.": "encoder.", "student.head.": "head.", "teacher.": "ema."}
    no_weight_decay = ("encoder.embeddings.cls_token",)  # beit/modeling_cyclical.py no_weight_decay

    def __init__(self, enc: VisionConfig, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionEncoder(enc)
        self.head = nn.Linear(enc.hidden_size, enc.hidden_size)
        self.ema = copy.deepcopy(self.encoder)
        self.ema.requires_grad_(False)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, masked patch count)."""
        y = self._targets(pixels, "block")[mask]
        emb = self.encoder.embeddings
        h = _patches(self.encoder, pixels).clone()
        h[mask] = emb.mask_token.reshape(-1).to(h.dtype)
        h = torch.cat([emb.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        x, _, _ = _run(self.encoder, h)
        pred = self.head(x[:, 1:][mask])
        loss = F.smooth_l1_loss(pred.float(), y, beta=self.cfg.loss_beta, reduction="sum")
        scale = self.cfg.loss_scale if self.cfg.loss_scale > 0 else 1 / math.sqrt(y.shape[-1])
        return loss * scale, mask.sum()


class ReferenceImages2(_ReferenceBase):
    """data2vec 2.0 images (fairseq ``models/data2vec2.py`` with ``modalities/images.py``)."""

    ENGINE_NAMES = {"student.encoder.": "encoder.", "student.decoder.convs.": "convs.",
                    "student.decoder.proj.": "proj.", "teacher.": "ema."}

    def __init__(self, enc: VisionConfig, cfg, groups: int = 16):
        super().__init__()
        self.cfg, self.grid = cfg, enc.grid
        self.encoder = VisionEncoder(enc)
        C = enc.hidden_size
        D = cfg.decoder_dim or C
        k = cfg.decoder_kernel
        self.convs = nn.ModuleList(nn.Conv2d(C if i == 0 else D, D, k, padding=k // 2, groups=groups)
                                   for i in range(cfg.decoder_layers))
        self.proj = nn.Linear(D, C)
        self.ema = copy.deepcopy(self.encoder)
        self.ema.requires_grad_(False)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        B = pixels.shape[0]
        R, N = mask.shape
        clones = R // B
        y_full = self._targets(pixels, "ffn")  # [B, N, C]
        y = y_full.repeat_interleave(clones, 0)[mask]

        emb = self.encoder.embeddings
        x = _patches(self.encoder, pixels)
        x = torch.cat([emb.cls_token.expand(B, -1, -1), x], dim=1) + emb.position_embeddings
        x = x.repeat_interleave(clones, 0)
        rows = [torch.cat([x[r, :1], x[r, 1:][~mask[r]]]) for r in range(R)]
        h, _, _ = _run(self.encoder, torch.stack(rows))
        C = h.shape[-1]
        cls = h[:, 0]
        full = torch.randn(R, N, C, device=h.device, dtype=h.dtype) * cfg.mask_noise_std
        full[~mask] = h[:, 1:].reshape(-1, C)
        g = full.transpose(1, 2).reshape(R, C, *self.grid)
        for conv in self.convs:
            out = F.gelu(F.layer_norm(conv(g).permute(0, 2, 3, 1), (conv.out_channels,)).permute(0, 3, 1, 2))
            g = out + g if out.shape == g.shape else out
        pred = self.proj(g.flatten(2).transpose(1, 2)[mask])
        scale = cfg.loss_scale if cfg.loss_scale > 0 else 1 / math.sqrt(C)
        loss = F.mse_loss(pred.float(), y, reduction="sum") * scale
        if cfg.cls_loss_weight > 0:
            cls_target = y_full.mean(1).repeat_interleave(clones, 0)
            per_row = F.mse_loss(cls.float(), cls_target, reduction="none").sum(-1) * scale
            loss = loss + cfg.cls_loss_weight * (per_row * mask.sum(1)).sum()
        return loss, mask.sum()


class ReferenceImageStep:
    """The reference model with AdamW (weight decay by ``optim.decay_biases_and_norms``),
    warmup + cosine, clipping and the per-parameter EMA loop: one optimizer update over a
    list of micro-batches (pixels already augmented, as the CPU loader makes them)."""

    def __init__(self, cfg, *, engine_state: dict | None = None, device: torch.device | str = "cpu"):
        t, r = cfg.train, cfg.recipe
        torch.manual_seed(t.seed)
        enc = VisionConfig(**{k: getattr(cfg.model, k) for k in VisionConfig.__dataclass_fields__})
        self.v2 = r.name == "data2vec2"
        self.model = (ReferenceImages2 if self.v2 else ReferenceImages)(enc, r)
        if engine_state is not None:
            self.model.load_engine_state(engine_state)
        self.device = torch.device(device)
        self.model.to(self.device).train()
        torch.manual_seed(t.seed + 1)  # the engine's rank-0 seed for what the step draws
        self.update = ReferenceUpdate(self.model, cfg)

    def __call__(self, micro_batches: list[dict]) -> float:
        n = sum(int(mb["mask"].sum()) for mb in micro_batches)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            pixels = mb["pixels"].to(self.device)
            if pixels.dtype == torch.uint8:  # augmented on the device, as the engine does on a GPU
                from ..data.images.augment import augment_batch

                pixels = augment_batch(pixels, mb["augment"], mb["augment_cfg"])
            loss, _ = self.model(pixels, mb["mask"].to(self.device))
            (loss / n).backward()
            total += loss.detach()
        self.update()
        return total / n  # a 0-dim tensor on the device: reading it is the caller's choice


def reference_image_losses(cfg, corpus, steps: int, engine_state: dict | None = None) -> list[float]:
    """Per-step losses of ``steps`` updates of the reference on the batches the engine sees
    (the image modality's own loader, augmentation in the worker, no worker processes)."""
    import dataclasses

    from ..modalities.images import ImagesModality

    cfg = copy.deepcopy(cfg)
    cfg.data.num_workers = 0
    cfg.train = dataclasses.replace(cfg.train, device="cpu")
    t = cfg.train
    step = ReferenceImageStep(cfg, engine_state=engine_state)
    micro = t.micro_batch_size or t.batch_size
    loader = ImagesModality().loader(corpus, cfg, micro_batch_size=micro, epoch=0, start=0, rank=0, world_size=1)
    it = iter(loader)
    return [float(step([next(it) for _ in range(t.batch_size // micro)])) for _ in range(steps)]
