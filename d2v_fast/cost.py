"""What one optimizer update costs the host, measured without a GPU:
``python -m d2v_fast.bench --cost``.

A GPU step that is launch-bound is paid for on the host: every ATen op is a trip through the
dispatcher, most of them launch a kernel, and a host sync (``.item()``, ``nonzero``, a boolean
index) drains the launch queue. All of that can be counted on the CPU. For one full update
(student forward and backward, teacher, targets, loss, clip, AdamW, EMA) this module counts,
with a ``TorchDispatchMode``:

- **ops**: ATen ops dispatched, plus Triton launches;
- **kernels**: the ops that launch a kernel on a GPU, i.e. all of them except views and
  metadata ops (``view``, ``t``, ``transpose``, ``expand``, ``slice``, ``select``,
  ``unsqueeze``, ``detach``, ``alias``, ``_unsafe_view``, ... : every op whose schema says its
  outputs alias its inputs without writing them), allocations (``empty*``, ``new_empty*``,
  ``lift_fresh``), the profiler's ``record_function`` markers (host only) and
  ``_local_scalar_dense`` (a device-to-host copy, counted as a sync);
  a ``_foreach_*``/``_fused_*`` call counts the launches its multi-tensor apply would make
  (up to 110/64/48/36/30 tensors of 1/2/3/4/5 lists and 320 chunks of 65,536 elements a
  launch); each Triton launch counts one;
- **syncs**: ops that make the host wait for the device, when an input is device-resident
  (a factory called without a device, such as a layer-drop draw, makes a host tensor):
  ``_local_scalar_dense`` (``.item()``, ``int()``, ``bool()``), ``nonzero``,
  ``masked_select``, boolean indexing, ``repeat_interleave`` without ``output_size``,
  ``unique``, ``equal``. Which tensors are "on the device" is tracked through the update: a
  batch's tensors are host-resident until moved with ``.to(device)``, parameters and
  everything computed from a device tensor are device-resident. The trainer's wait for an
  update's finite flag (a CUDA event on a GPU) counts when the flag was recorded in the update
  being counted; reading the flag of an earlier update (the default loop's way, see
  ``Trainer.settle``) waits for nothing of this update's;
- **casts**: dtype conversions (``_to_copy`` to another dtype), which under bf16 autocast are
  autocast's weight and activation casts and their backward.

The CUDA code path is emulated on the CPU: bf16 autocast; ``F.dropout`` as the one
``native_dropout`` op CUDA dispatches (the CPU's ``dropout`` is several); attention as one
fused SDPA op (the CPU's flash kernel, without its dropout, which on a GPU runs inside the
same kernel); and the fused ops (``d2v_fast.ops``) on the side ``auto`` takes on a GPU, their
Triton launches replaced by counted no-ops while the eager twins compute the values (so the
update is the real one, and only the Triton path's own host work is counted and timed).

**host ms** is the wall time of one update at a narrow width (``narrow``: hidden = heads,
FFN 4 x hidden, the same layers and heads, fewer tokens; one thread), where the arithmetic is
small and what is left is mostly Python, the dispatcher and autograd (though this CPU's bf16
GEMMs, without native bf16, still cost 10-85 us a call there, and its SDPA 80-170 us: a third
of the engine's figure is that arithmetic): the minimum over several updates, the twins' time
taken out. ``--host-only`` times providers in interleaved rounds.

The row ``d2v_fast[stack-cudagraphs]`` is the update with both encoder stacks as CUDA graphs
(``d2v_fast.graphs``), as the host sees it (``GraphsOnHost``): each stack recorded once, each
replay one counted launch that runs nothing here (on a GPU a replay is one call handing the
recorded kernels to the GPU), the rest of the update real. Its values are those of the
recording, so it measures the host's side only.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_NO_KERNEL = {"aten::empty.memory_format", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
              "aten::new_empty_strided", "aten::lift_fresh", "aten::_local_scalar_dense", "aten::_unsafe_view",
              "aten::set_.source_Storage", "aten::set_.source_Storage_storage_offset", "aten::resize_",
              "aten::_has_compatible_shallow_copy_type", "aten::record_stream", "aten::is_same_size",
              "profiler::_record_function_enter_new", "profiler::_record_function_exit"}
_SYNC = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
         "aten::_unique2", "aten::_unique", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero"}
_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_CHUNK, _MAX_BLOCKS = 65536, 320


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _multi_tensor_launches(args) -> int:
    """Launches of CUDA's multi_tensor_apply over the tensor lists in ``args``."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(torch.is_tensor(t) for t in a)]
    if not lists:
        return 1
    depth = min(len(lists), 5)
    launches, tensors, blocks = 0, 0, 0
    for t in lists[0]:
        tensors += 1
        chunks = -(-t.numel() // _CHUNK)
        for c in range(chunks):
            blocks += 1
            if blocks == _MAX_BLOCKS or (c == chunks - 1 and tensors == _MAX_TENSORS[depth]):
                launches += 1
                blocks = 0
                tensors = 0 if c == chunks - 1 else 1
    return launches + (1 if blocks or tensors else 0)


class _State:
    """What the emulation shares: the active counter (None when only timing), whether the
    twins are computing (not counted, not timed), and the time they took."""

    def __init__(self):
        self.counter: CostCounter | None = None
        self.twin_depth = 0
        self.twin_seconds = 0.0
        self.launches = Counter()

    @contextlib.contextmanager
    def twin(self):
        self.twin_depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.twin_depth -= 1
            if self.twin_depth == 0:
                self.twin_seconds += time.perf_counter() - t0


STATE = _State()


class CostCounter(TorchDispatchMode):
    """Counts ops, kernel launches, host syncs and casts of what runs under it (see the
    module docstring); ``host(tensors)`` declares tensors host-resident."""

    def __init__(self):
        super().__init__()
        self.ops, self.kernels, self.syncs, self.casts = Counter(), Counter(), Counter(), 0
        self.sync_sites = Counter()
        self._host: set[int] = set()

    def host(self, tensors) -> None:
        for t in tree_leaves(tensors):
            if torch.is_tensor(t):
                self._host.add(self._key(t))

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return id(t)

    def on_device(self, t: torch.Tensor) -> bool:
        return self._key(t) not in self._host

    def launch(self, name: str) -> None:  # a Triton kernel
        self.ops[f"triton::{name}"] += 1
        self.kernels[f"triton::{name}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if STATE.twin_depth:
            return out
        name, full = func._schema.name, func.name()  # aten::index, aten::index.Tensor
        inputs = [t for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        device_input = any(self.on_device(t) for t in inputs)
        self.ops[name] += 1
        if name.startswith("aten::_foreach_") or name.startswith("aten::_fused_"):
            self.kernels[name] += _multi_tensor_launches(args)
        elif not (_is_view(func) or name in _NO_KERNEL or full in _NO_KERNEL):
            self.kernels[name] += 1
        if device_input and self._syncs(name, args, kwargs):
            self.syncs[name] += 1
            self.sync_sites[f"{name} at {self._site()}"] += 1
        if name == "aten::_to_copy" and "dtype" in kwargs and torch.is_tensor(args[0]) \
                and kwargs["dtype"] not in (None, args[0].dtype):
            self.casts += 1
        # residency of the outputs: host only when every input was (allocations from Python
        # values, torch.tensor(...), are host; other factories are made where the step runs)
        host_out = (not device_input and inputs) or name == "aten::lift_fresh"
        for t in tree_leaves(out):
            if torch.is_tensor(t):
                (self._host.add if host_out else self._host.discard)(self._key(t))
        return out

    @staticmethod
    def _site() -> str:
        """The innermost line of the project's own code (not this file) that made the call."""
        import traceback

        for frame in reversed(traceback.extract_stack()):
            if "d2v_fast" in frame.filename and not frame.filename.endswith("cost.py"):
                return f"{frame.filename.split('d2v_fast/', 1)[-1]}:{frame.lineno}"
        return "?"

    @staticmethod
    def _syncs(name, args, kwargs) -> bool:
        if name in _SYNC:
            return True
        if name in ("aten::index", "aten::index_put", "aten::index_put_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", [])
            return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in idx or [])
        if name == "aten::repeat_interleave":
            return kwargs.get("output_size") is None
        return False

    def totals(self) -> dict:
        return {"ops": sum(self.ops.values()), "kernels": sum(self.kernels.values()),
                "syncs": sum(self.syncs.values()), "casts": self.casts,
                "graph_launches": self.ops.get("cudaGraphLaunch", 0),
                "sync_ops": dict(self.syncs), "sync_sites": dict(self.sync_sites), "top_ops": dict(self.ops.most_common(12))}


# ------------------------------------------------------------------------------ emulation
class _Proxy:
    """A kernel module with some functions replaced (``d2v_fast.ops`` reaches the Triton
    side through module attributes)."""

    def __init__(self, module, **overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides.get(name) or getattr(self._module, name)


class _NoLaunch:
    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if STATE.counter is not None and not STATE.twin_depth:
                STATE.counter.launch(self.name)
        return launch


def _twin_call(public, args, kwargs):
    """The eager twin's result of ``ops.<public>`` (not counted, not timed)."""
    from . import ops

    with STATE.twin():
        return getattr(ops, public)(*args, **kwargs)


class _Emulated(torch.autograd.Function):
    """The Triton side's forward and backward run for their host work (counted, launches
    stubbed, results dropped); the twin's forward and backward give the values."""

    @staticmethod
    def forward(ctx, spec, *tensors):
        triton_fn, public, rebuild = spec
        with torch.enable_grad():
            det = [t.detach().requires_grad_(t.requires_grad) if torch.is_tensor(t) and t.is_floating_point()
                   else t for t in tensors]
            y_k = triton_fn(*rebuild(det)[0], **rebuild(det)[1])
            det2 = [t.detach().requires_grad_(t.requires_grad) if torch.is_tensor(t) and t.is_floating_point()
                    else t for t in tensors]
            a, kw = rebuild(det2)
            y = _twin_call(public, a, kw)
        ctx.graphs = (y_k, det, y, det2)
        return y.detach()

    @staticmethod
    def backward(ctx, grad):
        y_k, det, y, det2 = ctx.graphs
        want = [i for i, t in enumerate(det) if torch.is_tensor(t) and t.requires_grad]
        if y_k.requires_grad:
            torch.autograd.grad(y_k, [det[i] for i in want], grad, allow_unused=True)  # the kernel path's host work
        with STATE.twin():
            got = torch.autograd.grad(y, [det2[i] for i in want], grad, allow_unused=True)
        out = [None] * len(det)
        for i, g in zip(want, got):
            out[i] = g
        del ctx.graphs
        return (None, *out)


def _emulate(triton_fn, public: str):
    def call(*args, **kwargs):
        flat = list(args) + list(kwargs.values())
        grad = torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in flat)
        if not grad:
            triton_fn(*args, **kwargs)  # host work counted, launches stubbed, result dropped
            return _twin_call(public, args, kwargs)
        names = list(kwargs)

        def rebuild(vals):
            return tuple(vals[:len(args)]), dict(zip(names, vals[len(args):]))

        return _Emulated.apply((triton_fn, public, rebuild), *flat)
    return call


def _one_op(name: str, compute):
    """What is one ATen op on a GPU but several on the CPU: the value computed uncounted, the
    op counted once (as a kernel)."""
    def call(*args):
        with STATE.twin():
            out = compute(*args)
        if STATE.counter is not None and not STATE.twin_depth:
            STATE.counter.ops[name] += 1
            STATE.counter.kernels[name] += 1
        return out
    return call


@contextlib.contextmanager
def cuda_path_on_cpu():
    """Run the step as on a GPU, as far as the host can tell (see the module docstring)."""
    from . import kernels, ops
    from .kernels import ema, gather, loss, norm, targets
    from .models import encoder

    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def backend(tensor, op=None):
        if STATE.twin_depth:
            return "torch"
        requested = ops._requested()
        if requested != "auto":
            return requested
        return "torch" if op in ops.EAGER_ON_AUTO or not kernels.AVAILABLE else "triton"

    orig_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        return orig_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale, **kw)

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        return torch.native_dropout(x, p, True)[0]

    try:
        patch(ops, "kernels_backend", backend)
        patch(kernels, "_in_dispatch_mode", lambda: False)  # the direct path, as outside a mode
        for module in (gather, loss, targets, ema, norm):
            patch(module, "check_device", lambda *a, **k: None)
            for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
                patch(module, name, _NoLaunch(name))
        patch(ops, "_gather", _Proxy(gather, masked_gather=_emulate(gather.masked_gather, "masked_gather"),
                                     masked_scatter=_emulate(gather.masked_scatter, "masked_scatter")))
        patch(ops, "_loss", _Proxy(loss, regression_loss=_emulate(loss.regression_loss, "regression_loss")))
        patch(ops, "_targets", _Proxy(targets, build_targets=_emulate(targets.build_targets, "build_targets")))
        patch(ops, "_ema", _Proxy(ema, ema_update_=_emulate(ema.ema_update_, "ema_update_")))
        patch(ops, "_norm", _Proxy(norm, layer_norm_dual_fwd=_emulate(norm.layer_norm_dual_fwd, "layer_norm_dual_fwd")))
        # a shadowed Linear's parameter gradients: CUDA's fp32-output GEMM and sum (one op each)
        patch(encoder, "_fp32_grads", lambda t: True)
        patch(encoder, "_mm_out", _one_op("aten::mm", lambda a, b, dtype: a.mm(b).to(dtype)))
        # (the C++ node, d2v_fast._C, reads the same flag and calls ``d2v_fast::mm_out_dtype``:
        # counted as one op, its CPU GEMM and cast left in the timed host time; a Python kernel
        # registered over it to time that arithmetic as a twin would cost more than it takes out)
        patch(F, "scaled_dot_product_attention", sdpa)
        patch(F, "dropout", dropout)
        # the finite flag's wait (a CUDA event on a GPU): a sync when the flag was recorded in the
        # update being counted; one recorded in an earlier update was copied before this update's
        # work was queued, so reading it waits for nothing of this update's
        from . import trainer

        record, wait = trainer.Trainer._flag_record, trainer.Trainer._flag_wait

        def flag_record(self):
            pending = record(self)
            pending.counted = STATE.counter is not None
            return pending

        def flag_wait(self, pending):
            counter = STATE.counter
            if counter is not None:
                if getattr(pending, "counted", False):
                    counter.syncs["cuda event wait"] += 1
                    counter.sync_sites[f"cuda event wait at {counter._site()}"] += 1
                counter.host(self._flag_host)  # the pinned buffer itself is read without a wait
            wait(self, pending)

        patch(trainer.Trainer, "_flag_record", flag_record)
        patch(trainer.Trainer, "_flag_wait", flag_wait)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


_HOST_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "arange")


@contextlib.contextmanager
def _moves_to_device(counter: CostCounter):
    """``tensor.to(device)`` of a host tensor gives a device-resident copy (on the CPU ``.to``
    would return the tensor itself, and the host copy would look moved)."""
    orig = torch.Tensor.to

    def to(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        names_device = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)
        if names_device and not counter.on_device(self):
            with STATE.twin():  # the H2D copy itself: a DMA, not a kernel
                out = out.clone() if out is self else out
            counter._host.discard(counter._key(out))
        return out

    # A factory called without a device makes a host tensor on a GPU run too (a layer-drop draw,
    # torch.rand(())); the dispatcher cannot tell (it always sees a device), so tell it here.
    factories = {name: getattr(torch, name) for name in _HOST_FACTORIES}

    def host_factory(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if kwargs.get("device") is None and torch.is_tensor(out):
                counter._host.add(counter._key(out))
            return out
        return call

    torch.Tensor.to = to
    for name, fn in factories.items():
        setattr(torch, name, host_factory(fn))
    try:
        yield
    finally:
        torch.Tensor.to = orig
        for name, fn in factories.items():
            setattr(torch, name, fn)


# ------------------------------------------------------------------------------ measuring
NARROW_VOCAB = 1024


def narrow(cfg):
    """The same model at hidden = heads (12 heads of 1 at base; 48 for speech, whose positional
    conv and decoder have 16 groups), FFN 4 x hidden, conv front ends
    16 wide, text with a 1,024-token vocabulary and 16-token sequences, speech 0.25 s: a step
    whose arithmetic is small (this CPU's bf16 GEMMs cost ~50 us at 64 x 24, ~15 us at 32 x
    12), so what is left is the host's Python, dispatcher and autograd work."""
    import math

    c = copy.deepcopy(cfg)
    # the narrowest width every grouping divides: heads, and speech's positional conv and decoder groups
    width = math.lcm(c.model.num_heads, getattr(c.model, "pos_conv_groups", 1), c.recipe.decoder_groups)
    c.model.hidden_size, c.model.ffn_size = width, 4 * width
    if hasattr(c.model, "conv_dim"):
        c.model.conv_dim = tuple(16 for _ in c.model.conv_dim)
    if getattr(c.recipe, "decoder_dim", 0):
        c.recipe.decoder_dim = width
    if c.modality == "text":
        c.data.seq_len = 16
    elif c.modality == "audio":
        c.data.max_samples = 4000
    return c


def cost_config(modality: str, recipe: str, size: str = "base", **train) -> "object":
    """data2vec ``size`` of ``modality``/``recipe`` at a tiny shape, bf16 autocast (the GPU's
    dtype): text 2 x 32 tokens, speech 2 x 0.5 s, images 2 photos at the model's size."""
    from .config import preset

    cfg = preset(size, recipe, modality)
    cfg.train.batch_size, cfg.train.micro_batch_size = 2, 0
    cfg.train.dtype, cfg.train.progress, cfg.data.num_workers = "bfloat16", False, 0
    if modality == "text":
        cfg.data.seq_len = 32
    elif modality == "audio":
        cfg.data.max_samples = 8000
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


class GraphsOnHost:
    """``--train.compile stack-cudagraphs`` as the host sees it: on a GPU a replay is one call
    that hands the recorded kernels to the GPU, so here a stack is recorded once (run eagerly,
    for its static buffers) and each replay is one counted launch that runs nothing. The update
    around the stacks (copies into the static buffers, embeddings, gathers, head, targets, loss,
    the optimizer and EMA) is the real one; the stacks' values are those of the recording."""

    def forward(self, fn):
        outs = [o.detach().clone() for o in fn()]
        return outs, _graph_launch

    def train(self, fn, inputs, into):
        from .graphs import record_eagerly

        return (*record_eagerly(fn, inputs, into), _graph_launch, _graph_launch)


def _graph_launch() -> None:
    if STATE.counter is not None and not STATE.twin_depth:
        STATE.counter.ops["cudaGraphLaunch"] += 1
        STATE.counter.kernels["cudaGraphLaunch"] += 1


def _make(provider: str, cfg, device, vocab: int = 50265):
    from .steptimer import make_step, measure_batch

    step = make_step(provider, cfg, device, vocab)
    trainer = getattr(step, "trainer", None)
    if cfg.train.compile == "stack-cudagraphs" and trainer is not None and not trainer.stack_graphs:
        trainer.attach_stack_graphs(GraphsOnHost())  # the CPU records no CUDA graphs: their host side
    return step, measure_batch(cfg, device, vocab=vocab)


def measure_cost(provider: str, cfg, *, repeats: int = 5, time_it: bool = True) -> dict:
    """Counts of one update of ``provider`` at ``cfg`` (after a first update that allocates
    the optimizer state), and the host ms of one update at ``narrow(cfg)``."""
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    with cuda_path_on_cpu():
        torch.manual_seed(0)
        step, batch = _make(provider, cfg, device)
        step(batch)
        counter = CostCounter()
        counter.host(batch)
        STATE.counter = counter
        try:
            with _moves_to_device(counter), counter:
                step(batch)
        finally:
            STATE.counter = None
        trainer = getattr(step, "trainer", None)
        if trainer is not None:
            trainer.settle()  # the counted update's outcome (outside the count: the next update reads it)
        finite = getattr(trainer, "skipped", 0) == 0
        del step
        row = {"provider": provider, "modality": cfg.modality, "recipe": cfg.recipe.name, "preset": cfg.preset,
               **counter.totals(), "finite": finite}
        if time_it:
            gc.collect()
            torch.set_num_threads(1)
            try:
                torch.manual_seed(0)
                ncfg = narrow(cfg)
                step, batch = _make(provider, ncfg, device, vocab=NARROW_VOCAB)
                step(batch)
                times = []
                gc.disable()
                try:
                    for _ in range(repeats):
                        STATE.twin_seconds = 0.0
                        t0 = time.perf_counter()
                        step(batch)
                        times.append(time.perf_counter() - t0 - STATE.twin_seconds)
                finally:
                    gc.enable()
                row["host_ms"] = 1e3 * min(times)
                row["host_ms_median"] = 1e3 * sorted(times)[len(times) // 2]
                del step
            finally:
                torch.set_num_threads(threads)
    return row


def paired_host_ms(labelled: list[tuple[str, str, object]], *, rounds: int = 20) -> dict[str, dict]:
    """Host ms of one update for each (label, provider, config) at ``narrow(config)``, timed in
    interleaved rounds (one update of each per round, the minimum and median over the rounds):
    a load that comes and goes on a shared machine then hits every row alike. The order turns
    by one row each round, so that no row's place in the round biases it."""
    if not labelled:
        return {}
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, list[float]] = {label: [] for label, _, _ in labelled}
    try:
        with cuda_path_on_cpu():
            steps = []
            for label, provider, cfg in labelled:
                torch.manual_seed(0)
                step, batch = _make(provider, narrow(cfg), device, vocab=NARROW_VOCAB)
                step(batch)
                steps.append((label, step, batch))
            gc.collect()
            gc.disable()
            try:
                for r in range(rounds):  # each round starts one row later: no row is always first
                    for label, step, batch in steps[r % len(steps):] + steps[:r % len(steps)]:
                        STATE.twin_seconds = 0.0
                        t0 = time.perf_counter()
                        step(batch)
                        out[label].append(time.perf_counter() - t0 - STATE.twin_seconds)
            finally:
                gc.enable()
    finally:
        torch.set_num_threads(threads)
    return {label: {"host_ms": 1e3 * min(t), "host_ms_median": 1e3 * sorted(t)[len(t) // 2]}
            for label, t in out.items()}


# The step's switches: --train.<name> value away from the default.
SWITCHES = ("skip_on_device", "host_counts", "cast_once", "fused_qkv", "bf16_teacher", "bf16_student")


def switch_rows(cfg) -> list[tuple[str, object]]:
    """(label, config) for the defaults and for each switch flipped from its default, where
    the switch applies to the config."""
    rows = [("d2v_fast", cfg)]
    for name in SWITCHES:
        if not hasattr(cfg.train, name):
            continue
        c = copy.deepcopy(cfg)
        value = not getattr(c.train, name)
        setattr(c.train, name, value)
        try:
            from .config import validate

            validate(c)
        except Exception:
            continue
        rows.append((f"d2v_fast[{name}={str(value).lower()}]", c))
    if getattr(cfg.train, "compile", None) == "none":  # the stacks as CUDA graphs: their host side (GraphsOnHost)
        c = copy.deepcopy(cfg)
        c.train.compile = "stack-cudagraphs"
        rows.append(("d2v_fast[stack-cudagraphs]", c))
    return rows


SUITE = [("text", "data2vec"), ("text", "data2vec2"), ("audio", "data2vec"), ("audio", "data2vec2"),
         ("images", "data2vec"), ("images", "data2vec2")]


def providers_for(modality: str, recipe: str) -> list[str]:
    return ["d2v_fast", "hf", "reference"] if (modality, recipe) == ("text", "data2vec") else ["d2v_fast", "reference"]


def run_suite(configs, *, switches: bool = True, repeats: int = 5, log=print, done=lambda rows: None,
              time_it: bool = True) -> list[dict]:
    """Every config's providers; the switch rows for text data2vec (the headline config) when
    ``switches``. ``done(rows)`` after each row (the CLI writes its results file there)."""
    rows = []
    for modality, recipe in configs:
        cfg = cost_config(modality, recipe)
        for provider in providers_for(modality, recipe):
            ablate = provider == "d2v_fast" and switches and (modality, recipe) == ("text", "data2vec")
            labelled = switch_rows(cfg) if ablate else [(provider, cfg)]
            for label, c in labelled:
                try:
                    row = {**measure_cost(provider, c, repeats=repeats, time_it=time_it), "provider": label}
                except Exception as err:  # a switch that does not apply to this modality, say
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    log(f"  {modality}/{recipe} {label}: not measured ({first})")
                    continue
                rows.append(row)
                log(format_row(row))
                done(rows)
    return rows


def format_header() -> str:
    return f"{'config':<20}{'provider':<34}{'ops':>7}{'kernels':>9}{'syncs':>7}{'casts':>7}{'host ms':>9}"


def format_row(r: dict) -> str:
    host = f"{r['host_ms']:.1f}" if r.get("host_ms") is not None else "-"
    return (f"{r['modality'] + '/' + r['recipe']:<20}{r['provider']:<34}{r['ops']:>7}{r['kernels']:>9}"
            f"{r['syncs']:>7}{r['casts']:>7}{host:>9}")


def ratios(rows: list[dict], base: str = "hf") -> list[dict]:
    """Each text/data2vec row's ops, kernels and host ms over ``base``'s."""
    ref = next((r for r in rows if r["provider"] == base and r["modality"] == "text" and r["recipe"] == "data2vec"),
               None)
    out = []
    for r in rows:
        if ref is None or (r["modality"], r["recipe"]) != ("text", "data2vec"):
            continue
        out.append({"provider": r["provider"], "ops": r["ops"] / ref["ops"], "kernels": r["kernels"] / ref["kernels"],
                    "host_ms": (r.get("host_ms") or 0) / ref["host_ms"] if ref.get("host_ms") else None})
    return out


def main(argv: list[str]) -> int:
    """``python -m d2v_fast.bench --cost [--suite] [--modality M] [--recipe R] [--config SIZE]
    [--providers a,b] [--no-switches] [--repeats N] [--json PATH]``"""
    import argparse
    from pathlib import Path

    from .steptimer import environment
    from .checkpoint import atomic_write_json
    from .errors import UsageError

    p = argparse.ArgumentParser(prog="python -m d2v_fast.bench --cost",
                                description="ops, kernel launches, host syncs, casts and host ms of one update")
    p.add_argument("--suite", action="store_true", help="every modality and recipe (the results file's rows)")
    p.add_argument("--modality", default="text", choices=["text", "audio", "images"])
    p.add_argument("--recipe", default="data2vec", choices=["data2vec", "data2vec2"])
    p.add_argument("--config", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--providers", default="")
    p.add_argument("--no-switches", action="store_true", help="d2v_fast at its defaults only")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--host-only", action="store_true",
                   help="only the host ms, the providers (and switch rows) timed in interleaved rounds (--repeats)")
    p.add_argument("--counts-only", action="store_true",
                   help="the counts without the host ms (which a loaded machine cannot time; --host-only times them)")
    p.add_argument("--json", default="")
    p.add_argument("--append", action="store_true", help="add the rows to those already in --json (replacing rows of the same config and provider)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: must be >= 1")
    env = environment(torch.device("cpu"))
    print(f"{env['device']} | torch {env['torch']} | one update, {args.config}, CUDA path emulated, bf16 autocast; "
          f"host ms at hidden = heads, 1 thread, min of {args.repeats}")
    if not args.host_only:
        print(format_header())
    earlier = []
    if args.append and args.json and Path(args.json).is_file():
        import json

        earlier = json.loads(Path(args.json).read_text()).get("rows", [])

    def write(rows):
        key = lambda r: (r["modality"], r["recipe"], r["provider"])
        new = {key(r) for r in rows}
        rows = [r for r in earlier if key(r) not in new] + rows  # a row measured again replaces the old one
        if args.json:
            doc = {**env, "benchmark": "step_cost", "threads_for_host_ms": 1, "config": args.config,
                   "note": "one optimizer update on the CPU with the CUDA path emulated (d2v_fast/cost.py); ops = "
                           "ATen ops + Triton launches; kernels exclude views, metadata and allocations; host_ms at "
                           "hidden = heads (narrow()), min of repeats", "rows": rows, "ratios_to_hf": ratios(rows)}
            atomic_write_json(doc, Path(args.json))

    if args.host_only:
        cfg = cost_config(args.modality, args.recipe, args.config)
        providers = [x.strip() for x in args.providers.split(",") if x.strip()] or \
            providers_for(args.modality, args.recipe)
        labelled = [(label, provider, c) for provider in providers
                    for label, c in (switch_rows(cfg) if provider == "d2v_fast" and not args.no_switches
                                     else [(provider, cfg)])]
        times = paired_host_ms(labelled, rounds=args.repeats)
        rows = [{"provider": label, "modality": args.modality, "recipe": args.recipe, "preset": args.config,
                 "rounds": args.repeats, **times[label]} for label, _, _ in labelled]
        hf = times.get("hf")
        for r in rows:
            rel = f"  ({r['host_ms'] / hf['host_ms']:.2f} of hf)" if hf else ""
            print(f"{r['modality'] + '/' + r['recipe']:<20}{r['provider']:<34}{'host ms':>7}{r['host_ms']:>9.1f}"
                  f"  median {r['host_ms_median']:.1f}{rel}")
        if args.json:
            doc = {**env, "benchmark": "step_host_ms", "threads": 1, "note": "host ms of one update at hidden = heads "
                   "(d2v_fast/cost.py narrow()), CUDA path emulated, providers timed in interleaved rounds; min and "
                   "median over the rounds", "rows": rows}
            atomic_write_json(doc, Path(args.json))
        return 0
    if args.suite:
        rows = run_suite(SUITE, switches=not args.no_switches, repeats=args.repeats, done=write,
                         time_it=not args.counts_only)
    else:
        cfg = cost_config(args.modality, args.recipe, args.config)
        providers = [x.strip() for x in args.providers.split(",") if x.strip()] or \
            providers_for(args.modality, args.recipe)
        rows = []
        for provider in providers:
            labelled = switch_rows(cfg) if provider == "d2v_fast" and not args.no_switches else [(provider, cfg)]
            for label, c in labelled:
                row = {**measure_cost(provider, c, repeats=args.repeats, time_it=not args.counts_only),
                       "provider": label}
                rows.append(row)
                print(format_row(row))
    rel = ratios(rows)
    if rel:
        print("\nover hf (text, data2vec):")
        for r in rel:
            host = f"{r['host_ms']:.2f}" if r["host_ms"] is not None else "-"
            print(f"  {r['provider']:<34} ops {r['ops']:.2f}  kernels {r['kernels']:.2f}  host ms {host}")
    write(rows)
    return 0
