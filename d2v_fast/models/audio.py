"""The speech encoder, with Hugging Face ``Data2VecAudioModel``'s module tree, parameter
names and semantics (docs/design.md#hf-layout), so that export is a save plus a config, not a
translation.

    waveform [B, S] (16 kHz, per-utterance normalised)
      -> feature_extractor: 7 x [Conv1d (no bias) -> LayerNorm over channels -> GELU]  ~50 frames/s
      -> feature_projection: LayerNorm(512) -> Linear(512 -> C)          "frame features" [B, T, C]
      -> (masking: masked frames replaced by ``masked_spec_embed`` (v1), or removed (2.0))
      -> encoder.pos_conv_embed: depth x [Conv1d(C, k, groups) -> LayerNorm (no affine) -> GELU], added
      -> encoder.layer_norm -> dropout
      -> encoder.layers: post-LN blocks (attention.{q,k,v,out}_proj, layer_norm,
         feed_forward.{intermediate,output}_dense, final_layer_norm)

The pieces are separate methods (``frame_features``, ``embed``, ``embed_visible``,
``run_audio_layers``)
because the recipes need them apart: data2vec v1 feeds the teacher the unmasked frame
features through the student's positional conv, data2vec 2.0 zeroes the masked frames
before the positional conv and sends only the visible frames into the blocks.

Attention goes through the text encoder's path (``F.scaled_dot_product_attention``, no
mask for unpadded batches, flash-attn varlen for padded half-precision CUDA batches).
Not here: the ALiBi bias of the published 2.0 audio model, which ``Data2VecAudioModel``
cannot express (see docs/speech.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, attention_mask, run_blocks

SAMPLE_RATE = 16000
# Hugging Face builds the conv-extractor and positional-conv LayerNorms with PyTorch's
# default eps whatever ``layer_norm_eps`` says; fairseq does the same.
_CONV_LN_EPS = 1e-5


@dataclass
class AudioEncoderConfig:
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    pos_conv_depth: int = 5       # HF num_conv_pos_embeddings; fairseq conv_pos_depth
    pos_conv_kernel: int = 19     # HF conv_pos_kernel_size; fairseq max(3, conv_pos 95 // depth 5)
    pos_conv_groups: int = 16
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1            # HF hidden_dropout; fairseq dropout
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0  # fairseq data2vec audio; HF's class default is 0.1
    feature_dropout: float = 0.0     # after the projection; HF feat_proj_dropout, fairseq dropout_input
    layerdrop: float = 0.05          # fairseq base_librispeech encoder_layerdrop
    init_std: float = 0.02

    def __post_init__(self):
        self.conv_dim, self.conv_kernel, self.conv_stride = (
            tuple(int(x) for x in v) for v in (self.conv_dim, self.conv_kernel, self.conv_stride))
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError(f"conv_dim, conv_kernel and conv_stride need one entry per conv layer, "
                             f"got {len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}")
        if self.hidden_size % self.num_heads or self.hidden_size % self.pos_conv_groups:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads} "
                             f"and pos_conv_groups {self.pos_conv_groups}")

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.conv_stride)  # 320 = 20 ms at 16 kHz

    @property
    def receptive_field(self) -> int:
        """Samples seen by one frame (400 = 25 ms for the published extractor)."""
        rf = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            rf = (rf - 1) * s + k
        return rf


AUDIO_PRESETS = {
    # tiny keeps the published strides (50 frames/s) so masks and crops mean the same
    # thing at every size; only widths shrink, for CPU tests (the extractor runs at 16 kHz and
    # dominates a tiny model: 64 channels cost ~0.35 s fwd+bwd per 8 x 2 s batch on one core).
    "tiny": dict(conv_dim=(64,) * 7, hidden_size=128, num_layers=4, num_heads=4, ffn_size=512,
                 pos_conv_depth=2),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    # data2vec-audio-large (fairseq large_librivox): same front end, 24 post-LN layers
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
}


def audio_config(preset: str = "base", **overrides) -> AudioEncoderConfig:
    if preset not in AUDIO_PRESETS:
        raise ValueError(f"audio preset {preset!r}: expected one of {', '.join(AUDIO_PRESETS)}")
    return AudioEncoderConfig(**{**AUDIO_PRESETS[preset], **overrides})


def num_frames(cfg: AudioEncoderConfig, num_samples):
    """Frames the conv extractor makes from ``num_samples`` (an int or a tensor of lengths);
    0 for inputs shorter than the receptive field."""
    n = num_samples
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        n = (n - k) // s + 1
    if isinstance(n, torch.Tensor):
        return n.clamp_min(0)
    return max(int(n), 0)


# ----------------------------------------------------------------------------- front end
class ConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False)
        self.layer_norm = nn.LayerNorm(c_out, eps=_CONV_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, S] -> [B, C', S'] (a transposed view)
        # LayerNorm and GELU on a contiguous [B, S', C'] copy: on strided views their CPU
        # kernels (forward and backward) took twice as long in the tiny preset
        x = self.conv(x).transpose(1, 2).contiguous()
        return F.gelu(self.layer_norm(x)).transpose(1, 2)


class FeatureExtractor(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        dims = (1,) + cfg.conv_dim
        self.conv_layers = nn.ModuleList(ConvLayer(dims[i], dims[i + 1], k, s)
                                         for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride)))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, T, C]
        x = waveform[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class PositionalConvLayer(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        k = cfg.pos_conv_kernel
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2, groups=cfg.pos_conv_groups)
        # an even kernel with padding k//2 makes one frame too many; drop the last ("same" length)
        self.trim = 1 if k % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        x = self.conv(x)
        if self.trim:
            x = x[:, :, :-self.trim]
        x = F.layer_norm(x.transpose(1, 2).contiguous(), (x.shape[1],), eps=_CONV_LN_EPS)
        return F.gelu(x).transpose(1, 2)


class PositionalConv(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(PositionalConvLayer(cfg) for _ in range(cfg.pos_conv_depth))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, C]
        x = h.transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)


# ----------------------------------------------------------------------------- blocks
class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        C = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))


class FeedForward(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.output_dense = nn.Linear(cfg.ffn_size, cfg.hidden_size)


class AudioLayer(Block):
    """Post-LN block (``models.blocks.Block``) with activation dropout, in
    ``Data2VecAudioEncoderLayer``'s layout."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__(num_heads=cfg.num_heads, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                         activation_dropout=cfg.activation_dropout)
        self.attention = AudioAttention(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def qkv_projections(self):
        at = self.attention
        return at.q_proj, at.k_proj, at.v_proj

    def attention_out(self):
        return self.attention.out_proj

    def ffn_in(self):
        return self.feed_forward.intermediate_dense

    def ffn_out(self):
        return self.feed_forward.output_dense

    def norms(self):
        return self.layer_norm, self.final_layer_norm


def run_audio_layers(layers: nn.ModuleList, h: torch.Tensor, padding_mask: torch.Tensor | None = None,
                     collect_ffn: bool = False, layerdrop: float = 0.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the blocks; with ``collect_ffn`` also return each run layer's FFN output.
    ``layerdrop`` > 0 skips each layer with that probability (draws from ``generator``)."""
    return run_blocks(layers, h, attention_mask(padding_mask, h), collect="ffn" if collect_ffn else None,
                      layerdrop=layerdrop, generator=generator)


class AudioLayerStack(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.pos_conv_embed = PositionalConv(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(AudioLayer(cfg) for _ in range(cfg.num_layers))


# ----------------------------------------------------------------------------- encoder
class AudioEncoder(nn.Module):
    """``forward(input_values, attention_mask=None, frame_mask=None) -> last_hidden_state``.

    ``attention_mask`` follows Hugging Face (per sample, 1 = audio, 0 = padding); the
    published recipes never pad (batches are cropped to the shortest utterance), so it
    is there for export checks and inference.
    """

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.config = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.masked_spec_embed = nn.Parameter(torch.empty(cfg.hidden_size))
        self.encoder = AudioLayerStack(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fairseq's initialisation: BERT-style N(0, 0.02) linears, Kaiming-normal extractor
        convs, N(0, sqrt(4 / (k * C))) positional convs, U(0, 1) mask embedding."""
        cfg = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=cfg.init_std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in self.feature_extractor.conv_layers:
            nn.init.kaiming_normal_(layer.conv.weight)
        for layer in self.encoder.pos_conv_embed.layers:
            nn.init.normal_(layer.conv.weight, std=math.sqrt(4.0 / (cfg.pos_conv_kernel * cfg.hidden_size)))
            nn.init.zeros_(layer.conv.bias)
        nn.init.uniform_(self.masked_spec_embed)

    # --- the pieces the recipes use
    def frame_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Conv extractor + projection, before dropout: ``[B, S] -> [B, T, C]``."""
        return self.feature_projection(self.feature_extractor(waveform))

    def frame_padding(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """Frame-level padding mask (True = padding) from a per-sample HF attention mask, or
        None when nothing is padded."""
        if attention_mask is None:
            return None
        lengths = num_frames(self.config, attention_mask.long().sum(1))
        pad = torch.arange(T, device=attention_mask.device)[None, :] >= lengths[:, None]
        return pad if bool(pad.any()) else None

    def embed(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
              padding_mask: torch.Tensor | None = None, *, layer_norm: nn.LayerNorm | None = None,
              dropout: bool | None = None) -> torch.Tensor:
        """Frame features -> block input: input dropout, masked frames (``frame_mask`` True)
        replaced by ``masked_spec_embed``, padded frames zeroed, positional conv added,
        encoder LayerNorm, dropout.

        For teachers: ``layer_norm`` swaps in another encoder LayerNorm and ``dropout=False``
        turns both dropouts off. data2vec v1's teacher is
        ``student.embed(features, layer_norm=teacher.encoder.layer_norm, dropout=False)``:
        the unmasked features from before the input dropout, the student's positional conv
        (fairseq ``ema_layers_only`` copies it, not averages it), the EMA LayerNorm, eval mode.
        """
        drop = self.training if dropout is None else dropout
        h = F.dropout(features, self.config.feature_dropout, drop)
        if frame_mask is not None:
            h = torch.where(frame_mask[..., None], self.masked_spec_embed.to(h.dtype), h)
        if padding_mask is not None:
            h = h.masked_fill(padding_mask[..., None], 0.0)
        h = h + self.encoder.pos_conv_embed(h)
        h = (layer_norm or self.encoder.layer_norm)(h)
        return F.dropout(h, self.config.dropout, drop)

    def embed_visible(self, features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """data2vec 2.0 student input: masked frames zeroed, the positional conv run over the
        full length, then only the visible frames kept (the same count in every row):
        ``[B, T, C] -> [B, T_visible, C]``."""
        B, T, C = features.shape
        h = F.dropout(features, self.config.feature_dropout, self.training)
        h = h.masked_fill(frame_mask[..., None], 0.0)
        h = h + self.encoder.pos_conv_embed(h)
        visible = ~frame_mask
        counts = visible.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError("embed_visible needs the same number of visible frames in every row")
        h = h[visible].view(B, int(counts[0]), C)
        h = self.encoder.layer_norm(h)
        return F.dropout(h, self.config.dropout, self.training)

    def encode(self, waveform: torch.Tensor, frame_mask: torch.Tensor | None = None,
               padding_mask: torch.Tensor | None = None,
               collect_ffn: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.embed(self.frame_features(waveform), frame_mask, padding_mask)
        layerdrop = self.config.layerdrop if self.training else 0.0
        return run_audio_layers(self.encoder.layers, h, padding_mask, collect_ffn, layerdrop)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        T = num_frames(self.config, input_values.shape[1])
        if T < 1:
            raise ValueError(f"{input_values.shape[1]} samples make no frame: the extractor needs "
                             f"at least {self.config.receptive_field}")
        padding = self.frame_padding(attention_mask, T)
        return self.encode(input_values, frame_mask, padding)[0]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; ``non_embedding`` leaves out the conv front end (the FLOP count's 2N
        covers the transformer; the convs are counted separately)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.feature_extractor.parameters())
        return n


def forward_flops(cfg: AudioEncoderConfig, num_samples: int) -> int:
    """Matmul/conv FLOPs (2 per multiply-add) of one forward pass over one utterance of
    ``num_samples`` samples, unmasked. Training costs about 3x the student's forward plus
    the teacher's forward; the recipes add that up."""
    flops, length, c_in = 0, num_samples, 1
    for c, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
        length = (length - k) // s + 1
        flops += 2 * length * c * c_in * k
        c_in = c
    T, C = length, cfg.hidden_size
    flops += 2 * T * cfg.conv_dim[-1] * C                                                  # projection
    flops += cfg.pos_conv_depth * 2 * T * C * (C // cfg.pos_conv_groups) * cfg.pos_conv_kernel
    per_layer = 2 * T * (4 * C * C + 2 * C * cfg.ffn_size) + 2 * 2 * T * T * C             # + QK^T and AV
    return flops + cfg.num_layers * per_layer


# ----------------------------------------------------------------------------- Hugging Face
def hf_config_dict(cfg: AudioEncoderConfig, dtype: str = "float32") -> dict:
    """``config.json`` for ``transformers.Data2VecAudioModel`` with these weights.

    ``mask_time_prob`` stays at Hugging Face's default (> 0) because ``masked_spec_embed``
    only exists in their model when it is positive; it is fine-tuning SpecAugment and has
    no effect on inference.
    """
    return {
        "model_type": "data2vec-audio",
        "architectures": ["Data2VecAudioModel"],
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_layers),
        "num_attention_heads": int(cfg.num_heads),
        "intermediate_size": int(cfg.ffn_size),
        "hidden_act": "gelu",
        "feat_extract_activation": "gelu",
        "hidden_dropout": float(cfg.dropout),
        "attention_dropout": float(cfg.attention_dropout),
        "activation_dropout": float(cfg.activation_dropout),
        "feat_proj_dropout": float(cfg.feature_dropout),
        "layerdrop": float(cfg.layerdrop),
        "initializer_range": float(cfg.init_std),
        "layer_norm_eps": float(cfg.layer_norm_eps),
        "conv_dim": [int(x) for x in cfg.conv_dim],
        "conv_kernel": [int(x) for x in cfg.conv_kernel],
        "conv_stride": [int(x) for x in cfg.conv_stride],
        "conv_bias": False,
        "num_conv_pos_embeddings": int(cfg.pos_conv_depth),
        "conv_pos_kernel_size": int(cfg.pos_conv_kernel),
        "num_conv_pos_embedding_groups": int(cfg.pos_conv_groups),
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
        "add_adapter": False,
        "dtype": dtype,
    }


def hf_preprocessor_dict() -> dict:
    """``preprocessor_config.json``: ``Wav2Vec2FeatureExtractor`` at 16 kHz with
    per-utterance normalisation, the input our corpora hold."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": SAMPLE_RATE,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": True,
        "return_attention_mask": True,
    }


def config_from_hf(d: dict) -> AudioEncoderConfig:
    """The inverse of ``hf_config_dict`` (for ``--init-from`` a Hugging Face directory)."""
    if d.get("model_type") != "data2vec-audio":
        raise ValueError(f"model_type {d.get('model_type')!r}: expected 'data2vec-audio'")
    if d.get("add_adapter") or d.get("conv_bias"):
        raise ValueError("adapters and conv biases are not part of the data2vec audio encoder")
    return AudioEncoderConfig(
        conv_dim=tuple(d.get("conv_dim", (512,) * 7)), conv_kernel=tuple(d.get("conv_kernel", (10, 3, 3, 3, 3, 2, 2))),
        conv_stride=tuple(d.get("conv_stride", (5, 2, 2, 2, 2, 2, 2))), hidden_size=d.get("hidden_size", 768),
        num_layers=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 12),
        ffn_size=d.get("intermediate_size", 3072), pos_conv_depth=d.get("num_conv_pos_embeddings", 5),
        pos_conv_kernel=d.get("conv_pos_kernel_size", 19), pos_conv_groups=d.get("num_conv_pos_embedding_groups", 16),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5), dropout=d.get("hidden_dropout", 0.1),
        attention_dropout=d.get("attention_dropout", 0.1), activation_dropout=d.get("activation_dropout", 0.1),
        feature_dropout=d.get("feat_proj_dropout", 0.0), layerdrop=d.get("layerdrop", 0.1),
        init_std=d.get("initializer_range", 0.02))


def config_dict(cfg: AudioEncoderConfig) -> dict:
    """Plain JSON-able form for checkpoints."""
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ----------------------------------------------------------------------------- HF directories
_HF_PREFIXES = ("data2vec_audio.", "model.")  # Data2VecAudioFor* checkpoints nest the encoder


def save_hf_dir(weights: dict[str, torch.Tensor], cfg: AudioEncoderConfig, out, *, dtype: str = "float32",
                extra: dict | None = None):
    """Write a directory that ``transformers.Data2VecAudioModel.from_pretrained`` loads with
    no missing or unexpected keys (``model.safetensors``, ``config.json``,
    ``preprocessor_config.json``, and ``d2v_fast.json`` from ``extra``), built in a staging
    directory and renamed into place. The exporter's last step; it decides which weights."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from ..files import staged_directory

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(dtypes)}")
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in AudioEncoder(cfg).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    if have != want:
        missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise ValueError(f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong shape {wrong[:3]}")
    tensors = {k: v.detach().to("cpu", dtypes[dtype]).contiguous() for k, v in sorted(weights.items())}
    out = Path(out)
    with staged_directory(out) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
        (staging / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_dict(), indent=2) + "\n")
        if extra:
            (staging / "d2v_fast.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out


def read_hf_dir(path) -> tuple[AudioEncoderConfig, dict[str, torch.Tensor]]:
    """(our config, encoder weights under our names) of a local ``Data2VecAudioModel`` (or
    ``Data2VecAudioFor*``, heads dropped) directory, for ``--init-from``. Raises
    ValueError with the reason; the caller names the flag."""
    import json
    from pathlib import Path

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; give a Hugging Face model directory")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")
    with torch.device("meta"):
        ours = set(AudioEncoder(cfg).state_dict())
    weights = {}
    for k, v in raw.items():
        for p in _HF_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k in ours:
            weights[k] = v
    # fine-tuned models made with mask_time_prob = 0 have no mask embedding: start it fresh
    missing = ours - set(weights) - {"masked_spec_embed"}
    if missing:
        raise ValueError(f"{path}: the weights lack {len(missing)} encoder tensors (e.g. {sorted(missing)[0]})")
    return cfg, weights
