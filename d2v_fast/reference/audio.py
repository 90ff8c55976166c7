"""Eager references of both speech recipes (docs/speech.md), written plainly from the published
description and independently of the engine's path (``modalities/audio.py``, ``ops``): the
conv extractor, projection, positional conv and blocks spelled out with ``F.conv1d``,
``F.layer_norm``, ``F.linear`` and a softmax attention over the encoder's parameters; masks
applied with ``torch.where``, frames selected row by row with boolean indexing, clones made with
``repeat_interleave``, targets with ``F.instance_norm`` per layer, ``F.mse_loss``; an AdamW +
per-tensor EMA loop. The correctness oracle of the engine's speech recipes; the engine never
imports it. What it shares with the engine, on purpose: the encoder's parameter layout
(``AudioEncoder``, checked against Hugging Face elsewhere), the loader and its masks, and the
learning-rate schedule.

- data2vec (v1): masked frames take ``masked_spec_embed``; the teacher (EMA LayerNorm + EMA
  blocks, the student's positional conv) reads the unmasked projected features; Linear head.
- data2vec 2.0: features repeated per clone, masked frames zeroed, positional conv added over the
  full length, visible frames kept; the teacher (EMA positional conv + LayerNorm + blocks) reads
  the features once per sample; the decoder's input is dropped out and put back among N(0, std)
  noise rows; decoder convs with groups, residuals where the widths agree, Linear at the masked rows.

Attention dropout and layerdrop are not modelled (the parity tests turn them off): their random
draws cannot be matched by an independent attention implementation.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.audio import AudioEncoder, AudioEncoderConfig
from .common import ReferenceUpdate

_CONV_EPS = 1e-5


# ----------------------------------------------------------------------------- the encoder, plainly
def conv_features(enc: AudioEncoder, wav: torch.Tensor) -> torch.Tensor:
    """Waveform [B, S] -> projected frame features [B, T, C]."""
    x = wav[:, None, :]
    for layer, stride in zip(enc.feature_extractor.conv_layers, enc.config.conv_stride):
        x = F.conv1d(x, layer.conv.weight, None, stride=stride)
        y = F.layer_norm(x.transpose(1, 2), (x.shape[1],), layer.layer_norm.weight, layer.layer_norm.bias, _CONV_EPS)
        x = F.gelu(y).transpose(1, 2)
    x = x.transpose(1, 2)
    fp = enc.feature_projection
    x = F.layer_norm(x, (x.shape[-1],), fp.layer_norm.weight, fp.layer_norm.bias, enc.config.layer_norm_eps)
    return F.linear(x, fp.projection.weight, fp.projection.bias)


def positional_conv(pos_layers: nn.ModuleList, cfg: AudioEncoderConfig, x: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> the positional conv's output [B, T, C] (not yet added)."""
    k, T = cfg.pos_conv_kernel, x.shape[1]
    y = x.transpose(1, 2)
    for layer in pos_layers:
        y = F.conv1d(y, layer.conv.weight, layer.conv.bias, padding=k // 2, groups=cfg.pos_conv_groups)[..., :T]
        y = F.gelu(F.layer_norm(y.transpose(1, 2), (y.shape[1],), eps=_CONV_EPS)).transpose(1, 2)
    return y.transpose(1, 2)


def block(layer: nn.Module, cfg: AudioEncoderConfig, h: torch.Tensor, training: bool):
    """One post-LN block with softmax attention written out: (output, FFN output)."""
    B, T, C = h.shape
    H = cfg.num_heads
    at = layer.attention
    split = lambda t: t.view(B, T, H, C // H).transpose(1, 2)
    q = split(F.linear(h, at.q_proj.weight, at.q_proj.bias))
    k = split(F.linear(h, at.k_proj.weight, at.k_proj.bias))
    v = split(F.linear(h, at.v_proj.weight, at.v_proj.bias))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), dim=-1)
    a = (probs @ v).transpose(1, 2).reshape(B, T, C)
    a = F.linear(a, at.out_proj.weight, at.out_proj.bias)
    ln1, ln2 = layer.layer_norm, layer.final_layer_norm
    h = F.layer_norm(h + F.dropout(a, cfg.dropout, training), (C,), ln1.weight, ln1.bias, cfg.layer_norm_eps)
    ff = layer.feed_forward
    inner = F.dropout(F.gelu(F.linear(h, ff.intermediate_dense.weight, ff.intermediate_dense.bias)),
                      cfg.activation_dropout, training)
    ffn = F.linear(inner, ff.output_dense.weight, ff.output_dense.bias)
    h = F.layer_norm(h + F.dropout(ffn, cfg.dropout, training), (C,), ln2.weight, ln2.bias, cfg.layer_norm_eps)
    return h, ffn


def instance_normed_mean(layer_outputs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of each [B, T, C] output normalised over T per sample and channel."""
    normed = [F.instance_norm(x.float().transpose(1, 2), eps=1e-5).transpose(1, 2) for x in layer_outputs]
    return sum(normed) / len(normed)


def mse_sum(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (F.mse_loss(pred.float(), y, reduction="none").sum(-1) / math.sqrt(pred.shape[-1])).sum()


def spread(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x.float().reshape(-1, x.shape[-1]).var(dim=0) + 1e-6).mean()


# ----------------------------------------------------------------------------- the recipes
class ReferenceAudioData2Vec(nn.Module):
    """data2vec (v1) speech, as ``base_librispeech.yaml``."""

    ENGINE_NAMES = {"student.encoder.": "encoder.", "student.head.": "head.",
                    "teacher.layer_norm.": "ema_layer_norm.", "teacher.layers.": "ema_layers."}

    def __init__(self, enc: AudioEncoderConfig, cfg):
        super().__init__()
        self.cfg, self.enc_cfg = cfg, enc
        self.encoder = AudioEncoder(enc)
        self.head = nn.Linear(enc.hidden_size, enc.hidden_size)
        self.ema_layer_norm = copy.deepcopy(self.encoder.encoder.layer_norm).requires_grad_(False)
        self.ema_layers = copy.deepcopy(self.encoder.encoder.layers).requires_grad_(False)

    def ema_modules(self):
        stack = self.encoder.encoder
        return [(self.ema_layer_norm, stack.layer_norm), (self.ema_layers, stack.layers)]

    def load_engine_state(self, state: dict) -> None:
        renamed = {}
        for k, v in state.items():
            for theirs, ours in self.ENGINE_NAMES.items():
                if k.startswith(theirs):
                    renamed[ours + k[len(theirs):]] = v
                    break
            else:
                raise KeyError(f"engine state key {k} has no reference name")
        self.load_state_dict(renamed, strict=True)

    @torch.no_grad()
    def ema_step(self, decay: float) -> None:
        for teacher, student in self.ema_modules():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.copy_(decay * t + (1 - decay) * s)

    def embed(self, features, frame_mask, layer_norm, training):
        cfg = self.enc_cfg
        h = F.dropout(features, cfg.feature_dropout, training)
        if frame_mask is not None:
            h = torch.where(frame_mask[..., None], self.encoder.masked_spec_embed, h)
        h = h + positional_conv(self.encoder.encoder.pos_conv_embed.layers, cfg, h)
        h = F.layer_norm(h, (h.shape[-1],), layer_norm.weight, layer_norm.bias, cfg.layer_norm_eps)
        return F.dropout(h, cfg.dropout, training)

    def forward(self, wav: torch.Tensor, mask: torch.Tensor):
        """(summed loss, masked frames, target std, prediction std)."""
        features = conv_features(self.encoder, wav)
        h = self.embed(features, mask, self.encoder.encoder.layer_norm, self.training)
        for layer in self.encoder.encoder.layers:
            h, _ = block(layer, self.enc_cfg, h, self.training)
        pred = self.head(h[mask])
        with torch.no_grad():
            t = self.embed(features.detach(), None, self.ema_layer_norm, False)
            ffn = []
            for layer in self.ema_layers:
                t, f = block(layer, self.enc_cfg, t, False)
                ffn.append(f)
            y = instance_normed_mean(ffn[-self.cfg.top_k:])[mask]
        return mse_sum(pred, y), mask.sum(), spread(y), spread(pred.detach())


class ReferenceAudioData2Vec2(ReferenceAudioData2Vec):
    """data2vec 2.0 speech, as ``base_audio_only_task.yaml`` (without ALiBi)."""

    ENGINE_NAMES = {"student.encoder.": "encoder.", "student.decoder.": "decoder.",
                    "teacher.pos_conv_embed.": "ema_pos_conv.", "teacher.layer_norm.": "ema_layer_norm.",
                    "teacher.layers.": "ema_layers."}

    def __init__(self, enc: AudioEncoderConfig, cfg):
        nn.Module.__init__(self)
        self.cfg, self.enc_cfg = cfg, enc
        self.encoder = AudioEncoder(enc)
        self.encoder.masked_spec_embed.requires_grad_(False)  # 2.0 never uses it
        C, D = enc.hidden_size, cfg.decoder_dim or enc.hidden_size
        self.decoder = nn.Module()
        self.decoder.convs = nn.ModuleList(nn.Conv1d(C if i == 0 else D, D, cfg.decoder_kernel, groups=cfg.decoder_groups,
                                                     padding=cfg.decoder_kernel // 2)
                                           for i in range(cfg.decoder_layers))
        self.decoder.proj = nn.Linear(D, C)
        stack = self.encoder.encoder
        self.ema_pos_conv = copy.deepcopy(stack.pos_conv_embed).requires_grad_(False)
        self.ema_layer_norm = copy.deepcopy(stack.layer_norm).requires_grad_(False)
        self.ema_layers = copy.deepcopy(stack.layers).requires_grad_(False)

    def ema_modules(self):
        stack = self.encoder.encoder
        return [(self.ema_pos_conv, stack.pos_conv_embed), (self.ema_layer_norm, stack.layer_norm),
                (self.ema_layers, stack.layers)]

    def decode(self, full: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = full.transpose(1, 2)
        for conv in self.decoder.convs:
            y = F.conv1d(h, conv.weight, conv.bias, padding=conv.padding[0], groups=conv.groups)
            y = F.gelu(F.layer_norm(y.transpose(1, 2), (y.shape[1],), eps=1e-5)).transpose(1, 2)
            h = h + y if h.shape[1] == y.shape[1] else y
        return self.decoder.proj(h.transpose(1, 2)[mask])

    def forward(self, wav: torch.Tensor, mask: torch.Tensor):
        cfg, enc = self.cfg, self.enc_cfg
        B, R = wav.shape[0], mask.shape[0]
        clones = R // B
        features = conv_features(self.encoder, wav)
        x = F.dropout(features.repeat_interleave(clones, 0), enc.feature_dropout, self.training)
        x = torch.where(mask[..., None], torch.zeros_like(x), x)
        x = x + positional_conv(self.encoder.encoder.pos_conv_embed.layers, enc, x)
        h = torch.stack([x[r][~mask[r]] for r in range(R)])  # equal visible counts per row
        ln = self.encoder.encoder.layer_norm
        h = F.dropout(F.layer_norm(h, (h.shape[-1],), ln.weight, ln.bias, enc.layer_norm_eps), enc.dropout,
                      self.training)
        for layer in self.encoder.encoder.layers:
            h, _ = block(layer, enc, h, self.training)
        h = F.dropout(h, cfg.decoder_dropout, self.training)
        full = torch.randn(R, x.shape[1], x.shape[2], dtype=h.dtype, device=h.device) * cfg.mask_noise_std
        for r in range(R):
            full[r][~mask[r]] = h[r]
        pred = self.decode(full, mask)
        with torch.no_grad():
            t = features.detach()
            t = t + positional_conv(self.ema_pos_conv.layers, enc, t)
            t = F.layer_norm(t, (t.shape[-1],), self.ema_layer_norm.weight, self.ema_layer_norm.bias,
                             enc.layer_norm_eps)
            ffn = []
            for layer in self.ema_layers:
                t, f = block(layer, enc, t, False)
                ffn.append(f)
            y = instance_normed_mean(ffn[-cfg.top_k:]).repeat_interleave(clones, 0)[mask]
        return mse_sum(pred, y), mask.sum(), spread(y), spread(pred.detach())


# ----------------------------------------------------------------------------- the loop
class ReferenceAudioStep:
    """The reference model, AdamW (weight decay as ``optim.decay_biases_and_norms``), the run's
    learning-rate schedule, optional clipping and the EMA loop; one call = one update over a
    list of micro-batches, returning the loss."""

    def __init__(self, cfg, engine_state: dict | None = None, *, device: torch.device | str = "cpu"):
        t, r = cfg.train, cfg.recipe
        torch.manual_seed(t.seed)
        enc = AudioEncoderConfig(**dataclasses.asdict(cfg.model))
        self.model = (ReferenceAudioData2Vec2 if r.name == "data2vec2" else ReferenceAudioData2Vec)(enc, r)
        if engine_state is not None:
            self.model.load_engine_state(engine_state)
        self.device = torch.device(device)
        self.model.to(self.device).train()
        torch.manual_seed(t.seed + 1)  # the engine's rank-0 dropout seed
        self.update = ReferenceUpdate(self.model, cfg)

    def __call__(self, micro_batches: list[dict]) -> torch.Tensor:
        n = sum(int(mb["mask"].sum()) for mb in micro_batches)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            loss = self.model(mb["waveform"].to(self.device), mb["mask"].to(self.device))[0]
            (loss / n).backward()
            total += loss.detach()
        self.update()
        return total / n


def reference_audio_losses(cfg, corpus, steps: int, engine_state: dict | None = None) -> list[float]:
    """Per-step losses of ``steps`` updates on the batches the engine sees (the speech
    modality's loader, no workers, epoch after epoch)."""
    from ..modalities import get_modality

    t = cfg.train
    step = ReferenceAudioStep(cfg, engine_state)
    micro = t.micro_batch_size or t.batch_size
    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))

    def micro_batches():
        epoch = 0
        while True:
            yield from get_modality("audio").loader(corpus, run_cfg, micro_batch_size=micro, epoch=epoch, start=0,
                                                    rank=0, world_size=1)
            epoch += 1

    it = micro_batches()
    return [float(step([next(it) for _ in range(t.batch_size // micro)])) for _ in range(steps)]
