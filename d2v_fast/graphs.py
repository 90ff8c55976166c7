"""Whole-stack CUDA graphs (``--train.compile stack-cudagraphs``).

A GPU step that is launch-bound waits on the host's Python, dispatcher and launches for every
kernel of every block. Here the encoder stack runs as CUDA graphs instead: the teacher's stack
(no gradient) as one graph, the student's as two (its forward, and its backward to the stack's
input, a differentiable attention bias and every block parameter), each replayed with one
call. A graph replays the kernels it recorded on the buffers it recorded them with, so every
graph has static buffers: its input ``[B, T, C]`` and attention mask are copied in before a
replay, its outputs are read from the same tensors each time, and the backward reads the
output gradients from static buffers and leaves the input's and the mask's gradients in
static buffers and the parameters' in one set of buffers the stack's graphs share, which
autograd then accumulates into ``.grad`` as it does any gradient.

Shapes must repeat for graphs to be reused. A stack records its first length as it is, so a
stack whose shapes never change (text at a fixed length, images) runs unpadded. Once a second
length appears, new lengths are padded up to a multiple of ``granule``
(``--train.graph_bucket``; 0: never) into **shape buckets**: the padded positions are masked
out of attention as keys (their query rows are computed and dropped, and get a zero
gradient), so the real positions' outputs are the same function of the real input. A length
that has a graph of its own, or whose bucket has one, replays it. At most ``max_graphs``
graphs are recorded per stack; a shape beyond them runs eager (counted in ``eager_calls``),
as does a stack whose recording failed (said once on stderr, the reason in ``failed``).

What graphs change: nothing in the arithmetic (the same blocks, kernels and dropout draws
from CUDA's generator, which graphs advance per replay), but a bucket's padding can move the
attention to a masked SDPA backend. Outputs are static buffers: they hold until the stack
replays again (any of its graphs: they share one memory pool), and the trainer reads each
before the next micro-batch. Layer drop (a host-side draw per block) and ``Varlen``
attention run eager.

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

__all__ = ["StackGraphs", "CudaCapture", "EagerReplay", "bucket", "pad_attention_mask", "attach", "attached",
           "record_eagerly", "refuse_several_processes"]


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
    stream (cuBLAS workspaces, autotuning, Triton compiles and lazy allocations happen outside
    the recording), then the forward and, for training, the backward, recorded with
    ``capture_error_mode="thread_local"`` (the DataLoader's pin-memory thread goes on
    allocating while the main thread records). One capture serves one stack, and all that
    stack's graphs (every shape, forward and backward) share one memory pool: what a graph
    keeps between replays (its static outputs and gradients) stays allocated, and the rest,
    its intermediates, is dead once its backward (or, without one, its forward) has replayed,
    which is always before the stack's next forward replays; so the shapes share one stack's
    worth of activation memory rather than holding one each."""

    warmup = 3

    def __init__(self):
        self.pool = None

    def _pool(self):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool

    @staticmethod
    def _warm(step: Callable[[], None], times: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(times):
                step()
        torch.cuda.current_stream().wait_stream(stream)

    def forward(self, fn: Callable[[], list[torch.Tensor]]):
        self._warm(fn, self.warmup)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool(), capture_error_mode="thread_local"):
            outs = fn()
        return outs, graph.replay

    def train(self, fn: Callable[[], list[torch.Tensor]], inputs: list[torch.Tensor], into: list[torch.Tensor]):
        """``into``: buffers for the gradients of the last ``len(into)`` inputs (the parameters),
        allocated outside the pool; the backward graph copies those gradients into them."""
        def step():
            outs = fn()
            torch.autograd.grad(outs, inputs, [torch.zeros_like(o) for o in outs], allow_unused=True)
        self._warm(step, self.warmup)
        pool = self._pool()
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, pool=pool, capture_error_mode="thread_local"):
            outs = fn()
        grads_out = [torch.empty_like(o) for o in outs]
        with torch.cuda.graph(bwd, pool=pool, capture_error_mode="thread_local"):
            grads_in = _grads_into(torch.autograd.grad(outs, inputs, grads_out, allow_unused=True), into)
        return outs, grads_out, grads_in, fwd.replay, bwd.replay


def _grads_into(grads, into: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradients, the last ``len(into)`` of them copied into ``into`` (and given as those)."""
    n = len(grads) - len(into)
    pairs = [(b, g) for b, g in zip(into, grads[n:]) if g is not None]
    if pairs:
        torch._foreach_copy_([b for b, _ in pairs], [g for _, g in pairs])
    return list(grads[:n]) + [None if g is None else b for b, g in zip(into, grads[n:])]


def record_eagerly(fn, inputs: list[torch.Tensor], into: list[torch.Tensor]):
    """A training "recording" without a GPU: one eager forward and backward, whose results
    become the static outputs, output-gradient buffers (zeros) and input gradients."""
    with torch.enable_grad():
        first = fn()
    outs = [o.detach().clone() for o in first]
    grads_out = [torch.zeros_like(o) for o in outs]
    got = torch.autograd.grad(first, inputs, grads_out, allow_unused=True)
    n = len(inputs) - len(into)
    return outs, grads_out, [None if g is None else g.detach().clone() for g in got[:n]] + _grads_into(got, into)[n:]


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

    def train(self, fn, inputs, into):
        self.records += 1
        outs, grads_out, grads_in = record_eagerly(fn, inputs, into)
        n = len(inputs) - len(into)
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
                for s, g in zip(grads_in[:n], got[:n]):
                    if s is not None:
                        s.copy_(g)
                _grads_into(got, into)
        return outs, grads_out, grads_in, replay_fwd, replay_bwd


# ------------------------------------------------------------------------------ the stack
@dataclasses.dataclass
class _Graph:
    h: torch.Tensor  # static input [B, T_graph, C]
    mask: torch.Tensor | None  # static attention mask (a leaf that requires grad for a trained bias)
    outs: list[torch.Tensor]  # static outputs: the stack's output, then what it collects
    replay: Callable[[], None]
    grads_out: list[torch.Tensor] | None = None  # training: the outputs' gradients, read by the backward graph
    grads_in: list[torch.Tensor | None] | None = None  # [input, mask, *parameters] gradients it leaves (None: none)
    replay_bwd: Callable[[], None] | None = None
    replays: int = 0


class _Replay(torch.autograd.Function):
    """The student's stack as one autograd node: forward copies the input (and mask) into the
    static buffers and replays the forward graph; backward copies the outputs' gradients in,
    replays the backward graph and hands autograd the input's, the mask's and the parameters'
    gradients."""

    @staticmethod
    def forward(ctx, graph: _Graph, h, mask, *params):
        _fill(graph, h, mask)
        graph.replay()
        ctx.graph, ctx.params, ctx.length = graph, params, h.shape[1]
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
        # The gradients live in buffers that the stack's next backward replay overwrites. Autograd
        # hands the input's and the mask's on at once, but a leaf whose .grad is still None would
        # keep the tensor itself, so those two leave as copies (one each), and so do the
        # parameters' gradients that start a .grad (later micro-batches add into it in place).
        gh, gm, *gp = graph.grads_in
        gh = None if gh is None else gh[:, :ctx.length].clone()  # the real rows of a padded bucket
        gm = None if gm is None else gm.clone()
        fresh = [i for i, (p, g) in enumerate(zip(ctx.params, gp)) if g is not None and p.grad is None]
        gp = [None if g is None else g.detach() for g in gp]
        if fresh:
            for i, g in zip(fresh, torch._foreach_mul([gp[i] for i in fresh], 1.0)):  # exact copies
                gp[i] = g
        return (None, gh, gm, *gp)


def _fill(graph: _Graph, h: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Copy ``h`` ``[B, T, C]`` into the static input ``[B, T_graph, C]``, zeros after it, and
    the mask (already padded to the graph's length) into the static mask."""
    with torch.no_grad():
        T = h.shape[1]
        if T == graph.h.shape[1]:
            graph.h.copy_(h)
        else:
            graph.h[:, :T].copy_(h)
            graph.h[:, T:].zero_()
        if mask is not None:
            graph.mask.copy_(mask)


def _mask_kind(mask: torch.Tensor | None):
    """What a mask contributes to a graph's key besides the length: its dtype, rank, leading
    dims and whether it is trained."""
    return None if mask is None else (mask.dtype, mask.dim(), tuple(mask.shape[:2]), mask.requires_grad)


class StackGraphs:
    """The CUDA graphs of one encoder stack (a list of blocks run by ``run_blocks``), one set
    per shape; ``run`` is what ``run_blocks`` calls while ``active``."""

    def __init__(self, blocks, run_eager: Callable, *, granule: int = 64, max_graphs: int = 8,
                 capture=None, name: str = "stack"):
        self.blocks = list(blocks)
        self.run_eager = run_eager  # (blocks, h [B, T, C], attn_mask, collect) -> (h, outputs)
        self.granule, self.max_graphs, self.name = granule, max_graphs, name
        self.capture = capture if capture is not None else CudaCapture()
        self.params = [p for b in self.blocks for p in b.parameters() if p.requires_grad]
        self.param_grads: list[torch.Tensor] | None = None  # the parameters' gradients, shared by every graph
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
        train = torch.is_grad_enabled() and (h.requires_grad or bool(self.params))
        kind = h.device.type
        family = (B, C, h.dtype, str(h.device), collect, train, train and h.requires_grad, self.blocks[0].training,
                  torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        length, mask = T, attn_mask
        key = (family, T, _mask_kind(attn_mask))
        graph = self.graphs.get(key)
        if graph is None and bucket(T, self.granule) != T:
            padded = bucket(T, self.granule)
            padded_mask = pad_attention_mask(attn_mask, B, T, padded, h.device)
            if padded_mask is not None:
                padded_key = (family, padded, _mask_kind(padded_mask))
                graph = self.graphs.get(padded_key)
                # a stack whose length has changed before pads new lengths into buckets
                if graph is not None or any(k[0] == family and k[1] != T for k in self.graphs):
                    key, length, mask = padded_key, padded, padded_mask
        if graph is None:
            graph = self._new(key, h, mask, length, collect, train)
            if graph is None:
                return None
        graph.replays += 1
        if train:
            outs = _Replay.apply(graph, h, mask, *self.params)
        else:
            _fill(graph, h, mask)
            graph.replay()
            outs = graph.outs
        if length != T:
            outs = [o[:, :T] for o in outs]
        return outs[0], list(outs[1:])

    def _new(self, key, h, mask, length: int, collect, train: bool) -> _Graph | None:
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
        return graph

    def _record(self, h: torch.Tensor, mask, length: int, collect, train: bool) -> _Graph:
        B, T, C = h.shape
        static_h = torch.zeros(B, length, C, dtype=h.dtype, device=h.device)
        static_mask = None if mask is None else torch.empty_like(mask, requires_grad=False)
        graph = _Graph(static_h, static_mask, [], lambda: None)
        _fill(graph, h.detach(), None if mask is None else mask.detach())
        heads = []  # the inputs besides the parameters whose gradients the backward graph leaves
        if train:
            static_h.requires_grad_(h.requires_grad)
            if mask is not None:
                static_mask.requires_grad_(mask.requires_grad)
            heads = [t for t in (static_h, static_mask) if t is not None and t.requires_grad]

        def fn() -> list[torch.Tensor]:
            out, collected = self.run_eager(self.blocks, static_h, static_mask, collect)
            return [out, *collected]

        if not train:
            with torch.no_grad():
                graph.outs, graph.replay = self.capture.forward(fn)
            return graph
        if self.param_grads is None:
            self.param_grads = [torch.empty_like(p) for p in self.params]
        graph.outs, graph.grads_out, got, graph.replay, graph.replay_bwd = \
            self.capture.train(fn, heads + self.params, self.param_grads)
        it = iter(got[:len(heads)])
        gh = next(it) if static_h.requires_grad else None
        gm = next(it) if static_mask is not None and static_mask.requires_grad else None
        graph.grads_in = [gh, gm, *got[len(heads):]]
        return graph


def refuse_several_processes(world: int) -> None:
    """Stack graphs run in one process: DDP's and FSDP's per-parameter hooks would have to
    fire inside the recorded backward. Refused in one line for ``world`` > 1."""
    if world > 1:
        from .errors import UsageError

        raise UsageError(f"--train.compile stack-cudagraphs: one process only for now, not {world} (DDP's and "
                         f"FSDP's per-parameter hooks would have to fire inside the recorded backward); use "
                         f"--train.compile blocks-cudagraphs or none with several processes")


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
