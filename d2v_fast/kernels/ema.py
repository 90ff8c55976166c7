"""ema_update_: ``teacher = decay * teacher + (1 - decay) * student`` over every teacher
parameter in one launch (docs/design.md#ema), and ``flatten_params_``, which lays a
parameter list out as one flat buffer so that the update is a single streaming pass.

Three ways in, fastest first:

1. Flat buffers (two 1-D tensors, or two lists whose tensors are consecutive views of one
   buffer each, as ``flatten_params_`` leaves them): ``_ema_flat_kernel``, one program per
   ``BLOCK`` elements.
2. Other lists with one dtype per side: ``_ema_multi_kernel``, one launch driven by a block
   table (tensor index and start of each ``BLOCK``-element block) and the tensors' data
   pointers and sizes, built on the host once per parameter set and cached on the device.
3. Lists mixing dtypes on one side: ``torch._foreach`` (the eager twin).

``decay`` is a Python float (passed as a kernel argument) or a 0-dim tensor on the
parameters' device, read inside the kernel: no host sync.

Memory traffic: read teacher (4 bytes, fp32) + student (4 or 2 bytes), write teacher (4):
12 bytes a parameter with an fp32 student, 10 with bf16; the multi-tensor path adds 12
bytes per 4,096-element block for the table (0.3%). ``torch._foreach_mul_`` +
``_foreach_add_`` reads and writes the teacher twice (20 bytes a parameter) and launches
once per chunk of tensors.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from . import cdiv, check_device, direct, tl, triton

BLOCK = 4096
NUM_WARPS = 8  # 16 fp32 per thread: four 16-byte loads per operand
_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}  # parameter set -> device tables
_MAX_TABLES = 8


@triton.jit
def _ema_coefficients(decay_ptr, decay, one_minus, DECAY_PTR: tl.constexpr):
    if DECAY_PTR:
        d = tl.load(decay_ptr).to(tl.float32)
        w = 1.0 - d
    else:
        d = decay
        w = one_minus
    return d, w


@triton.jit
def _ema_store_mask(offs, n, skip_ptr, SKIP_PTR: tl.constexpr):
    """The load/store mask ``offs < n``, with ``n`` taken as 0 when the on-device skip flag
    is set (an update skipped on the GPU without a host sync): the teacher stays bit for bit."""
    if SKIP_PTR:
        n = tl.where(tl.load(skip_ptr) == 0, n, 0)
    return offs < n


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even, as torch's casts (and so autocast's) do. bf16
    by integer arithmetic, because Triton's interpreter truncates that conversion."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _ema_flat_kernel(teacher, student, decay_ptr, decay, one_minus, n, skip_ptr, shadow,
                     DECAY_PTR: tl.constexpr, SKIP_PTR: tl.constexpr, SHADOW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = _ema_store_mask(offs, n, skip_ptr, SKIP_PTR)
    d, w = _ema_coefficients(decay_ptr, decay, one_minus, DECAY_PTR)
    t = tl.load(teacher + offs, mask=m).to(tl.float32)
    s = tl.load(student + offs, mask=m).to(tl.float32)
    new = (t * d + s * w).to(teacher.dtype.element_ty)
    tl.store(teacher + offs, new, mask=m)
    if SHADOW:  # the low-precision copy the teacher's forward reads: 2 more bytes, no second pass
        tl.store(shadow + offs, _round_to(new.to(tl.float32), shadow.dtype.element_ty), mask=m)


@triton.jit
def _ema_multi_kernel(t_ptrs, s_ptrs, sizes, block_tensor, block_start, decay_ptr, decay, one_minus, skip_ptr,
                      T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, DECAY_PTR: tl.constexpr,
                      SKIP_PTR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    m = _ema_store_mask(offs, tl.load(sizes + i), skip_ptr, SKIP_PTR)
    teacher = tl.load(t_ptrs + i).to(tl.pointer_type(T_DTYPE))
    student = tl.load(s_ptrs + i).to(tl.pointer_type(S_DTYPE))
    d, w = _ema_coefficients(decay_ptr, decay, one_minus, DECAY_PTR)
    t = tl.load(teacher + offs, mask=m).to(tl.float32)
    s = tl.load(student + offs, mask=m).to(tl.float32)
    tl.store(teacher + offs, (t * d + s * w).to(T_DTYPE), mask=m)


def _triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _flat_view(tensors: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """One 1-D view over ``tensors`` when they are consecutive, gap-free pieces of one buffer
    (as ``flatten_params_`` leaves them); otherwise None."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.detach().view(-1) if first.is_contiguous() else None
    storage, nxt = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if (t.dtype != first.dtype or not t.is_contiguous() or t.data_ptr() != nxt
                or t.untyped_storage().data_ptr() != storage):
            return None
        nxt += t.numel() * t.element_size()
    total = (nxt - first.data_ptr()) // first.element_size()
    return first.detach().as_strided((total,), (1,), first.storage_offset())


def _decay_args(decay: Optional[torch.Tensor], decay_f: float, like: torch.Tensor):
    if decay is None:
        return like, float(decay_f), float(1.0 - decay_f), False
    return decay, 0.0, 0.0, True


def _launch_flat(teacher: torch.Tensor, student: torch.Tensor, decay: Optional[torch.Tensor], decay_f: float,
                 skip: Optional[torch.Tensor] = None, shadow: Optional[torch.Tensor] = None):
    n = teacher.numel()
    if n == 0:
        return
    ptr, d, w, on_device = _decay_args(decay, decay_f, teacher)
    _ema_flat_kernel[(cdiv(n, BLOCK),)](teacher, student, ptr, d, w, n, teacher if skip is None else skip,
                                              teacher if shadow is None else shadow,
                                              DECAY_PTR=on_device, SKIP_PTR=skip is not None,
                                              SHADOW=shadow is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


def _tables(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    key = (teacher[0].device, teacher[0].dtype, student[0].dtype,
           tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in zip(teacher, student)))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    sizes = torch.tensor([t.numel() for t in teacher], dtype=torch.int64)
    blocks = (sizes + BLOCK - 1) // BLOCK
    block_tensor = torch.repeat_interleave(torch.arange(len(teacher), dtype=torch.int32), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    block_start = (torch.arange(int(blocks.sum())) - first_block[block_tensor.long()]) * BLOCK
    dev = teacher[0].device
    tables = tuple(x.to(dev) for x in (torch.tensor([t.data_ptr() for t in teacher], dtype=torch.int64),
                                       torch.tensor([s.data_ptr() for s in student], dtype=torch.int64),
                                       sizes, block_tensor, block_start))
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = tables
    return tables


def _update(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: Optional[torch.Tensor],
            decay_f: float, skip: Optional[torch.Tensor] = None, shadow: Optional[torch.Tensor] = None) -> None:
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.numel() != s.numel() or t.device != s.device:
            raise ValueError(f"ema_update_: teacher tensor {i} is {tuple(t.shape)} on {t.device}, student "
                             f"{tuple(s.shape)} on {s.device}; expected the same size and device")
    if not teacher:
        return
    check_device(_ema_flat_kernel, teacher[0])
    if decay is not None and decay.device != teacher[0].device:
        raise ValueError(f"ema_update_: decay is on {decay.device}, parameters on {teacher[0].device}: pass a "
                         f"float or a 0-dim tensor on the parameters' device")
    if skip is not None and (skip.device != teacher[0].device or skip.numel() != 1):
        raise ValueError(f"ema_update_: skip is {tuple(skip.shape)} on {skip.device}; expected a 0-dim bool "
                         f"tensor on the parameters' device ({teacher[0].device})")
    total = sum(t.numel() for t in teacher)
    if shadow is not None and (shadow.dim() != 1 or shadow.numel() != total or shadow.device != teacher[0].device):
        raise ValueError(f"ema_update_: shadow is {tuple(shadow.shape)} on {shadow.device}; expected one 1-D buffer "
                         f"of {total} elements (the teacher's, in order) on {teacher[0].device}")
    if skip is not None:
        skip = skip.reshape(1).to(torch.uint8)  # Triton loads no bool pointers; a one-byte copy, on the device
    t_flat, s_flat = _flat_view(teacher), _flat_view(student)
    if t_flat is not None and s_flat is not None and t_flat.numel() == s_flat.numel():
        return _launch_flat(t_flat, s_flat, decay, decay_f, skip, shadow)
    if shadow is not None:  # the other layouts: update, then one cast pass into the shadow
        _update(teacher, student, decay, decay_f, None if skip is None else skip.bool())
        shadow.copy_(torch.cat([t.reshape(-1) for t in teacher]))
        return
    dtypes_t, dtypes_s = {t.dtype for t in teacher}, {s.dtype for s in student}
    if len(dtypes_t) > 1 or len(dtypes_s) > 1 or any(not t.is_contiguous() or not s.is_contiguous()
                                                     for t, s in zip(teacher, student)):
        from .eager import ema_update_ as foreach_update  # mixed dtypes or layouts: _foreach

        before = None if skip is None else [t.clone() for t in teacher]
        foreach_update(teacher, student, decay_f if decay is None else decay)
        if before is not None:
            for t, b in zip(teacher, before):
                t.copy_(torch.where(skip.bool(), b, t))
        return
    t_ptrs, s_ptrs, sizes, block_tensor, block_start = _tables(teacher, student)
    ptr, d, w, on_device = _decay_args(decay, decay_f, teacher[0])
    _ema_multi_kernel[(block_tensor.numel(),)](
        t_ptrs, s_ptrs, sizes, block_tensor, block_start, ptr, d, w, sizes if skip is None else skip,
        T_DTYPE=_triton_dtype(teacher[0].dtype), S_DTYPE=_triton_dtype(student[0].dtype), DECAY_PTR=on_device,
        SKIP_PTR=skip is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("d2v_fast::ema_update_", mutates_args=("teacher", "shadow"))
def ema_update_op(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: Optional[torch.Tensor],
                  decay_f: float, skip: Optional[torch.Tensor] = None, shadow: Optional[torch.Tensor] = None) -> None:
    _update(teacher, student, decay, decay_f, skip, shadow)


@ema_update_op.register_fake
def _(teacher, student, decay, decay_f, skip=None, shadow=None):
    return None


def _tensor_list(params) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


@torch.no_grad()
def ema_update_(teacher: torch.Tensor | Iterable[torch.Tensor], student: torch.Tensor | Iterable[torch.Tensor],
                decay: float | torch.Tensor, skip: Optional[torch.Tensor] = None,
                shadow: Optional[torch.Tensor] = None) -> None:
    """Fused EMA step; same contract as ``d2v_fast.kernels.eager.ema_update_``, plus ``skip``:
    an optional 0-dim bool tensor on the parameters' device; where it is true the teacher is
    left untouched (read inside the kernel: no host sync); and ``shadow``: an optional 1-D
    buffer (one element per teacher element, in order; e.g. bf16) that receives the new
    teacher values in its dtype, in the same pass when the teacher is flat."""
    teacher = [t.detach() for t in _tensor_list(teacher)]
    student = [s.detach() for s in _tensor_list(student)]
    if isinstance(decay, torch.Tensor):
        if decay.numel() != 1:
            raise ValueError(f"ema_update_: decay has shape {tuple(decay.shape)}, expected a 0-dim tensor")
        if teacher and decay.device.type == "cpu" and teacher[0].device.type != "cpu":
            decay = float(decay)  # a host scalar: reading it costs no device sync
    skip = None if skip is None else skip.reshape(())
    decay_t, decay_f = (decay.reshape(()), 0.0) if isinstance(decay, torch.Tensor) else (None, float(decay))
    if direct(decay_t, skip, shadow, *teacher[:1], *student[:1]):  # the launcher itself, no custom-op dispatch
        _update(teacher, student, decay_t, decay_f, skip, shadow)
        # as the custom op (mutates_args) does: autograd sees the in-place writes
        for t in teacher + ([] if shadow is None else [shadow]):
            torch.autograd.graph.increment_version(t)
    else:
        ema_update_op(teacher, student, decay_t, decay_f, skip, shadow)


# ----------------------------------------------------------------------------- flat buffers
def flatten_params_(modules_or_params: nn.Module | torch.Tensor | Iterable[nn.Module | torch.Tensor]) -> torch.Tensor:
    """Move every parameter of ``modules_or_params`` (modules, parameters, or a mix; shared
    parameters once) into one new contiguous 1-D buffer, in order, and re-point each
    ``param.data`` at its slice. Returns the buffer.

    The Parameter objects stay the same (optimizer state, hooks and ``state_dict`` keep
    working; ``load_state_dict`` copies into the views). Keep teacher and student layers
    each as one flat buffer and ``ema_update_(teacher_flat, student_flat, decay)`` is one
    streaming launch; ``ema_update_`` also recognises the parameter lists themselves as flat.
    Anything that re-allocates a parameter (``.to()``, ``.half()``) breaks the layout; the
    update stays correct, on the slower multi-tensor path.
    """
    items = [modules_or_params] if isinstance(modules_or_params, (nn.Module, torch.Tensor)) else list(modules_or_params)
    params, seen = [], set()
    for item in items:
        for p in (item.parameters() if isinstance(item, nn.Module) else [item]):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("flatten_params_: no parameters given")
    dtype, device = params[0].dtype, params[0].device
    for p in params:
        if p.dtype != dtype or p.device != device:
            raise ValueError(f"flatten_params_: parameters mix {dtype} on {device} with {p.dtype} on {p.device}; "
                             f"flatten each dtype/device group separately")
    flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
    offset = 0
    with torch.no_grad():
        for p in params:
            view = flat[offset:offset + p.numel()].view_as(p)
            view.copy_(p)
            p.data = view
            offset += p.numel()
    return flat
