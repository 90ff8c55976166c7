"""The RoBERTa-style post-LN text encoder, with Hugging Face ``Data2VecTextModel``
parameter names and semantics (docs/design.md#hf-layout), so that export is a save, not a translation.

The block's computation is ``models.blocks.Block`` (shared by every modality); this file
lays out its parameters as Hugging Face does and adds the text embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .blocks import LOW_COPY, Block, Dense, QueryKeyValue, attention_mask, run_blocks


@dataclass
class EncoderConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    max_seq_len: int = 512  # the position table has max_seq_len + pad_id + 1 rows (514)
    pad_id: int = 1
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.02

    @property
    def max_positions(self) -> int:
        return self.max_seq_len + self.pad_id + 1


ENCODER_PRESETS = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, ffn_size=512),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
}


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size, padding_idx=cfg.pad_id)
        self.token_type_embeddings = nn.Embedding(1, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings before dropout (the teacher uses them without dropout)."""
        not_pad = input_ids.ne(self.pad_id).long()
        # RoBERTa positions: real tokens count from pad_id + 1, padding sits at pad_id
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_id
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        h = h + self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)


SelfAttention = QueryKeyValue  # Data2VecTextSelfAttention's query/key/value


class _Slice:
    """``query``/``key``/``value`` of a fused projection as attribute paths (``.weight`` and
    ``.bias`` rows of ``qkv``), so code that walks state-dict names through attributes
    (torch.distributed.checkpoint's name mapping) finds them."""

    def __init__(self, fused: nn.Linear, part: int):
        rows = slice(part * fused.out_features // 3, (part + 1) * fused.out_features // 3)
        self.weight, self.bias = fused.weight[rows], fused.bias[rows]


class FusedSelfAttention(nn.Module):
    """The three attention projections as one ``Linear(C, 3C)`` (one GEMM instead of three;
    ``--train.fused_qkv``). Its state dict still holds Hugging Face's separate
    ``query/key/value`` weights, and it loads either form: checkpoints and exports do not
    depend on the switch."""

    PARTS = ("query", "key", "value")

    def __init__(self, hidden_size: int):
        super().__init__()
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.register_state_dict_post_hook(FusedSelfAttention._split_state)
        self.register_load_state_dict_pre_hook(FusedSelfAttention._join_state)

    @classmethod
    def from_separate(cls, sa: SelfAttention) -> "FusedSelfAttention":
        C = sa.query.in_features
        fused = cls(C).to(device=sa.query.weight.device, dtype=sa.query.weight.dtype)
        with torch.no_grad():
            fused.qkv.weight.copy_(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]))
            fused.qkv.bias.copy_(torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]))
        return fused

    query = property(lambda self: _Slice(self.qkv, 0))
    key = property(lambda self: _Slice(self.qkv, 1))
    value = property(lambda self: _Slice(self.qkv, 2))

    @staticmethod
    def _split_state(module, state_dict, prefix, local_metadata):
        for kind in ("weight", "bias"):
            fused = state_dict.pop(prefix + "qkv." + kind)
            for name, part in zip(FusedSelfAttention.PARTS, fused.chunk(3)):
                state_dict[prefix + name + "." + kind] = part.clone()  # own storage, not a slice of a flat buffer

    @staticmethod
    def _join_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for kind in ("weight", "bias"):
            names = [prefix + p + "." + kind for p in FusedSelfAttention.PARTS]
            if all(n in state_dict for n in names):
                state_dict[prefix + "qkv." + kind] = torch.cat([state_dict.pop(n) for n in names])


def fuse_qkv_(layers) -> None:
    """Swap every layer's ``SelfAttention`` for a ``FusedSelfAttention`` with the same
    weights, in place (before ``flatten_params_`` and before the optimizer is built)."""
    for layer in layers:
        if isinstance(layer.attention.self, SelfAttention):
            layer.attention.self = FusedSelfAttention.from_separate(layer.attention.self)


def _2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as rows ``[N, C]`` (itself when it is already: no view op)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


class _ShadowLinearFn(torch.autograd.Function):
    """``x @ w.T + b`` on low-precision copies of a trainable Linear's weight and bias, with
    the gradients going to the fp32 parameters themselves. The ops, forward and backward, are
    the ones autocast's ``linear`` runs on the copies it casts (``addmm`` on the 2-D view of a
    contiguous input; ``grad @ w``, ``grad.T @ x``, ``grad.sum(0)``, each gradient cast back to
    its parameter's dtype), so the values are the same bit for bit, without the two weight
    casts and the transposes per call."""

    @staticmethod
    def forward(ctx, x, weight, bias, w, w_t, b, x_low=None):
        x_dtype = x.dtype  # ``x_low``: x already rounded (a DualLayerNorm's copy), no cast
        x2 = _2d(x.to(w_t.dtype) if x_low is None else x_low)
        ctx.save_for_backward(x2, w)
        ctx.meta = (x.shape, x_dtype, weight.dtype, bias is not None)
        out = torch.addmm(b, x2, w_t) if b is not None else torch.mm(x2, w_t)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, w = ctx.saved_tensors
        shape, x_dtype, p_dtype, has_bias = ctx.meta
        g2 = _2d(grad)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _input_grad(g2, w, x_dtype)
            gx = gx if len(shape) == 2 else gx.view(shape)
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(g2, x2, p_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            gb = _bias_grad(g2, p_dtype)
        return gx, gw, gb, None, None, None, None


# On a GPU the parameter gradients of a shadowed Linear leave their GEMM and their sum in the
# parameter's dtype (fp32), unrounded: one kernel each instead of a bf16 result and a cast
# (``mm(..., out_dtype=)``, CUDA's bf16 GEMM with fp32 output; a sum with ``dtype=``); so does
# the input gradient of an fp32 input (a LayerNorm's output, which the Linear casts). That is
# autocast's arithmetic less one rounding to bf16, so it is at least as accurate. The CPU keeps
# autocast's arithmetic bit for bit (its ``mm`` has no ``out_dtype``).
_MM_OUT_DTYPE: list[bool] = []  # [] until the first CUDA call says whether this torch has it


def _fp32_grads(t: torch.Tensor) -> bool:
    return t.is_cuda


def _mm_out(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``a @ b`` with a ``dtype`` result straight from the GEMM, or None where torch lacks it."""
    if _MM_OUT_DTYPE == [False]:
        return None
    try:
        out = torch.mm(a, b, out_dtype=dtype)
    except (TypeError, RuntimeError, NotImplementedError):
        _MM_OUT_DTYPE[:] = [False]
        return None
    _MM_OUT_DTYPE[:] = [True]
    return out


def _weight_grad(g2: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype != g2.dtype and _fp32_grads(g2):
        out = _mm_out(g2.t(), x2, dtype)
        if out is not None:
            return out
    return g2.t().mm(x2).to(dtype)


def _input_grad(g2: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32 and dtype != g2.dtype and _fp32_grads(g2):
        out = _mm_out(g2, w, dtype)
        if out is not None:
            return out
    return g2.mm(w).to(dtype)


def _bias_grad(g2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype != g2.dtype and _fp32_grads(g2):
        return g2.sum(0, dtype=dtype)
    return g2.sum(0).to(dtype)


class DualLayerNorm(nn.LayerNorm):
    """A LayerNorm whose fp32 output, under autocast, also carries its rounding to autocast's
    dtype (``ops.layer_norm_dual``, one kernel for both on a GPU), for the ``ShadowedLinear``
    that reads it next: in a post-LN block the output is both the residual stream (fp32) and
    the next Linear's input, which autocast would cast (a kernel, and in backward the cast's
    gradient and an add). Same parameters and state-dict names as ``nn.LayerNorm``; outside
    autocast, or while compiling, it is ``nn.LayerNorm``. ``forward(x, residual)`` normalizes
    ``x + residual``: a block's residual add, in the norm's own pass where no backward follows
    (``Block.forward`` passes it to norms that say ``takes_residual``; a forward hook on the
    norm then sees the stream and the branch as its two inputs)."""

    takes_residual = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        kind = x.device.type
        low = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        if x.dtype != torch.float32 or low not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
            return super().forward(x if residual is None else x + residual)
        params = self._parameters  # (nn.Module's attribute lookup is slow; this runs per block per forward)
        y, y_low = ops.layer_norm_dual(x, params["weight"], params["bias"], self.eps, low, residual)
        setattr(y, LOW_COPY, y_low)
        return y


class ShadowedLinear(nn.Linear):
    """A Linear that, under autocast to its copy's dtype, reads low-precision copies of its
    weight and bias (``weight_shadow``/``bias_shadow``, views of one flat buffer that the
    trainer keeps up to date) instead of letting autocast cast the fp32 parameters on every
    forward: the same rounded values (both round to nearest even), no cast kernels. A teacher's
    copies are written by the EMA (``--train.bf16_teacher``); a student's after each optimizer
    step (``--train.bf16_student``), its gradients reaching the fp32 parameters
    (``_ShadowLinearFn``)."""

    # The only Linear that reads its input (a LayerNorm's output, beside the residual): its input
    # gradient may reach the LayerNorm in bf16, through the rounded copy, and be summed there in
    # fp32 with the residual's, as autograd sums them after a cast. BERT's query, key and value
    # read one input together; their bf16 gradients would be summed in bf16, so they take the
    # copy for the GEMM only and return an fp32 gradient, as autocast's three casts do.
    sole_reader = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the copies are a student's plain attributes or a teacher's buffers; read from their
        # dicts (this runs once per Linear per forward: nn.Module's attribute lookup is slow)
        own, buffers = self.__dict__, self._buffers
        shadow = own["weight_shadow"] if "weight_shadow" in own else buffers.get("weight_shadow")
        kind = x.device.type
        if shadow is None or not torch.is_autocast_enabled(kind) or torch.get_autocast_dtype(kind) != shadow.dtype:
            return super().forward(x)
        bias_shadow = own["bias_shadow"] if "bias_shadow" in own else buffers.get("bias_shadow")
        w_t = own["weight_shadow_t"]
        low = getattr(x, LOW_COPY, None)  # a DualLayerNorm's rounded output: no cast here
        if low is not None and low.dtype != shadow.dtype:
            low = None
        if low is not None and self.sole_reader:  # its gradient, too, reaches the norm in bf16
            x, low = low, None
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
            # the same node in C++; not while compiling (dynamo traces the Python Function, and
            # must not meet the extension's first lookup: a graph break in every block)
            c = None if torch.compiler.is_compiling() else ops.native()
            if c is not None:
                return c.shadow_linear(x, weight, bias, shadow, w_t, bias_shadow, low, _fp32_grads(x))
            return _ShadowLinearFn.apply(x, weight, bias, shadow, w_t, bias_shadow, low)
        x2 = _2d(x.to(shadow.dtype) if low is None else low)  # linear, less its transpose
        out = torch.addmm(bias_shadow, x2, w_t) if bias_shadow is not None else torch.mm(x2, w_t)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def shadow_linears_(layers: nn.Module, flat: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                    buffers: bool = True, dual_norms: bool = True) -> torch.Tensor:
    """Give every ``nn.Linear`` in ``layers`` (whose parameters ``flatten_params_`` laid out
    in ``flat``) a ``dtype`` copy of its weight and bias, as views of one new buffer with
    ``flat``'s layout, so that ``ema_update_(..., shadow=buffer)`` writes it in its own pass
    (or ``buffer.copy_(flat)`` after an optimizer step). The Linears become ``ShadowedLinear``
    (same Parameter objects, same state-dict names); loading a state dict into ``layers``
    refreshes the copy. Its LayerNorms become ``DualLayerNorm`` (same Parameters), whose output
    brings its bf16 rounding to the Linear that reads it. ``buffers``: register the views as
    non-persistent buffers (a teacher); False keeps them plain attributes (a student under DDP,
    which would broadcast buffers every forward). Returns the buffer."""
    shadow = flat.detach().to(dtype)
    base, size = flat.data_ptr(), flat.element_size()

    def view_of(p: torch.Tensor) -> torch.Tensor:
        start = (p.data_ptr() - base) // size
        same_storage = p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        if not same_storage or not 0 <= start <= flat.numel() - p.numel():
            raise ValueError("shadow_linears_: a parameter is not in the given flat buffer; call flatten_params_ first")
        return shadow[start:start + p.numel()].view_as(p)

    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if dual_norms and type(child) is nn.LayerNorm and child.elementwise_affine:
                norm = DualLayerNorm(child.normalized_shape, eps=child.eps, device="meta")
                norm.weight, norm.bias = child.weight, child.bias  # the same Parameters
                setattr(parent, name, norm)
            if type(child) is nn.Linear:
                new = ShadowedLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device="meta")
                new.weight, new.bias = child.weight, child.bias  # the same Parameters: flat views, optimizer, EMA
                w, b = view_of(child.weight), (view_of(child.bias) if child.bias is not None else None)
                if buffers:
                    new.register_buffer("weight_shadow", w, persistent=False)
                    new.register_buffer("bias_shadow", b, persistent=False)
                else:
                    new.weight_shadow, new.bias_shadow = w, b
                new.weight_shadow_t = w.t()  # addmm's right operand, a view: no transpose per call
                setattr(parent, name, new)
    for block in layers.modules():  # separate query, key and value Linears read one input together
        if isinstance(block, Block) and isinstance(proj := block.qkv_projections(), tuple):
            for lin in proj:
                lin.sole_reader = False

    def refresh(module, incompatible_keys):
        with torch.no_grad():
            shadow.copy_(flat)

    layers.register_load_state_dict_post_hook(refresh)
    return shadow


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(cfg.hidden_size)
        self.output = Dense(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)


class Layer(Block):
    """Post-LN block (``models.blocks.Block``) in ``Data2VecTextLayer``'s layout."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(num_heads=cfg.num_heads, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout)
        self.attention = Attention(cfg)
        self.intermediate = Dense(cfg.hidden_size, cfg.ffn_size)
        self.output = Dense(cfg.ffn_size, cfg.hidden_size, cfg.layer_norm_eps)

    def qkv_projections(self):
        sa = self.attention.self
        return sa if isinstance(sa, FusedSelfAttention) else (sa.query, sa.key, sa.value)

    def norms(self):
        return self.attention.output.LayerNorm, self.output.LayerNorm


def run_layers(layers: nn.ModuleList, h: torch.Tensor, padding_mask: torch.Tensor | None,
               collect_ffn: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return run_blocks(layers, h, attention_mask(padding_mask, h), collect="ffn" if collect_ffn else None)


class LayerStack(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))


class Encoder(nn.Module):
    """``forward(input_ids, attention_mask=None) -> last_hidden_state [B, T, C]``.

    ``attention_mask`` follows Hugging Face (1 = token, 0 = padding); when it is None,
    padding is read off ``input_ids == pad_id``.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = LayerStack(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def padding_from(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor | None:
        pad = input_ids.eq(pad_id)
        return pad if bool(pad.any()) else None

    def encode(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
               collect_ffn: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = F.dropout(self.embeddings(input_ids), self.config.dropout, self.training)
        return run_layers(self.encoder.layer, h, padding_mask, collect_ffn)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            padding = self.padding_from(input_ids, self.config.pad_id)
        else:
            padding = attention_mask.eq(0)
            padding = padding if bool(padding.any()) else None
        return self.encode(input_ids, padding)[0]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.embeddings.parameters())
        return n
