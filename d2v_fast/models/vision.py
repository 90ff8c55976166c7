"""The image encoder: a ViT with Hugging Face ``Data2VecVisionModel`` (BEiT layout) module
names and semantics (docs/design.md#hf-layout), so that export is a save, not a translation.

Two flavours, chosen by ``VisionConfig.position_encoding``:

- ``"relative"`` (data2vec v1 images, the BEiT model of facebookresearch/data2vec_vision):
  one relative position bias table shared by all blocks, layer scale (``lambda_1``,
  ``lambda_2``, init 1e-4), no absolute positions, mask token replacement.
- ``"sincos"`` (data2vec 2.0 images, run on the Hugging Face pre-LN block so that export
  stays exact): fixed 2-D sin-cos absolute positions stored in
  ``embeddings.position_embeddings`` (CLS row zero), no relative bias, layer scale off.
  The published 2.0 image model uses post-LN blocks; ``Data2VecVisionModel`` cannot
  express them.

Block (both flavours, ``Data2VecVisionLayer``'s layout over the shared
``models.blocks.Block``, pre-LN)::

    h = h + drop_path(lambda_1 * attn(layernorm_before(h)))
    ffn = output.dense(gelu(intermediate.dense(layernorm_after(h))))
    h = h + drop_path(lambda_2 * ffn)

``encode`` returns the final ``layernorm`` output and, on request, every block's output
after the residual (v1 targets) or every block's ``ffn`` before layer scale and residual
(2.0 targets).

Attention is ``F.scaled_dot_product_attention``. With the relative bias it gets a float
``attn_mask`` [1, H, T, T] that needs a gradient; ``attention_backend`` measures which
SDPA kernel PyTorch actually runs for that call (recorded in docs/images.md: on CPU the
flash-attention CPU kernel, not the math path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, Dense, QueryKeyValue, run_blocks

POSITION_ENCODINGS = ("relative", "sincos")


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    position_encoding: str = "relative"  # "relative" (v1/BEiT) or "sincos" (2.0 on the HF block)
    layer_scale_init: float = 1e-4  # 0 = no lambda_1/lambda_2 parameters (HF: layer_scale_init_value)
    use_mask_token: bool = True  # embeddings.mask_token; 2.0 masks by dropping patches instead
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0  # HF hidden_dropout_prob: embeddings, attention output, FFN output
    attention_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth, linear from 0 at block 0 to this at the last block
    init_std: float = 0.02

    def __post_init__(self):
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding {self.position_encoding!r}: expected one of {POSITION_ENCODINGS}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.position_encoding == "sincos" and self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size}: 2-D sin-cos positions need a multiple of 4")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        h, w = self.grid
        return h * w


VISION_PRESETS = {
    # 32x32 images in 4x4 patches: an 8x8 grid (64 patches + CLS), for CPU tests
    "tiny": dict(image_size=32, patch_size=4, hidden_size=128, num_layers=4, num_heads=4, ffn_size=512),
    "base": dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "large": dict(image_size=224, patch_size=16, hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
}

# The block flavour of each recipe (docs/images.md). v1: data2vec_vision beit/ (drop path 0.25,
# attention dropout 0.05 are the published base run's; recipes may override).
RECIPE_FLAVOURS = {
    "data2vec": dict(position_encoding="relative", layer_scale_init=1e-4, use_mask_token=True,
                     attention_dropout=0.05, drop_path=0.25),
    "data2vec2": dict(position_encoding="sincos", layer_scale_init=0.0, use_mask_token=False),
}


def vision_config(size: str = "base", recipe: str = "data2vec", **overrides) -> VisionConfig:
    """The encoder of a preset size for a recipe's block flavour, with field overrides."""
    if size not in VISION_PRESETS:
        raise ValueError(f"vision preset {size!r}: expected one of {sorted(VISION_PRESETS)}")
    if recipe not in RECIPE_FLAVOURS:
        raise ValueError(f"recipe {recipe!r}: expected one of {sorted(RECIPE_FLAVOURS)}")
    return VisionConfig(**{**VISION_PRESETS[size], **RECIPE_FLAVOURS[recipe], **overrides})


def hf_config_dict(cfg: VisionConfig, *, dtype: str = "float32") -> dict:
    """``config.json`` content for ``transformers.Data2VecVisionConfig`` describing ``cfg``.

    ``use_mean_pooling`` is false so the model has the final ``layernorm`` we train (with it
    true, HF replaces ``layernorm`` by Identity and adds a pooler LayerNorm instead).
    """
    return {
        "model_type": "data2vec-vision",
        "architectures": ["Data2VecVisionModel"],
        "image_size": int(cfg.image_size),
        "patch_size": int(cfg.patch_size),
        "num_channels": int(cfg.num_channels),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_layers),
        "num_attention_heads": int(cfg.num_heads),
        "intermediate_size": int(cfg.ffn_size),
        "hidden_act": "gelu",  # exact erf GELU, as F.gelu
        "layer_norm_eps": float(cfg.layer_norm_eps),
        "hidden_dropout_prob": float(cfg.dropout),
        "attention_probs_dropout_prob": float(cfg.attention_dropout),
        "drop_path_rate": float(cfg.drop_path),
        "initializer_range": float(cfg.init_std),
        "use_mask_token": bool(cfg.use_mask_token),
        "use_absolute_position_embeddings": cfg.position_encoding == "sincos",
        "use_relative_position_bias": False,  # per-layer tables: not used by either recipe
        "use_shared_relative_position_bias": cfg.position_encoding == "relative",
        "layer_scale_init_value": float(cfg.layer_scale_init),
        "use_mean_pooling": False,
        "dtype": dtype,
    }


def config_from_hf(hf: dict) -> VisionConfig:
    """The inverse of ``hf_config_dict`` (for ``--init-from`` an exported directory).

    Raises ValueError for a configuration our encoder cannot represent exactly."""
    def want(key, value, why):
        if hf.get(key, value) != value:
            raise ValueError(f"config.json {key}={hf.get(key)!r}: d2v_fast needs {value!r} ({why})")

    want("use_relative_position_bias", False, "per-layer relative position tables are not supported")
    want("use_mean_pooling", False, "the final layernorm must exist")
    want("hidden_act", "gelu", "exact GELU")
    absolute = bool(hf.get("use_absolute_position_embeddings", False))
    shared = bool(hf.get("use_shared_relative_position_bias", False))
    if absolute == shared:
        raise ValueError("config.json: exactly one of use_absolute_position_embeddings (2.0, sin-cos) and "
                         "use_shared_relative_position_bias (v1) must be true for a d2v_fast image encoder")
    image_size, patch_size = hf.get("image_size", 224), hf.get("patch_size", 16)
    for key, v in (("image_size", image_size), ("patch_size", patch_size)):
        if not isinstance(v, int):
            raise ValueError(f"config.json {key}={v!r}: d2v_fast needs one int (square images and patches)")
    return VisionConfig(
        image_size=image_size, patch_size=patch_size, num_channels=hf.get("num_channels", 3),
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        ffn_size=hf["intermediate_size"], position_encoding="sincos" if absolute else "relative",
        layer_scale_init=float(hf.get("layer_scale_init_value", 0.1)), use_mask_token=bool(hf.get("use_mask_token")),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), dropout=float(hf.get("hidden_dropout_prob", 0.0)),
        attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.0)),
        drop_path=float(hf.get("drop_path_rate", 0.0)), init_std=float(hf.get("initializer_range", 0.02)))


def hf_image_processor_dict(cfg: VisionConfig, mean: tuple[float, float, float],
                            std: tuple[float, float, float]) -> dict:
    """``preprocessor_config.json`` for ``transformers.BeitImageProcessor`` (what the
    data2vec-vision checkpoints on the Hub use): evaluation-time resize to 256/224 of the
    image size (bicubic), centre crop to the image size, rescale to [0, 1], and the mean/std
    we trained with."""
    resize = round(cfg.image_size * 256 / 224)
    return {
        "image_processor_type": "BeitImageProcessor",
        "do_resize": True, "size": {"height": resize, "width": resize}, "resample": 3,  # PIL bicubic
        "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [float(v) for v in mean], "image_std": [float(v) for v in std],
        "do_reduce_labels": False,
    }


def sincos_positions_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [1 + H*W, dim] (MAE / data2vec 2.0 images): the
    first half of the channels encodes the column, the second half the row, each as
    [sin, cos] over dim/4 frequencies 1 / 10000^(k / (dim/4)). Row 0 (CLS) is zero."""
    h, w = grid
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def encode(coord):
        angles = coord.reshape(-1, 1) * freq
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([table.new_zeros(1, dim), table]).float()


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """Index [1 + H*W, 1 + H*W] into the relative bias table (BEiT): patch pairs map to
    their (dy, dx) offset, the last three rows of the table hold CLS->patch, patch->CLS
    and CLS->CLS."""
    h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # [2, HW]
    delta = coords[:, :, None] - coords[:, None, :]  # [2, HW, HW]
    patch_pairs = (delta[0] + h - 1) * (2 * w - 1) + (delta[1] + w - 1)
    n = (2 * h - 1) * (2 * w - 1)
    index = torch.empty(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = patch_pairs
    index[0, :] = n  # CLS attends to a patch
    index[:, 0] = n + 1  # a patch attends to CLS
    index[0, 0] = n + 2
    return index


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size)) if cfg.use_mask_token else None
        self.patch_embeddings = PatchEmbeddings(cfg)
        if cfg.position_encoding == "sincos":
            # a buffer, not a parameter: fixed, so never in an optimizer or DDP bucket, yet
            # saved under HF's name embeddings.position_embeddings
            self.register_buffer("position_embeddings", sincos_positions_2d(cfg.grid, cfg.hidden_size)[None])
        else:
            self.position_embeddings = None

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1 + N, C] before dropout; masked patches replaced by the mask token (BEiT)."""
        proj = self.patch_embeddings.projection
        h = proj(pixel_values.to(proj.weight.dtype)).flatten(2).transpose(1, 2)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos given but this encoder has no mask token (use_mask_token=False)")
            h = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(h.dtype), h)
        h = torch.cat([self.cls_token.to(h.dtype).expand(h.shape[0], -1, -1), h], dim=1)
        if self.position_embeddings is not None:
            h = h + self.position_embeddings.to(h.dtype)
        return h


class RelativePositionBias(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h, w = cfg.grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1) + 3, cfg.num_heads))
        # not persistent: HF rebuilds the index from the grid and ignores it on load
        self.register_buffer("relative_position_index", relative_position_index(cfg.grid), persistent=False)

    def forward(self) -> torch.Tensor:
        """The attention bias [1, heads, T, T] (T = 1 + patches)."""
        T = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(T, T, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention = QueryKeyValue(cfg.hidden_size, key_bias=False)  # BEiT: q and v biases only
        self.output = Dense(cfg.hidden_size, cfg.hidden_size)


class Layer(Block):
    """Pre-LN block (``models.blocks.Block``) with layer scale and drop path, in
    ``Data2VecVisionLayer``'s layout (BEiT: the key projection has no bias)."""

    norm_first = True

    def __init__(self, cfg: VisionConfig, drop_path_rate: float):
        super().__init__(num_heads=cfg.num_heads, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                         drop_path=drop_path_rate)
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = Dense(cfg.hidden_size, cfg.ffn_size)
        self.output = Dense(cfg.ffn_size, cfg.hidden_size)
        if cfg.layer_scale_init > 0:
            self.lambda_1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
            self.lambda_2 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
        else:
            self.lambda_1 = self.lambda_2 = None

    def qkv_projections(self):
        sa = self.attention.attention
        return sa.query, sa.key, sa.value

    def norms(self):
        return self.layernorm_before, self.layernorm_after

    def layer_scales(self):
        return self.lambda_1, self.lambda_2


class LayerStack(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.position_encoding == "relative":
            self.relative_position_bias = RelativePositionBias(cfg)
        else:
            self.relative_position_bias = None
        n = cfg.num_layers
        rates = [cfg.drop_path * i / max(n - 1, 1) for i in range(n)]
        self.layer = nn.ModuleList(Layer(cfg, rate) for rate in rates)


def keep_visible(h: torch.Tensor, mask: torch.Tensor, kept: int | None = None) -> torch.Tensor:
    """[B, 1 + N, C] -> [R, 1 + V, C]: CLS and the unmasked patches of each mask row, in
    order (data2vec 2.0: only visible patches enter the student). ``mask`` is [R, N] with
    R = clones * B (clones of a sample adjacent), so the clones are gathered straight from
    ``h`` without materialising ``h.repeat_interleave(clones, 0)``. Every row must keep the
    same number of patches (the inverse block mask guarantees it). ``kept``: that number,
    when the caller read it from the batch's host copy (the trainer's ``--train.host_counts``):
    no device reads; otherwise it is read here and every row checked."""
    from .. import ops  # the fused gather on CUDA, its eager twin elsewhere

    R, C = mask.shape[0], h.shape[-1]
    if kept is None:
        counts = (~mask).sum(1)
        kept = int(counts[0])
        if bool((counts != kept).any()):
            raise ValueError(f"keep_visible: rows keep {sorted(set(counts.tolist()))} patches; "
                             f"every row must keep the same number")
    keep = torch.cat([mask.new_ones(R, 1), ~mask], dim=1)
    return ops.masked_gather(h, keep, R * (1 + kept)).view(R, 1 + kept, C)


class GridDecoder(nn.Module):
    """The data2vec 2.0 image decoder (fairseq ``Decoder2d``): ``layers`` x [Conv2d(k,
    groups) on the patch grid -> LayerNorm over channels (no affine) -> GELU], each added to
    its input (a residual wherever the widths match), then Linear(decoder_dim -> dim) at
    the masked patches only. Input: [R, N, C] patch rows (no CLS), with the student's
    outputs at visible patches and mask noise elsewhere."""

    def __init__(self, dim: int, grid: tuple[int, int], layers: int = 6, kernel: int = 3, groups: int = 16,
                 decoder_dim: int = 0, eps: float = 1e-5):
        super().__init__()
        d = decoder_dim or dim
        if dim % groups or d % groups:
            raise ValueError(f"decoder widths {dim}, {d} must be multiples of groups={groups}")
        self.grid, self.eps = grid, eps
        self.convs = nn.ModuleList(nn.Conv2d(dim if i == 0 else d, d, kernel, padding=kernel // 2, groups=groups)
                                   for i in range(layers))
        self.proj = nn.Linear(d, dim)  # PyTorch's default init, convs and projection (fairseq resets the decoder)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Predictions [M, dim] for the M (``count``, when known on the host) true entries of
        ``mask`` [R, N], row-major."""
        from .. import ops

        R, N, C = x.shape
        h = x.transpose(1, 2).reshape(R, C, *self.grid)
        for conv in self.convs:
            y = conv(h)
            y = F.gelu(F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], eps=self.eps).permute(0, 3, 1, 2))
            h = y + h if y.shape == h.shape else y
        return self.proj(ops.masked_gather(h.flatten(2).transpose(1, 2), mask, count))


class VisionEncoder(nn.Module):
    """``forward(pixel_values, bool_masked_pos=None) -> last_hidden_state [B, 1 + N, C]``,
    the same function as ``Data2VecVisionModel(...).last_hidden_state`` (eval mode)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = LayerStack(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, style: str = "beit") -> None:
        """``beit`` (data2vec v1, data2vec_vision ``beit/modeling_cyclical.py``): truncated normal
        (std init_std, cut at ±1 std: its ``trunc_normal_`` passes ``a=-std, b=std``) for linear
        and conv weights, the CLS and mask tokens; zero biases; each block's two output
        projections divided by sqrt(2 * depth) (``fix_init_weight``).

        ``bert`` (data2vec 2.0, fairseq ``models/data2vec2.py`` ``init_bert_params`` and
        ``models/modalities/images.py``): linear weights N(0, init_std) untruncated, zero
        biases, no depth rescale; the patch embedding's weight ``xavier_uniform_`` over
        [out, in * k * k] (its bias PyTorch's default); the CLS token N(0, 1)
        (``init_extra_token_zero: false``)."""
        if style not in ("beit", "bert"):
            raise ValueError(f"init style {style!r}: expected beit or bert")
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if style == "beit":
                    nn.init.trunc_normal_(m.weight, std=std, a=-std, b=std)
                else:
                    nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        emb = self.embeddings
        if self.encoder.relative_position_bias is not None:
            nn.init.zeros_(self.encoder.relative_position_bias.relative_position_bias_table)
        if style == "bert":
            proj = emb.patch_embeddings.projection
            proj.reset_parameters()  # PyTorch's default bias
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
            nn.init.normal_(emb.cls_token)
            if emb.mask_token is not None:
                nn.init.normal_(emb.mask_token, std=std)
            return
        for token in (emb.cls_token, emb.mask_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=std, a=-std, b=std)
        for depth, layer in enumerate(self.encoder.layer, start=1):
            layer.attention.output.dense.weight.div_(math.sqrt(2.0 * depth))
            layer.output.dense.weight.div_(math.sqrt(2.0 * depth))

    def attention_bias(self) -> torch.Tensor | None:
        rpb = self.encoder.relative_position_bias
        return None if rpb is None else rpb()

    def run_layers(self, h: torch.Tensor, collect: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the blocks on embeddings [B, T, C]. ``collect``: None, ``"block"`` (each
        block's output after the residual) or ``"ffn"`` (each block's FFN output).
        Returns (the last block's output before the final layernorm, the collected list)."""
        bias = self.attention_bias()
        if bias is not None and bias.shape[-1] != h.shape[1]:
            raise ValueError(f"the relative position bias covers {bias.shape[-1]} positions, the input has "
                             f"{h.shape[1]}: v1 images mask with the mask token and keep every patch")
        if bias is not None:
            bias = bias.to(h.dtype)
        return run_blocks(self.encoder.layer, h, bias, collect=collect)

    def encode(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
               collect: str | None = None, drop_masked: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last_hidden_state, collected block outputs). ``bool_masked_pos`` [B, N] marks
        masked patches: replaced by the mask token, or with ``drop_masked`` removed after
        the position embeddings are added (2.0; rows must mask equal counts)."""
        if drop_masked and bool_masked_pos is not None:
            h = keep_visible(self.embeddings(pixel_values), bool_masked_pos)
        else:
            h = self.embeddings(pixel_values, bool_masked_pos)
        h = F.dropout(h, self.config.dropout, self.training)
        h, outputs = self.run_layers(h, collect)
        return self.layernorm(h), outputs

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                collect: str | None = None):
        """``last_hidden_state``; with ``collect``, ``encode``'s pair (the teacher calls its
        encoder through ``forward`` so that FSDP gathers the weights outside the blocks)."""
        if collect is not None:
            return self.encode(pixel_values, bool_masked_pos, collect=collect)
        return self.encode(pixel_values, bool_masked_pos)[0]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.embeddings.parameters())
        return n


# The SDPA kernels' aten ops, as a TorchDispatchMode sees them. The math kernel is composite
# (it decomposes into matmuls and a softmax), so it is what runs when none of these does.
_SDPA_OPS = {
    "aten._scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten._scaled_dot_product_flash_attention": "flash",
    "aten._scaled_dot_product_efficient_attention": "memory-efficient",
    "aten._scaled_dot_product_cudnn_attention": "cudnn",
    "aten._scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def attention_backend(model: VisionEncoder, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, batch: int = 2, backward: bool = True) -> str:
    """Which SDPA kernel one block of ``model`` runs on ``device`` in ``dtype``, with its
    attention bias (if any) needing a gradient as in training. Measured (the aten ops the
    call dispatches to), not inferred: PyTorch falls back to the math kernel silently when a
    fused kernel rejects the inputs (e.g. a float mask with a gradient). A dispatch mode, not
    the profiler, whose start and stop print lines of their own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    cfg = model.config
    T, C, H = cfg.num_patches + 1, cfg.hidden_size, cfg.num_heads
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, H, T, C // H, generator=gen).to(device, dtype).requires_grad_(backward)
               for _ in range(3))
    bias = model.attention_bias()
    if bias is not None:
        bias = bias.detach().to(device, dtype).requires_grad_(backward)
    with Seen() as seen:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if backward:
            out.float().sum().backward()
    found = [name for op, name in _SDPA_OPS.items() if op in seen.ops]
    return found[0] if len(found) == 1 else ("math" if not found else "+".join(found))


__all__ = ["VisionConfig", "VisionEncoder", "VISION_PRESETS", "RECIPE_FLAVOURS", "vision_config",
           "hf_config_dict", "config_from_hf", "hf_image_processor_dict", "sincos_positions_2d",
           "relative_position_index", "keep_visible", "GridDecoder", "attention_backend"]
