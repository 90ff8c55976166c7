"""The one transformer block of every encoder (text, speech, images).

Each modality's layer class only lays out the parameters under its Hugging Face model's
names (``Data2VecTextLayer``, ``Data2VecAudioEncoderLayer``, ``Data2VecVisionLayer``), so
that export is a save, not a translation, and says where the LayerNorms sit; the
computation is ``Block.forward``, here, once:

    post-LN (text, speech):  h = LN1(h + drop(attn(h)));      h = LN2(h + drop(ffn(h)))
    pre-LN  (images, BEiT):  h = h + dp(λ1 · drop(attn(LN1(h)))); h = h + dp(λ2 · drop(ffn(LN2(h))))

with ``ffn(x) = fc2(act_drop(gelu(fc1(x))))``, optional layer scale λ (images), drop path
``dp`` (images) and activation dropout (speech). Attention is
``F.scaled_dot_product_attention`` (no mask for unpadded batches so PyTorch may pick its
flash backend, a boolean padding mask, or a float bias such as BEiT's relative position
bias), or ``flash_attn``'s varlen kernel for padded half-precision CUDA batches. Every
block returns ``(output, ffn)``: ``ffn`` is the FFN output before dropout, layer scale,
residual and LayerNorm, the data2vec target of the speech and text recipes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graphs import attached

try:  # optional extra: pip install -e ".[flash]"
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # ImportError, or a binary built for another torch
    flash_attn_varlen_func = None


# A tensor attribute: the low-precision rounding of a LayerNorm's fp32 output
# (``models.encoder.DualLayerNorm``), read by the Linear that takes that output next.
LOW_COPY = "_d2v_low"

# Bumped whenever any module registers a submodule (``setattr`` of a Module, ``add_module``):
# a block's looked-up layout (``Block._layout``) is kept until then, so a fused QKV projection
# or a shadowed Linear swapped in place is picked up at the next call.
_LAYOUT_GENERATION = [0]


def _new_submodule(module, name, submodule):
    _LAYOUT_GENERATION[0] += 1  # (returns None: the submodule is registered as it is)


nn.modules.module.register_module_module_registration_hook(_new_submodule)


_MODULE_CALL = nn.Module.__call__


def _unhooked(modules) -> bool:
    """True when calling these modules' ``forward`` is what calling them does (``nn.Module``'s
    own fast path: no forward or backward hook on them or on every module, no compiled call, no
    JIT trace, ``__call__`` neither overridden nor patched, as FX's tracer patches it), so a
    block may skip ``__call__``'s two Python frames per Linear and norm."""
    g = nn.modules.module
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks or torch._C._get_tracing_state()):
        return False
    for m in modules:
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or m._compiled_call_impl is not None or type(m).__call__ is not _MODULE_CALL):
            return False
    return True


class Varlen:
    """Real-token layout of a padded batch for ``flash_attn_varlen_func``: attention runs
    on the packed real tokens only, padded rows of the output are zero."""

    def __init__(self, padding_mask: torch.Tensor):
        keep = (~padding_mask).reshape(-1)
        self.index = keep.nonzero().squeeze(1)
        lengths = (~padding_mask).sum(1, dtype=torch.int32)
        self.cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        self.max_len = int(lengths.max())

    def attend(self, q, k, v, dropout_p: float) -> torch.Tensor:
        B, T, H, D = q.shape
        pack = lambda x: x.reshape(B * T, H, D).index_select(0, self.index)
        o = flash_attn_varlen_func(pack(q), pack(k), pack(v), self.cu_seqlens, self.cu_seqlens,
                                   self.max_len, self.max_len, dropout_p=dropout_p)
        out = o.new_zeros(B * T, H, D).index_copy_(0, self.index, o)
        return out.view(B, T, H, D)


def attention_mask(padding_mask: torch.Tensor | None, like: torch.Tensor | None = None):
    """What the blocks get for attention from a padding mask (True = padding): None for
    unpadded batches, a ``Varlen`` for padded half-precision CUDA batches when flash-attn
    is installed, else the SDPA boolean mask ``[B, 1, 1, T]`` (True = attend)."""
    if padding_mask is None:
        return None
    if (flash_attn_varlen_func is not None and like is not None and like.is_cuda
            and (like.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled("cuda"))):
        return Varlen(padding_mask)
    return (~padding_mask)[:, None, None, :]


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's whole residual branch with probability p."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], *(1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # no call at p = 0: the same graph (and RNG use) as a block without that dropout
    return F.dropout(x, p, training) if p > 0.0 and training else x


class QueryKeyValue(nn.Module):
    """BERT/BEiT's ``query``/``key``/``value`` projections (BEiT: no key bias)."""

    def __init__(self, hidden_size: int, key_bias: bool = True):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size, bias=key_bias)
        self.value = nn.Linear(hidden_size, hidden_size)


class Dense(nn.Module):
    """BERT/BEiT's sublayer container: a ``dense`` Linear and, where the layout has one
    there (post-LN text), its ``LayerNorm``."""

    def __init__(self, d_in: int, d_out: int, norm_eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if norm_eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=norm_eps)


class Block(nn.Module):
    """A transformer block. Subclasses create the parameters under their Hugging Face names
    and return them from the layout methods below (looked up again after any module
    registration, so modules swapped in place, e.g. a fused QKV projection or a bf16-shadowed
    Linear, are used: ``_layout``)."""

    norm_first = False  # pre-LN (BEiT) instead of post-LN (RoBERTa, wav2vec 2.0)

    def __init__(self, *, num_heads: int, dropout: float, attention_dropout: float,
                 activation_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.num_heads, self.dropout, self.attention_dropout = num_heads, dropout, attention_dropout
        self.activation_dropout, self.drop_path = activation_dropout, drop_path

    # ----------------------------------------------------------------- layout (subclasses)
    # The defaults are the BERT/BEiT names Hugging Face uses for text and images
    # (``attention.output.dense``, ``intermediate.dense``, ``output.dense``).
    def qkv_projections(self) -> nn.Module | tuple[nn.Module, nn.Module, nn.Module]:
        """(query, key, value) Linears, or one fused module with a ``qkv`` Linear(C, 3C)."""
        raise NotImplementedError

    def attention_out(self) -> nn.Module:
        return self.attention.output.dense

    def ffn_in(self) -> nn.Module:
        return self.intermediate.dense

    def ffn_out(self) -> nn.Module:
        return self.output.dense

    def norms(self) -> tuple[nn.Module, nn.Module]:
        """(the attention sublayer's LayerNorm, the FFN sublayer's)."""
        raise NotImplementedError

    def layer_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def _layout(self) -> tuple:
        """(qkv projections, attention out, FFN in, FFN out, norm 1, norm 2, whether the norms
        take the residual), looked up through the layout methods once per module registration
        anywhere (``_LAYOUT_GENERATION``), not at every call (seven nested attribute lookups per
        block per forward); always looked up while compiling (a guard on the generation would
        recompile at every registration)."""
        compiling = torch.compiler.is_compiling()  # first: dynamo must not guard on the generation
        own = self.__dict__
        cached = None if compiling else own.get("_layout_cached")
        if cached is not None and cached[0] == _LAYOUT_GENERATION[0]:
            return cached[1]
        norms = self.norms()
        # post-LN norms that add the residual in their own pass (models.encoder.DualLayerNorm)
        fold = not self.norm_first and all(getattr(type(n), "takes_residual", False) for n in norms)
        layout = (self.qkv_projections(), self.attention_out(), self.ffn_in(), self.ffn_out(), *norms, fold)
        if not compiling:
            own["_layout_cached"] = (_LAYOUT_GENERATION[0], layout)
        return layout

    # ----------------------------------------------------------------- the computation
    def attend(self, x: torch.Tensor, attn_mask, shape: tuple[int, int] | None = None,
               layout: tuple | None = None, direct: bool = False) -> torch.Tensor:
        """Self-attention of ``x``: ``[B, T, C]``, or ``[B·T, C]`` with ``shape`` = (B, T)."""
        if x.dim() == 3:
            B, T, C = x.shape
        else:
            (B, T), C = shape, x.shape[-1]
        H = self.num_heads
        proj, out = (layout or self._layout())[:2]
        if direct:  # (``_unhooked``)
            out = out.forward
        p = self.attention_dropout if self.training else 0.0
        if not isinstance(proj, tuple) and not isinstance(attn_mask, Varlen) and not torch.is_grad_enabled():
            # no backward (the teacher): one permute to [3, B, H, T, D] gives the same views as
            # unbinding and transposing q, k and v (under autograd the permute's backward copies)
            q, k, v = proj.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
            return out(a.transpose(1, 2).reshape(x.shape))
        if isinstance(proj, tuple):
            q, k, v = (lin(x).view(B, T, H, C // H) for lin in proj)
        else:
            q, k, v = proj.qkv(x).view(B, T, 3, H, C // H).unbind(2)
        if isinstance(attn_mask, Varlen):
            a = attn_mask.attend(q, k, v, p).reshape(x.shape)
        else:
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=attn_mask, dropout_p=p)
            a = a.transpose(1, 2).reshape(x.shape)
        return out(a)

    def forward(self, h: torch.Tensor, attn_mask=None, shape: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h``: ``[B, T, C]``, or ``[B·T, C]`` with ``shape`` = (B, T) (``run_blocks``' way:
        the Linears then take their input as it is, no reshape in and out). ``attn_mask``:
        None, an SDPA boolean mask ``[B, 1, 1, T]`` (True = attend) or float bias, or a
        ``Varlen``. Returns (the block's output, its FFN output), shaped as ``h``."""
        layout = self._layout()
        _, _, ffn_in, ffn_out, norm1, norm2, fold = layout
        direct = not torch.compiler.is_compiling() and _unhooked(layout[1:6])
        if direct:  # their forwards, as their __call__ would run them (``_unhooked``)
            ffn_in, ffn_out, norm1, norm2 = ffn_in.forward, ffn_out.forward, norm1.forward, norm2.forward
        scale1, scale2 = self.layer_scales()
        x = norm1(h) if self.norm_first else h
        a = _dropout(self.attend(x, attn_mask, shape, layout, direct), self.dropout, self.training)
        if scale1 is not None:
            a = scale1 * a
        h = self._residual(h, self._drop_path(a, shape), norm1, fold)
        x = norm2(h) if self.norm_first else h
        ffn = ffn_out(_dropout(F.gelu(ffn_in(x)), self.activation_dropout, self.training))
        f = _dropout(ffn, self.dropout, self.training)
        if scale2 is not None:
            f = scale2 * f
        return self._residual(h, self._drop_path(f, shape), norm2, fold), ffn

    def _residual(self, h: torch.Tensor, branch: torch.Tensor, norm, fold: bool) -> torch.Tensor:
        """``h + branch``, then (post-LN) ``norm``; with ``fold``, ``norm(h, branch)``: the add in
        the norm's own pass (``DualLayerNorm``)."""
        if fold:
            return norm(h, branch)
        h = h + branch
        return h if self.norm_first else norm(h)

    def _drop_path(self, x: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
        if x.dim() == 2 and self.drop_path > 0.0 and self.training:  # per sample: on its [B, T, C] view
            return drop_path(x.view(*shape, x.shape[-1]), self.drop_path, True).view(x.shape)
        return drop_path(x, self.drop_path, self.training)


def run_blocks(blocks, h: torch.Tensor, attn_mask=None, *, collect: str | None = None,
               layerdrop: float = 0.0, generator: torch.Generator | None = None,
               keep_dropped_in_graph: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``blocks`` on ``h``. ``collect``: None, ``"ffn"`` (each run block's FFN output)
    or ``"block"`` (each run block's output). ``layerdrop`` > 0 skips each block with that
    probability (one draw per block, from ``generator`` or the global RNG); a skipped block
    adds no output to ``collect`` (fairseq: a skipped layer adds no target either). With
    ``keep_dropped_in_graph`` a skipped block adds ``0 * sum(parameters)``, so DDP sees a
    gradient for every parameter (not under FSDP2, whose sharded DTensors need no help)."""
    if collect not in (None, "ffn", "block"):
        raise ValueError(f"collect={collect!r}: expected None, 'ffn' or 'block'")
    if layerdrop <= 0:  # the stack's CUDA graphs, when the trainer attached them (d2v_fast.graphs)
        graphs = attached(blocks)
        if graphs is not None:
            out = graphs.run(h, attn_mask, collect)
            if out is not None:
                return out
    return _run_blocks(blocks, h, attn_mask, collect, layerdrop, generator, keep_dropped_in_graph)


def run_blocks_eager(blocks, h: torch.Tensor, attn_mask, collect: str | None):
    """``run_blocks`` without graphs or layer drop (what a stack's graphs record)."""
    return _run_blocks(blocks, h, attn_mask, collect, 0.0, None, False)


def _run_blocks(blocks, h, attn_mask, collect, layerdrop, generator, keep_dropped_in_graph):
    outputs = []
    shape = None
    if h.dim() == 3:  # the stack runs on [B·T, C]: no reshape around each Linear
        B, T, C = h.shape
        shape = (B, T)
        h = _rows(h, (B * T, C))
    for block in blocks:
        if layerdrop > 0 and float(torch.rand((), generator=generator)) < layerdrop:
            if keep_dropped_in_graph:
                params = list(block.parameters())
                if not any(hasattr(p, "to_local") for p in params):
                    h = h + sum(p.sum() for p in params) * 0.0
            continue
        h_in, (h, ffn) = h, block(h, attn_mask, shape)
        if hasattr(h_in, LOW_COPY):  # read by this block: a collected output keeps no second copy
            delattr(h_in, LOW_COPY)
        if collect == "ffn":
            outputs.append(ffn if shape is None else ffn.view(*shape, ffn.shape[-1]))
        elif collect == "block":
            outputs.append(h if shape is None else h.view(*shape, h.shape[-1]))
    if shape is not None:
        h = _rows(h, (*shape, h.shape[-1]))
    return h, outputs


def _rows(h: torch.Tensor, shape) -> torch.Tensor:
    """``h`` reshaped, with its LayerNorm's low-precision copy (if any) reshaped alike."""
    out = h.reshape(shape)
    low = getattr(h, LOW_COPY, None)
    if low is not None:
        setattr(out, LOW_COPY, low.reshape(shape))
    return out
