"""Whole-stack CUDA graphs (``--train.compile stack-cudagraphs``).

A GPU step that is launch-bound waits on the host's Python, dispatcher and launches for every
kernel of every block. Here the encoder stack runs as CUDA graphs instead: the teacher's stack
(no gradient) as one graph, the student's as two (its forward, and its backward to the stack's
input and every block parameter), each replayed with one call. A graph replays the kernels it
recorded on the buffers it recorded them with, so every graph has static buffers: its input
``[B, T, C]`` (and attention mask) are copied in before a replay, its outputs are read from the
same tensors each time, and the backward reads the output gradient from a static buffer and
leaves the input and parameter gradients in static buffers, which autograd then accumulates
into ``.grad`` as it does any gradient.

Shapes must repeat for graphs to be reused: one graph set is recorded per **shape bucket**,
the sequence length padded up to a multiple of ``granule`` (``--train.graph_bucket``); the
padded positions are masked out of attention as keys (their query rows are computed and
dropped, and get a zero gradient), so the real positions' outputs are the same function of
the real input. A batch whose length is already a multiple, with or without padding, runs at
its own shape. At most ``max_graphs`` buckets are recorded per stack; a shape beyond them
runs eager (counted in ``eager_calls``), as does a stack whose recording failed (said once on
stderr, the reason in ``failed``).

What graphs change: nothing in the arithmetic (the same blocks, kernels and dropout draws
from CUDA's generator, which graphs advance per replay), but a bucket's padding can move the
attention to a masked SDPA backend. Outputs are the static buffers themselves: they hold
until the same graph replays again (the trainer reads each before its next micro-batch).
Layer drop (a host-side draw per block) and ``Varlen`` attention run eager.

``Capture`` is how a graph is made: ``CudaCapture`` records on the GPU; ``EagerReplay`` is
its CPU stand-in for tests, which runs the same function again on the same static buffers
at each "replay", so everything here but the recording itself is exercised without a GPU.
"""
from __future__ import annotations

import dataclasses
import sys
import weakref
from typing import Callable

import torch

__all__ = ["StackGraphs", "CudaCapture", "EagerReplay", "bucket", "pad_attention_mask", "attach", "attached"]


def bucket(n: int, granule: int) -> int:
    """``n`` padded up to a multiple of ``granule`` (``granule`` <= 1: ``n`` itself)."""
    if granule <= 1:
        return n
    return -(-n // granule) * granule


def pad_attention_mask(attn_mask: torch.Tensor | None, batch: int, length: int, padded: int,
                       device: torch.device) -> torch.Tensor | None:
    """The SDPA mask of ``length`` real positions padded to ``padded``: the padded keys masked
    out. None (no mask): a boolean ``[B, 1, 1, padded]``; a boolean ``[B, 1, 1, length]``
    (True = attend) padded with False; an additive float one padded with ``-inf``. Returns
    None for a mask of another layout (a per-query bias: no bucketing, the exact shape)."""
    if attn_mask is None:
        keep = torch.zeros(batch, 1, 1, padded, dtype=torch.bool, device=device)
        keep[..., :length] = True
        return keep
    if attn_mask.dim() != 4 or attn_mask.shape[1:3] != (1, 1) or attn_mask.shape[-1] != length:
        return None
    fill = False if attn_mask.dtype == torch.bool else float("-inf")
    out = attn_mask.new_full((*attn_mask.shape[:-1], padded), fill)
    out[..., :length] = attn_mask
    return out


# ------------------------------------------------------------------------------ recording
class CudaCapture:
    """Graphs recorded on the GPU (``torch.cuda.CUDAGraph``): a few warm-up runs on a side
    stream (cuBLAS workspaces, autotuning and lazy allocations happen outside the recording),
    then the forward and, for training, the backward. One capture serves one stack, and all
    that stack's graphs (every bucket, forward and backward) share one memory pool: what one
    graph keeps between replays (its static outputs and gradients) stays allocated, and the
    rest, its intermediates, is dead once its backward (or, without one, its forward) has
    replayed, which is always before the stack's next forward replays; so the buckets share
    one stack's worth of activation memory rather than holding one each."""

    warmup = 3

    def __init__(self):
        self.pool = None

    def _pool(self):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool

    def forward(self, fn: Callable[[], list[torch.Tensor]]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool()):
            outs = fn()
        return outs, graph.replay

    def train(self, fn: Callable[[], list[torch.Tensor]], inputs: list[torch.Tensor]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                outs = fn()
                torch.autograd.grad(outs, inputs, [torch.zeros_like(o) for o in outs], allow_unused=True)
            del outs
        torch.cuda.current_stream().wait_stream(stream)
        pool = self._pool()
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, pool=pool):
            outs = fn()
        grads_out = [torch.empty_like(o) for o in outs]
        with torch.cuda.graph(bwd, pool=pool):
            grads_in = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
        return outs, grads_out, list(grads_in), fwd.replay, bwd.replay


class EagerReplay:
    """The CPU stand-in for ``CudaCapture`` (tests): the same static buffers, each "replay"
    running the function again and writing its results into them."""

    def __init__(self):
        self.records = 0  # graphs "recorded"

    def forward(self, fn):
        self.records += 1
        outs = [o.detach().clone() for o in fn()]

        def replay():
            with torch.no_grad():
                for s, o in zip(outs, fn()):
                    s.copy_(o)
        return outs, replay

    def train(self, fn, inputs):
        self.records += 1
        with torch.enable_grad():
            first = fn()
        outs = [o.detach().clone() for o in first]
        grads_out = [torch.zeros_like(o) for o in outs]
        grads_in = [None if g is None else g.detach().clone()
                    for g in torch.autograd.grad(first, inputs, grads_out, allow_unused=True)]
        live: list[list[torch.Tensor]] = []

        def replay_fwd():
            with torch.enable_grad():
                out = fn()
            with torch.no_grad():
                for s, o in zip(outs, out):
                    s.copy_(o)
            live[:] = [out]

        def replay_bwd():
            got = torch.autograd.grad(live.pop(), inputs, grads_out, allow_unused=True)
            with torch.no_grad():
                for s, g in zip(grads_in, got):
                    if s is not None:
                        s.copy_(g)
        return outs, grads_out, grads_in, replay_fwd, replay_bwd


# ------------------------------------------------------------------------------ the stack
@dataclasses.dataclass
class _Graph:
    h: torch.Tensor  # static input [B, T_bucket, C]
    mask: torch.Tensor | None  # static attention mask
    outs: list[torch.Tensor]  # static outputs: the stack's output, then what it collects
    replay: Callable[[], None]
    grads_out: list[torch.Tensor] | None = None  # training: the outputs' gradients, read by the backward graph
    grads_in: list[torch.Tensor | None] | None = None  # the input's and parameters' gradients, written by it
    replay_bwd: Callable[[], None] | None = None
    replays: int = 0


class _Replay(torch.autograd.Function):
    """The student's stack as one autograd node: forward copies the input into the static
    buffer and replays the forward graph; backward copies the outputs' gradients in, replays
    the backward graph and hands autograd the input's and parameters' gradients."""

    @staticmethod
    def forward(ctx, graph: _Graph, h, *params):
        _fill(graph, h)
        graph.replay()
        ctx.graph, ctx.params, ctx.h_leaf, ctx.length = graph, params, h.grad_fn is None, h.shape[1]
        return tuple(o.detach() for o in graph.outs)

    @staticmethod
    def backward(ctx, *grads):
        graph = ctx.graph
        for static, g in zip(graph.grads_out, grads):
            if g is None:
                static.zero_()
            else:
                static.copy_(g)
        graph.replay_bwd()
        # The gradients live in static buffers that the next replay overwrites. Autograd passes
        # one on at once, except into a leaf's .grad: where that is still None it would keep the
        # tensor itself (and a later micro-batch's replay would change it), so those get copies.
        gh, *gp = graph.grads_in
        if gh is not None:
            gh = gh.detach()[:, :ctx.length]  # the real rows of a padded bucket
            if ctx.h_leaf:
                gh = gh.clone()
        fresh = [i for i, (p, g) in enumerate(zip(ctx.params, gp)) if g is not None and p.grad is None]
        gp = [None if g is None else g.detach() for g in gp]
        if fresh:
            for i, g in zip(fresh, torch._foreach_mul([gp[i] for i in fresh], 1.0)):  # exact copies
                gp[i] = g
        return (None, gh, *gp)


def _fill(graph: _Graph, h: torch.Tensor) -> None:
    """Copy ``h`` ``[B, T, C]`` into the static input ``[B, T_bucket, C]``, zeros after it."""
    T = h.shape[1]
    if T == graph.h.shape[1]:
        graph.h.copy_(h)
    else:
        graph.h[:, :T].copy_(h)
        graph.h[:, T:].zero_()


class StackGraphs:
    """The CUDA graphs of one encoder stack (a list of blocks run by ``run_blocks``), one set
    per shape bucket; ``run`` is what ``run_blocks`` calls while ``active``."""

    def __init__(self, blocks, run_eager: Callable, *, granule: int = 64, max_graphs: int = 8,
                 capture=None, name: str = "stack"):
        self.blocks = list(blocks)
        self.run_eager = run_eager  # (blocks, h [B, T, C], attn_mask, collect) -> (h, outputs)
        self.granule, self.max_graphs, self.name = granule, max_graphs, name
        self.capture = capture if capture is not None else CudaCapture()
        self.params = [p for b in self.blocks for p in b.parameters() if p.requires_grad]
        self.graphs: dict[tuple, _Graph] = {}
        self.active = False
        self.eager_calls = 0  # calls run eager: more shapes than max_graphs, or after a failed recording
        self.failed: str | None = None  # why recording failed, if it did

    def matches(self, blocks) -> bool:
        return len(blocks) == len(self.blocks) and blocks[-1] is self.blocks[-1]

    def run(self, h: torch.Tensor, attn_mask, collect: str | None):
        """``run_blocks(blocks, h, attn_mask, collect=collect)`` from this stack's graphs, or
        None when this call cannot use them (not active, not ``[B, T, C]``, a ``Varlen``
        mask, or a new shape beyond ``max_graphs``: the caller runs eager)."""
        if not self.active or h.dim() != 3 or not (attn_mask is None or torch.is_tensor(attn_mask)):
            return None
        B, T, C = h.shape
        length, mask = bucket(T, self.granule), attn_mask
        if length != T:
            mask = pad_attention_mask(attn_mask, B, T, length, h.device)
            if mask is None:  # a bias per query: the exact shape
                length, mask = T, attn_mask
        train = torch.is_grad_enabled() and (h.requires_grad or bool(self.params))
        kind = h.device.type
        key = (B, length, C, h.dtype, str(h.device), collect, train, self.blocks[0].training,
               None if mask is None else (tuple(mask.shape), mask.dtype),
               torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs or self.failed:
                self.eager_calls += 1
                return None
            try:
                graph = self._record(h, mask, length, collect, train)
            except Exception as err:  # an op the recording refuses: this stack runs eager from now on
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self.failed = f"{type(err).__name__}: {first}"
                print(f"d2v_fast: --train.compile stack-cudagraphs: recording the {self.name}'s stack failed "
                      f"({self.failed}); it runs eager for the rest of the run", file=sys.stderr)
                self.eager_calls += 1
                return None
            self.graphs[key] = graph
        if mask is not None:
            graph.mask.copy_(mask)
        graph.replays += 1
        if train:
            outs = _Replay.apply(graph, h, *self.params)
        else:
            with torch.no_grad():
                _fill(graph, h)
                graph.replay()
            outs = graph.outs
        if length != T:
            outs = [o[:, :T] for o in outs]
        return outs[0], list(outs[1:])

    def _record(self, h: torch.Tensor, mask, length: int, collect, train: bool) -> _Graph:
        B, T, C = h.shape
        static_h = torch.zeros(B, length, C, dtype=h.dtype, device=h.device)
        _fill(_Graph(static_h, None, [], lambda: None), h.detach())
        static_mask = None if mask is None else mask.clone()
        if train:
            static_h.requires_grad_(h.requires_grad)

        def fn() -> list[torch.Tensor]:
            out, collected = self.run_eager(self.blocks, static_h, static_mask, collect)
            return [out, *collected]

        if not train:
            with torch.no_grad():
                outs, replay = self.capture.forward(fn)
            return _Graph(static_h, static_mask, outs, replay)
        inputs = ([static_h] if static_h.requires_grad else []) + self.params
        outs, grads_out, grads_in, replay, replay_bwd = self.capture.train(fn, inputs)
        if not static_h.requires_grad:
            grads_in = [None, *grads_in]
        return _Graph(static_h, static_mask, outs, replay, grads_out, grads_in, replay_bwd)


# ------------------------------------------------------------------------------ attachment
_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, StackGraphs]" = weakref.WeakKeyDictionary()


def attach(blocks, graphs: StackGraphs) -> None:
    """``run_blocks(blocks, ...)`` runs from ``graphs`` while they are active (keyed by the
    first block, weakly: a deep copy of the model carries no graphs)."""
    _ATTACHED[blocks[0]] = graphs


def attached(blocks) -> StackGraphs | None:
    if not _ATTACHED or not len(blocks):
        return None
    graphs = _ATTACHED.get(blocks[0])
    return graphs if graphs is not None and graphs.matches(blocks) else None
