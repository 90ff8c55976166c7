"""Speech: the ``Data2VecAudioModel``-shaped encoder (``models/audio.py``), prepared speech
corpora and the built-in eSpeak NG corpus (``data/audio/``), the frame masks of both published
speech recipes made in the loader workers, students for data2vec (v1) and data2vec 2.0, and
Hugging Face ``Data2VecAudioModel`` interop.

Sources of the recipe values (docs/speech.md): fairseq ``examples/data2vec/config/audio/pretraining/
base_librispeech.yaml`` with ``models/data2vec_audio.py`` (v1) and ``config/v2/
base_audio_only_task.yaml`` with ``models/data2vec2.py`` and ``models/modalities/audio.py`` (2.0).

Where we differ from the published code, and why (README, "What differs from the published
recipes"):
- 2.0: no ALiBi attention bias (``use_alibi_encoder``); ``Data2VecAudioModel`` cannot express
  it, and export must be exact.
- Masks are drawn on the loader's crop (``data/audio/masking.py``), not on the whole utterance
  before the crop.
- Layerdrop under ``--parallel fsdp``: a skipped layer's parameters get no gradient there (under
  DDP, as in fairseq's ``legacy_ddp``, they get zero gradients and Adam still steps them).
- Batches are counted in utterances (fairseq counts samples, ``max_tokens``); the presets pick
  utterance counts that give about the published audio per update at LibriSpeech's mean
  utterance length (12.3 s).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import UsageError
from ..models.audio import AUDIO_PRESETS, AudioEncoder, AudioEncoderConfig, num_frames
from ..models.blocks import attention_mask, run_blocks
from ..recipes.data2vec import Student
from ..recipes.data2vec2 import Student2
from . import Modality

# ----------------------------------------------------------------------------- presets
SIZE_PRESETS: dict[str, dict[str, dict]] = {"base": {}, "large": {}, "tiny": {}}

# Two CPU cores: 2 s crops (99 frames), 8 utterances, no layerdrop; a short, quickly annealed
# EMA so the loss moves within a few hundred steps. (Per recipe, because a recipe's "*" values
# come after the size's.)
_TINY = {
    "model": {"layerdrop": 0.0},
    "data": {"max_samples": 32_000},
    "optim": {"lr": 1e-3, "total_steps": 0},
    "train": {"batch_size": 8, "max_steps": 300, "log_every": 10, "ckpt_every": 100, "collapse_warmup": 100},
}
# Both published speech models stop on a collapse only after 5,000 updates (``num_updates > 5000``
# in models/data2vec_audio.py and models/data2vec2.py), at min_target_var 0.1, min_pred_var 0.01.
_GUARD = {"collapse_warmup": 5000, "min_target_var": 0.1, "min_pred_var": 0.01}
_TINY_EMA = {"ema_decay": 0.998, "ema_end_decay": 0.9995, "ema_anneal_end_step": 300}

_V1 = {
    # base_librispeech.yaml
    "recipe": {"name": "data2vec", "top_k": 8, "layer_norm": "instance", "final_norm": "none",
               "head_hidden_mult": 0, "loss_beta": 0.0, "loss_scale": 0.0, "ema_decay": 0.999,
               "ema_end_decay": 0.9999, "ema_anneal_end_step": 30_000, "mask_prob": 0.65, "mask_span": 10,
               "clones": 1},
    "optim": {"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01, "decay_biases_and_norms": True,
              "schedule": "tri_stage", "tri_stage_phases": (0.03, 0.9, 0.07), "warmup_steps": 0,
              "total_steps": 400_000, "clip_norm": 0.0},
    "data": {"max_samples": 320_000},
    # max_tokens 3.8M samples x 16 GPUs ~ 63 min of audio ~ 304 utterances of 12.3 s
    "train": {"batch_size": 304, "max_steps": 400_000, **_GUARD},
}
_V2 = {
    # base_audio_only_task.yaml (modalities.audio and its decoder)
    "recipe": {"name": "data2vec2", "top_k": 8, "layer_norm": "instance", "final_norm": "none",
               "head_hidden_mult": 0, "loss_beta": 0.0, "loss_scale": 0.0, "ema_decay": 0.999,
               "ema_end_decay": 0.99999, "ema_anneal_end_step": 75_000, "mask_prob": 0.5, "mask_span": 5,
               "mask_prob_adjust": 0.05, "clones": 8, "decoder_layers": 4, "decoder_kernel": 7, "decoder_dim": 384, "decoder_groups": 16,
               "decoder_dropout": 0.1, "mask_noise_std": 0.01},
    # plain adam with fp16 (FP16Optimizer flattens every parameter into one tensor): every
    # parameter decays; the per-parameter optim_overrides apply only to the composite optimizer
    "optim": {"lr": 7.5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01, "decay_biases_and_norms": True,
              "schedule": "cosine", "warmup_steps": 8000, "total_steps": 400_000, "clip_norm": 0.0},
    "data": {"max_samples": 320_000},
    # max_tokens 1M samples x 8 GPUs ~ 8.3 min of audio ~ 40 utterances of 12.3 s (x 8 clones)
    "train": {"batch_size": 40, "max_steps": 400_000, **_GUARD},
}
RECIPE_PRESETS: dict[str, dict[str, dict[str, dict]]] = {
    "data2vec": {
        "*": _V1,
        # no data2vec large speech config was checked; large uses the base recipe
        # lr 3e-4 cosine to 0 over the 300 steps (30 warmup): at the published schedule's shape
        # (tri-stage, lr held at its peak for 90% of the run) the loss fell to ~0.6 by step 80
        # and rose back to ~3 from step ~110 as the student's front end, which the teacher
        # reads, kept moving (benchmarks/results/audio-v1-tiny-loss-checks-cpu.json)
        "tiny": {**_TINY, "recipe": {"top_k": 3, **_TINY_EMA},
                 "optim": {**_TINY["optim"], "lr": 3e-4, "schedule": "cosine", "warmup_steps": 30}},
    },
    "data2vec2": {
        "*": _V2,
        "tiny": {**_TINY, "recipe": {"top_k": 3, "clones": 4, "decoder_dim": 64, **_TINY_EMA},
                 "optim": {**_TINY["optim"], "warmup_steps": 30}},
    },
}


# ----------------------------------------------------------------------------- masks
def expected_mask_fraction(recipe) -> float:
    """The fraction of a crop's frames the recipe masks. data2vec 2.0: exactly ``mask_prob``
    (``int(mask_prob * T)`` per row, ``block_masks``). data2vec (v1): ``1 - exp(-mask_prob)``,
    what ``mask_prob * T / span`` overlapping spans at random starts cover (0.478 at 0.65),
    before the thinning to the batch's smallest count, which leaves 40-46% (measured at
    T = 250-999 frames for batches of 8-40 utterances, ``span_masks``)."""
    if recipe.name == "data2vec2":
        return float(recipe.mask_prob)
    return 1.0 - math.exp(-recipe.mask_prob)


class FrameMasks:
    """The recipe's frame masks for a cropped micro-batch, made in the loader workers:
    ``mask`` bool ``[clones * B, T]`` (clones of a sample adjacent, the same count in every row),
    ``padding_mask`` None (batches are cropped, never padded) and ``kept`` (visible frames per row).
    data2vec (v1): ``span_masks``; data2vec 2.0: ``block_masks`` (``data/audio/masking.py``)."""

    def __init__(self, recipe, seed: int):
        self.mask_prob, self.span, self.seed = recipe.mask_prob, recipe.mask_span, seed
        self.blocks = recipe.name == "data2vec2"
        self.clones = recipe.clones if self.blocks else 1
        self.adjust = recipe.mask_prob_adjust

    def __call__(self, frames: int, indices: torch.Tensor, epoch: int) -> dict:
        from ..data.audio.masking import block_masks, span_masks

        try:
            if self.blocks:
                mask = block_masks(frames, indices, mask_prob=self.mask_prob, span=self.span,
                                   mask_prob_adjust=self.adjust, seed=self.seed, epoch=epoch, clones=self.clones)
            else:
                mask = span_masks(frames, indices, mask_prob=self.mask_prob, span=self.span, seed=self.seed,
                                  epoch=epoch)
        except ValueError as err:
            raise UsageError(f"--data.max_samples / corpus: {err}") from None
        return {"mask": mask, "padding_mask": None, "kept": frames - int(mask[0].sum())}


# ----------------------------------------------------------------------------- students
def run_layers(layers: nn.ModuleList, h: torch.Tensor, padding_mask: torch.Tensor | None, *,
               layerdrop: float = 0.0, collect_ffn: bool = False,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The post-LN blocks in training; with ``layerdrop`` > 0 each is skipped with that
    probability (one draw per block from ``generator``, else the global RNG, seeded per rank
    by the trainer). A skipped block adds ``0 * sum(parameters)``: every parameter stays in the
    graph, as DDP needs (not under FSDP2, whose sharded parameters need no help; there every
    rank must skip the same blocks: ``StudentBase.layerdrop_generator``)."""
    return run_blocks(layers, h, attention_mask(padding_mask, h), collect="ffn" if collect_ffn else None,
                      layerdrop=layerdrop, generator=generator, keep_dropped_in_graph=True)


class AudioStudent(Student):
    """data2vec (v1) speech: masked frames take the learned ``masked_spec_embed``; the head is
    Linear(C, C). The teacher is an EMA of the encoder LayerNorm and the blocks; the positional
    conv is the student's (fairseq ``ema_layers_only`` copies it every step rather than averaging
    it); it reads the student's projected frame features of the unmasked input (before the
    input dropout), through the positional conv, the EMA LayerNorm and the EMA blocks, in eval mode."""

    def __init__(self, enc: AudioEncoderConfig, cfg):
        super().__init__(AudioEncoder(enc), cfg, enc.hidden_size, enc.init_std)

    def blocks(self):
        return self.encoder.encoder.layers

    def ema_source(self):
        return nn.ModuleDict({"layer_norm": self.encoder.encoder.layer_norm, "layers": self.encoder.encoder.layers})

    def masked_hidden(self, batch: dict) -> torch.Tensor:
        return self._encode(batch)[0]

    def _encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.frame_features(batch["waveform"])
        pad = batch.get("padding_mask")
        h = self.encoder.embed(features, batch["mask"], pad)
        layerdrop = self.encoder.config.layerdrop if self.training else 0.0
        return run_layers(self.blocks(), h, pad, layerdrop=layerdrop, generator=self.layerdrop_generator)[0], features

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions at the masked frames, and the frame features for the teacher (computed
        once: the conv extractor is most of a small model's cost)."""
        h, features = self._encode(batch)
        return self.head(ops.masked_gather(h, batch["mask"], batch.get("mask_rows"))), features.detach()

    @torch.no_grad()
    def teacher_layers(self, teacher, batch, teacher_input):
        pad = batch.get("padding_mask")
        h = self.encoder.embed(teacher_input, None, pad, layer_norm=teacher["layer_norm"], dropout=False)
        return run_layers(teacher["layers"], h, pad, collect_ffn=True)[1]


class AudioDecoder(nn.Module):
    """data2vec 2.0's speech decoder (fairseq ``Decoder1d``): ``layers`` x [Conv1d(-> D, kernel,
    groups, same padding) -> LayerNorm (no affine) -> GELU], each block's input added to its
    output where the widths agree (from the second block on when D != C), then Linear(D -> C) at
    the masked rows. PyTorch's default initialisation, as fairseq resets the decoder."""

    def __init__(self, dim: int, decoder_dim: int, layers: int, kernel: int, groups: int, eps: float = 1e-5):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"decoder kernel {kernel}: must be odd (same-length convolution)")
        self.eps = eps
        self.convs = nn.ModuleList(nn.Conv1d(dim if i == 0 else decoder_dim, decoder_dim, kernel,
                                             padding=kernel // 2, groups=groups) for i in range(layers))
        self.proj = nn.Linear(decoder_dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
        h = x.transpose(1, 2)  # [R, C, T]
        for conv in self.convs:
            y = conv(h)
            y = F.gelu(F.layer_norm(y.transpose(1, 2), y.shape[1:2], eps=self.eps)).transpose(1, 2)
            h = y + h if y.shape[1] == h.shape[1] else y
        return self.proj(ops.masked_gather(h.transpose(1, 2), mask, count))


class AudioStudent2(Student2):
    """data2vec 2.0 speech: the frame features of each sample are repeated for its clones, the
    masked frames zeroed, the positional conv run over the full length and added, and only the
    visible frames (the same count in every row) go through the encoder LayerNorm and the blocks.
    The teacher (EMA of the positional conv, the encoder LayerNorm and the blocks: fairseq
    ``ema_encoder_only: false, ema_local_encoder: false``) reads the student's frame features,
    detached, once per sample. ``masked_spec_embed`` is unused (frozen; exported as initialised)."""

    def __init__(self, enc: AudioEncoderConfig, cfg):
        super().__init__(AudioEncoder(enc), cfg)
        self.encoder.masked_spec_embed.requires_grad_(False)
        self.decoder = AudioDecoder(enc.hidden_size, cfg.decoder_dim or enc.hidden_size, cfg.decoder_layers,
                                    cfg.decoder_kernel, cfg.decoder_groups)

    def blocks(self):
        return self.encoder.encoder.layers

    def ema_source(self):
        stack = self.encoder.encoder
        return nn.ModuleDict({"pos_conv_embed": stack.pos_conv_embed, "layer_norm": stack.layer_norm,
                              "layers": stack.layers})

    def encode_visible(self, batch: dict):
        wav, mask = batch["waveform"], batch["mask"]
        enc = self.encoder
        B, R = wav.shape[0], mask.shape[0]
        features = enc.frame_features(wav)
        C = features.shape[-1]
        x = features.repeat_interleave(R // B, 0) if R != B else features
        x = F.dropout(x, enc.config.feature_dropout, self.training)
        x = x.masked_fill(mask[..., None], 0.0)
        x = x + enc.encoder.pos_conv_embed(x)
        keep = ~mask
        k = batch["kept"] if "kept" in batch else int(keep[0].sum())
        h = ops.masked_gather(x, keep, R * k).view(R, k, C)  # every row keeps k: no second sync
        h = F.dropout(enc.encoder.layer_norm(h), enc.config.dropout, self.training)
        layerdrop = enc.config.layerdrop if self.training else 0.0
        h = run_layers(self.blocks(), h, None, layerdrop=layerdrop, generator=self.layerdrop_generator)[0]
        return h, None, keep, features.detach()

    @torch.no_grad()
    def teacher_layers(self, teacher, batch, teacher_input):
        h = teacher_input + teacher["pos_conv_embed"](teacher_input)
        h = teacher["layer_norm"](h)
        return run_layers(teacher["layers"], h, batch.get("padding_mask"), collect_ffn=True)[1]


# ----------------------------------------------------------------------------- FLOPs
def conv_front_flops(m: AudioEncoderConfig, num_samples: int) -> tuple[int, int]:
    """(forward FLOPs of the conv extractor + projection for one utterance, its frame count)."""
    flops, length, c_in = 0, num_samples, 1
    for c, k, s in zip(m.conv_dim, m.conv_kernel, m.conv_stride):
        length = (length - k) // s + 1
        flops += 2 * length * c * c_in * k
        c_in = c
    return flops + 2 * length * m.conv_dim[-1] * m.hidden_size, length


def model_flops_per_frame(cfg) -> float:
    """Model FLOPs (2 per multiply-add) of one training step per input frame, for an utterance
    cropped to ``data.max_samples`` (the tiny preset's crops always are; longer crops cost more
    per frame through attention). Backward = 2x forward; the first conv's input gradient is
    counted though never needed (under 1%).

    data2vec: student conv front end, positional conv and blocks fwd+bwd; teacher positional
    conv (the student's, again) and blocks forward; head on the masked frames. data2vec 2.0: the
    conv front end once per sample; the positional conv over every clone's full length; the
    blocks on each clone's visible frames; the decoder convs over every clone's full length and
    its projection on the masked frames; the teacher's positional conv and blocks once per sample."""
    m, r = cfg.model, cfg.recipe
    C, L, F_ = m.hidden_size, m.num_layers, m.ffn_size
    front, T = conv_front_flops(m, cfg.data.max_samples)
    T = max(T, 1)
    pos = m.pos_conv_depth * 2 * T * C * (C // m.pos_conv_groups) * m.pos_conv_kernel

    def blocks(t: float) -> float:  # forward of the blocks on t frames
        return L * (2 * t * (4 * C * C + 2 * C * F_) + 4 * t * t * C)

    masked = expected_mask_fraction(r)
    teacher = pos + blocks(T)
    if r.name != "data2vec2":
        total = 3 * (front + pos + blocks(T)) + teacher + 3 * 2 * C * C * masked * T
        return total / T
    D = r.decoder_dim or C
    convs = sum(2 * T * (C if i == 0 else D) * D // r.decoder_groups * r.decoder_kernel for i in range(r.decoder_layers))
    keep = (1 - masked) * T
    student = 3 * front + r.clones * 3 * (pos + blocks(keep) + convs + 2 * D * C * masked * T)
    return (student + teacher) / T


# ----------------------------------------------------------------------------- probe
PROBE_BATCH = 32  # utterances of 3 s per forward pass


@torch.no_grad()
def pooled_speech_features(encoder: AudioEncoder, task, *, batch_size: int = PROBE_BATCH,
                           device="cpu", tick=None) -> torch.Tensor:
    """``[N, C]`` float32 on the CPU: each utterance's last hidden state averaged over its
    frames. Only utterances of the same length share a batch: nothing is padded, because
    padding would reach the real frames through the stacked positional convolutions (each
    utterance's features are then those of the utterance alone, as in Hugging Face with
    one utterance per call). Batch by batch; only the pooled vectors are kept. The encoder
    is left in the mode it came in."""
    corpus = task.corpus
    lengths = corpus.lengths.tolist() if hasattr(corpus, "lengths") else [len(w) for w in corpus]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) == batch_size or lengths[i] != lengths[cur[0]]):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    was_training = encoder.training
    encoder.eval()
    out = torch.empty(len(lengths), encoder.config.hidden_size)
    try:
        for rows in batches:
            wav = torch.from_numpy(np.stack([np.asarray(corpus[i], dtype=np.float32) for i in rows]))
            out[torch.tensor(rows)] = encoder(wav.to(device)).mean(1).float().cpu()
            if tick is not None:  # progress
                tick(len(rows))
    finally:
        encoder.train(was_training)
    return out


# One random init for the floor by default (text averages 3): the tiny speech job's margins
# were 5-10 points on every seed (benchmarks/results/probe-default-job-audio-cpu.json), far
# above one draw's spread, and each floor costs a pass over the task's recordings.
SPEECH_FLOOR_INITS = 1


def probe_speech(encoder: AudioEncoder, task, *, floor_inits: int | None = None, seed: int = 0, device="cpu",
                 progress: bool = False) -> dict:
    """Linear probe (``d2v_fast.linear_probe``) of the frozen encoder on a speech task
    (``data/audio/probe_task.py``), and for the floor the same architecture at ``floor_inits``
    random initialisations (seeds from ``seed``; default ``SPEECH_FLOOR_INITS``; the global
    RNG is left alone)."""
    from ..linear_probe import probe_with_floor

    head = {"task": f"{task.source} ({task.record.get('label', 'labels')})", "classes": len(task.classes),
            "examples": {s: len(task.indices(s)) for s in ("train", "val", "test")}, "unit": "utterances"}
    return probe_with_floor(encoder, task, lambda enc, tick: pooled_speech_features(enc, task, device=device, tick=tick),
                            lambda: AudioEncoder(encoder.config).to(device), head,
                            floor_inits=SPEECH_FLOOR_INITS if floor_inits is None else floor_inits, seed=seed,
                            progress=progress)


def is_speech_model(path) -> bool:
    """Whether ``path`` is a speech run directory or a ``Data2VecAudioModel`` directory."""
    from ..linear_probe import is_model_dir

    return is_model_dir(path, "audio", "data2vec-audio")


def speech_held_out(run_config: dict, task) -> bool | None:
    """Whether the run cannot have pretrained on the probe's texts: True for a built-in speech
    corpus (its texts stop before the reserved modules), None for any other corpus."""
    from ..data.audio.corpus import read_audio_meta

    data_dir = run_config.get("data_dir")
    if not data_dir:
        return None
    try:
        meta = read_audio_meta(Path(data_dir))
    except UsageError:
        return None
    source = str(((meta.get("source") or {}).get("inputs") or [""])[0])
    if "builtin" not in meta or not source.startswith("espeak-ng:") or ":n" not in source:
        return None
    try:
        texts = int(source.rsplit(":n", 1)[1])  # the passages it read, before any was dropped
    except ValueError:
        return None
    # every built-in corpus reads the first passages before the reserved modules; one made
    # before they were reserved read past them only when it asked for more than that
    return texts <= task.record.get("pretraining_texts_available", 0)


def probe_speech_path(path, *, task: str | None = None, seed: int = 0, device: str = "cpu", out=None,
                      floor_inits: int | None = None, progress: bool = False) -> dict:
    """``python -m d2v_fast.probe`` for a speech run directory or a ``Data2VecAudioModel``
    directory, on the built-in speaker task or a user's (``task``: a JSON-lines file of
    ``audio`` and ``label``); a run directory (or ``out``) gets probe.json."""
    from ..data.audio import probe_task as speech_probe
    from ..pretrained import load_pretrained
    from ..models.audio import read_hf_dir
    from ..linear_probe import PROBE_FILE, write_result

    builtin = task is None or str(task) == "builtin"
    # a bad task file stops before the model is read
    loaded = None if builtin else speech_probe.read_user_speech_task(task)
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        hf = {}
    if not isinstance(hf, dict):
        hf = {}
    if hf.get("model_type") == "data2vec-audio":
        kind = "hf"
        try:
            enc_cfg, weights = read_hf_dir(path)
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise UsageError(f"probe {path}: {err}") from None
        encoder = AudioEncoder(enc_cfg)
        state = encoder.state_dict()
        weights.setdefault("masked_spec_embed", state["masked_spec_embed"])  # unused by the forward pass
        encoder.load_state_dict(weights)
        encoder.eval()
    else:
        kind = "run"
        encoder = load_pretrained(path)
    if builtin:
        # the size is read here, not bound at import, so that tests can probe a small task
        loaded = speech_probe.read_speech_probe(speech_probe.builtin_speech_probe(speech_probe.PROBE_UTTERANCES,
                                                                                  progress=progress))
    probed = probe_speech(encoder.to(device), loaded, seed=seed, device=device, floor_inits=floor_inits,
                          progress=progress)
    result = {"model": str(path), "kind": kind, **probed,
              "test_held_out_of_pretraining": speech_held_out(hf, loaded) if kind == "run" and builtin else None}
    target = Path(out) if out else (path / PROBE_FILE if kind == "run" else None)
    if target is not None:
        write_result(result, target)
    return result


# ----------------------------------------------------------------------------- the modality
class AudioModality(Modality):
    name = "audio"
    unit = "frames"
    model_config_class = AudioEncoderConfig
    encoder_presets = AUDIO_PRESETS
    size_presets = SIZE_PRESETS
    recipe_presets = RECIPE_PRESETS
    has_probe = True  # at the end of a job, on the built-in speaker task (probe_speech); not every N steps

    # ---------------------------------------------------------------- config
    def validate(self, cfg) -> None:
        m, d, r = cfg.model, cfg.data, cfg.recipe

        def need(ok: bool, flag: str, value, fix: str):
            if not ok:
                raise UsageError(f"{flag} {value!r}: {fix}")

        try:
            AudioEncoderConfig(**dataclasses.asdict(m))
        except (ValueError, TypeError) as err:
            raise UsageError(f"--model.*: {err}") from None
        need(0 <= m.layerdrop < 1, "--model.layerdrop", m.layerdrop, "must be in [0, 1)")
        frames = num_frames(m, d.max_samples)
        need(frames >= 2 * r.mask_span + 2, "--data.max_samples", d.max_samples,
             f"makes {frames} frames, too few for mask spans of {r.mask_span}; use at least "
             f"{(2 * r.mask_span + 2) * m.samples_per_frame + m.receptive_field} samples")
        need(r.mask_span >= 1, "--recipe.mask_span", r.mask_span, "must be >= 1")
        if r.name == "data2vec2":
            need(r.mask_prob < 1, "--recipe.mask_prob", r.mask_prob, "must be below 1 (some frames stay visible)")
            need(0 <= r.mask_prob_adjust <= 1, "--recipe.mask_prob_adjust", r.mask_prob_adjust, "must be in [0, 1]")
            D = r.decoder_dim or m.hidden_size
            need(r.decoder_groups >= 1 and D % r.decoder_groups == 0 and m.hidden_size % r.decoder_groups == 0,
                 "--recipe.decoder_groups", r.decoder_groups,
                 f"must divide the decoder width {D} and the encoder width {m.hidden_size}")
            need(r.decoder_kernel % 2 == 1, "--recipe.decoder_kernel", r.decoder_kernel, "must be odd")
            need(r.head_hidden_mult == 0, "--recipe.head_hidden_mult", r.head_hidden_mult,
                 "the speech decoder ends in one Linear; use 0")
        t = cfg.train
        need(t.probe_task in ("builtin", "none"), "--train.probe_task", t.probe_task,
             "the job's speech probe is the built-in speaker task: builtin or none (probe your own "
             "labels afterwards: python -m d2v_fast.probe RUN --task FILE.jsonl)")
        need(t.probe_every == 0, "--train.probe_every", t.probe_every,
             "speech is probed at the end of the job only; set 0")

    # ---------------------------------------------------------------- models
    def build_encoder(self, enc_cfg: AudioEncoderConfig) -> AudioEncoder:
        return AudioEncoder(enc_cfg)

    def build_student(self, enc_cfg: AudioEncoderConfig, recipe_cfg):
        return (AudioStudent2 if recipe_cfg.name == "data2vec2" else AudioStudent)(enc_cfg, recipe_cfg)

    def encoder_config_from_dict(self, d: dict) -> AudioEncoderConfig:
        names = {f.name for f in dataclasses.fields(AudioEncoderConfig)}
        return AudioEncoderConfig(**{k: v for k, v in d.items() if k in names})

    def teacher_encoder_weights(self, student_encoder, teacher):
        """The student's front end (and, for v1, its positional conv: shared) with the teacher's
        averaged LayerNorm, blocks (and, for 2.0, positional conv); the teacher's names are the
        encoder's ``encoder.`` submodule names."""
        out = dict(student_encoder)
        out.update({f"encoder.{k}": v for k, v in teacher.items()})
        return out

    # ---------------------------------------------------------------- data
    def open_corpus(self, cfg, *, rank: int = 0):
        from ..data.audio.builtin import builtin_speech_corpus
        from ..data.audio.corpus import open_audio_corpus

        path = cfg.data.path or builtin_speech_corpus(progress=rank == 0)
        return open_audio_corpus(path)

    def corpus_fingerprint(self, corpus) -> str:
        shards = ",".join(s["sha256"] for s in corpus.meta["shards"])
        return f"{corpus.meta.get('source', {}).get('fingerprint', '')}:{hashlib.sha256(shards.encode()).hexdigest()}"

    def verify_corpus(self, corpus) -> None:
        """Every shard's sha256 against ``meta.json``."""
        from ..data.audio.corpus import REPREPARE

        for shard in corpus.meta["shards"]:
            path = Path(corpus.path) / shard["samples"]
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 23):
                    h.update(chunk)
            if h.hexdigest() != shard["sha256"]:
                raise UsageError(f"{path}: content differs from its checksum in meta.json (changed or damaged "
                                 f"since preparation); prepare the corpus again (`{REPREPARE}`)")

    def describe(self, cfg, corpus) -> str:
        secs = float(corpus.lengths.sum()) / corpus.sample_rate
        return (f"{len(corpus):,} utterances ({secs / 3600:.2f} h); global batch {cfg.train.batch_size} utterances "
                f"cropped to <= {cfg.data.max_samples / 16000:g} s; corpus {corpus.path}")

    def loader(self, corpus, cfg, *, micro_batch_size, epoch, start, rank, world_size):
        from functools import partial

        from ..data.audio.dataset import build_audio_dataloader

        t, d = cfg.train, cfg.data
        return build_audio_dataloader(
            corpus, micro_batch_size=micro_batch_size, global_batch_size=t.batch_size, seed=t.seed, epoch=epoch,
            start=start, rank=rank, world_size=world_size, max_samples=d.max_samples,
            frames_for=partial(num_frames, cfg.model), make_masks=FrameMasks(cfg.recipe, t.seed),
            num_workers=d.num_workers)

    def units(self, mb: dict) -> int:
        return mb["waveform"].shape[0] * mb["num_frames"]

    def flops_per_unit(self, cfg) -> float:
        return model_flops_per_frame(cfg)

    # ---------------------------------------------------------------- Hugging Face
    def read_hf(self, path, *, flag: str = "--init-from"):
        import json

        from ..models.audio import read_hf_dir

        try:
            _, weights = read_hf_dir(path)
            config = json.loads((Path(path) / "config.json").read_text())
        except (ValueError, OSError) as err:
            raise UsageError(f"{flag} {path}: {err}") from None
        return config, weights

    def check_hf_fits(self, hf_config, enc_cfg, path, *, flag: str = "--init-from") -> None:
        from ..models.audio import config_from_hf

        theirs = config_from_hf(hf_config)
        shape = ("conv_dim", "conv_kernel", "conv_stride", "hidden_size", "num_layers", "num_heads", "ffn_size",
                 "pos_conv_depth", "pos_conv_kernel", "pos_conv_groups")
        as_key = lambda v: tuple(v) if isinstance(v, (tuple, list)) else v
        wrong = [f"{k} {getattr(theirs, k)} (ours {getattr(enc_cfg, k)})" for k in shape
                 if as_key(getattr(theirs, k)) != as_key(getattr(enc_cfg, k))]
        if wrong:
            raise UsageError(f"{flag} {path}: the model does not fit --config {', '.join(wrong)}; pick the "
                             f"matching --config or set the --model.* flags to its sizes")

    def export_hf(self, weights, enc_cfg_dict, out_dir, *, dtype, run_dir, state) -> str:
        from ..models.audio import save_hf_dir

        enc = self.encoder_config_from_dict(enc_cfg_dict)
        try:
            save_hf_dir(weights, enc, out_dir, dtype=dtype,
                        extra={"step": state.get("step"), "weights": state.get("_weights"), "modality": "audio"})
        except ValueError as err:
            raise UsageError(f"export {out_dir}: {err}") from None
        return "Data2VecAudioModel"
