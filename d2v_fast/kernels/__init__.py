"""Fused Triton kernels for the data2vec hot path (docs/design.md#kernels), one file per op:

- ``gather.py``  masked_gather / masked_scatter (rows of ``[B, T, C]`` at a mask, and back)
- ``targets.py`` build_targets (per-layer norm, mean over K, final norm, masked rows only)
- ``ema.py``     ema_update_ (one launch over all teacher parameters) and flatten_params_
- ``loss.py``    regression_loss (smooth L1 / MSE and its gradient in one pass)

Each file holds the ``@triton.jit`` kernels, a plain-Python launcher and the
``torch.library`` custom op (with its autograd formula where gradients flow). Callers go
through ``d2v_fast.ops``, which picks this side or the eager twin (``d2v_fast.kernels.eager``).

Triton is optional: without it these modules still import (the kernels become stubs that
raise when launched), so ``d2v_fast.ops`` keeps working on the torch side.

Whether a kernel runs compiled (GPU) or in Triton's interpreter (NumPy on the CPU) is fixed
when its ``@triton.jit`` runs, i.e. when these modules are imported: ``TRITON_INTERPRET=1``
must be set before that (``tests/conftest.py`` does it; docs/design.md#interpreter).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # torch-only install: d2v_fast.ops falls back to the eager twins
    AVAILABLE = False
    IMPORT_ERROR = exc

    class _Unavailable:
        """Stands in for a ``@triton.jit`` kernel when triton is missing."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"triton is not installed ({IMPORT_ERROR}), so the fused kernel "
                               f"{self.fn.__name__} cannot run: `pip install triton`, or use the torch path "
                               f"(D2V_KERNELS=torch or d2v_fast.ops.set_kernels('torch'))")

    class _StubTriton:
        @staticmethod
        def jit(fn=None, **_):
            return _Unavailable(fn) if fn is not None else _Unavailable

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(int(n) - 1, 0).bit_length()

    class _StubLanguage:
        def __getattr__(self, name):  # tl.constexpr etc. in annotations
            return object

    triton, tl = _StubTriton(), _StubLanguage()


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on the CPU)."""
    if not AVAILABLE:
        return False
    if not _INTERPRETED_TYPE:  # imported once: this runs on every op's dispatch
        from triton.runtime.interpreter import InterpretedFunction

        _INTERPRETED_TYPE.append(InterpretedFunction)
    return isinstance(kernel, _INTERPRETED_TYPE[0])


_INTERPRETED_TYPE: list = []


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error when a kernel cannot run on the tensors' device."""
    if not AVAILABLE:
        raise RuntimeError(f"triton is not installed ({IMPORT_ERROR}): `pip install triton`, or use the torch "
                           f"path (D2V_KERNELS=torch or d2v_fast.ops.set_kernels('torch'))")
    if is_interpreted(kernel):
        return
    for t in tensors:
        if t is not None and t.device.type == "cpu":
            raise RuntimeError(
                "the Triton kernels in d2v_fast/kernels were compiled for the GPU (TRITON_INTERPRET was not 1 "
                "when they were imported), so they cannot take CPU tensors: set TRITON_INTERPRET=1 before "
                "importing d2v_fast to run them in Triton's interpreter (tests/conftest.py does), move the "
                "inputs to CUDA, or use the torch path (D2V_KERNELS=torch or d2v_fast.ops.set_kernels('torch'))")


# "direct" (default) or "custom_op": how the ops reach their launchers outside torch.compile
# (see ``direct``); D2V_KERNEL_DISPATCH=custom_op forces the custom ops, for comparisons.
DISPATCH = os.environ.get("D2V_KERNEL_DISPATCH", "direct").strip().lower() or "direct"
if DISPATCH not in ("direct", "custom_op"):
    raise ValueError(f"D2V_KERNEL_DISPATCH={DISPATCH!r}: expected 'direct' or 'custom_op' (unset means direct)")


def direct(*tensors) -> bool:
    """True when an op may call its launcher straight through a ``torch.autograd.Function``
    rather than its ``torch.library`` custom op: outside ``torch.compile`` tracing, on plain
    tensors (not fake or meta tensors, DTensors or other subclasses; parameters are fine), with
    no TorchDispatchMode active. The custom op's Python dispatch costs more host time than
    the launch itself (benchmarks/test_host_overhead.py: 50-200 µs a call more on the 2-core
    CPU machine); Dynamo and fake-tensor tracing still see the custom ops, which compute the
    same thing."""
    if DISPATCH != "direct" or torch.compiler.is_compiling() or _in_dispatch_mode():
        return False
    for t in tensors:
        if t is not None and ((type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter)
                              or t.device.type == "meta"):
            return False
    return True


def _in_dispatch_mode() -> bool:
    """A TorchDispatchMode is on the stack (make_fx, FLOP counters, ...): it should see the
    custom ops, not the launchers' insides."""
    return torch._C._len_torch_dispatch_stack() > 0


def num_warps_for(elements: int) -> int:
    """Warps for a program that holds ``elements`` values of one tile in registers: about 32
    fp32 values per thread per live tile (the kernels keep two or three tiles alive, well
    under the 255-register limit). A first guess, not tuned on a GPU yet."""
    return max(1, min(16, next_pow2(max(elements // 1024, 1))))


def check_residual(x: torch.Tensor, residual: torch.Tensor | None, stats: bool) -> None:
    """``layer_norm_dual_fwd``'s residual (both sides): shaped as ``x``, and only without statistics."""
    if residual is not None and (stats or residual.shape != x.shape):
        raise ValueError(f"layer_norm_dual_fwd: a residual {tuple(residual.shape)} for x {tuple(x.shape)} "
                         f"with stats={stats}: it must be shaped as x, and only without statistics")


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` in plain Python (the launchers call it on the host every call)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
