"""The data2vec hot-path operations, one functional API over two implementations:

- ``triton``: the fused kernels in ``d2v_fast/kernels`` (``torch.library`` custom ops, so
  they compose with ``torch.compile``);
- ``torch``: the eager twins in ``d2v_fast/kernels/eager.py`` (same signatures).

Which side runs is decided at every call, from the tensors and one switch:
``set_kernels("auto" | "triton" | "torch")`` (the trainer's config field), else the
``D2V_KERNELS`` environment variable, else "auto". "auto" takes the Triton side for CUDA
tensors when the kernels were compiled for the GPU, the twin otherwise (CPU tensors, triton
missing, or kernels imported under ``TRITON_INTERPRET=1``), except for the ops in
``EAGER_ON_AUTO``, whose kernels measured slower than their eager twins on the GPU: "auto"
runs the twin for them until a faster kernel is measured. Forcing "triton" with CPU
tensors runs the kernels in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
before ``d2v_fast`` is imported; otherwise the call raises and says so.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

from .. import extension as _extension
from .. import kernels as _k
from ..kernels import ema as _ema
from ..kernels import gather as _gather
from ..kernels import loss as _loss
from ..kernels import norm as _norm
from ..kernels import targets as _targets
from ..kernels.ema import flatten_params_
from ..kernels import eager as _twin

__all__ = ["build_targets", "ema_update_", "flatten_params_", "kernels_backend", "layer_norm_dual",
           "layer_norm_dual_fwd", "masked_gather", "masked_scatter",
           "regression_loss", "representation_std", "set_kernels"]

CHOICES = ("auto", "triton", "torch")
_choice = "auto"

# Ops whose Triton kernel lost to its eager twin at data2vec base shapes, bf16, on an NVIDIA
# H200 (2026-11-28, benchmarks/results/kernels-nvidia-h200-2026-11-28.json): masked_gather
# with one mask row per sample 0.32 vs 0.15 ms, masked_scatter 0.41 vs 0.23 ms,
# regression_loss fwd+bwd 0.85 vs 0.79 ms. "auto" keeps the twin for these; the cloned
# gather of data2vec 2.0 (0.30 vs 0.68 ms), build_targets (5.8x its twin) and ema_update_
# (12x the per-parameter loop) run their kernels. "triton" still forces every kernel.
# Those times were taken through the custom ops, with the host's dispatch and a sync in
# them; the direct path and benchmarks/test_kernels.py's device-only rows (device_ms) came
# after, so the set stands until a GPU run re-measures it.
# tests/test_kernels.py checks this set against that results file.
EAGER_ON_AUTO = frozenset({"masked_gather", "masked_scatter", "regression_loss"})


_NATIVE: list = []  # [module or None] once looked up


def native():
    """``d2v_fast._C`` when it has the step's C++ autograd nodes (``shadow_linear``,
    ``layer_norm_dual_grad``: the same ops as their Python Functions, without the interpreter
    in forward's bookkeeping and in backward), else None, and the Python Functions run (same
    values, more host time per update; one RuntimeWarning when the extension is there but
    older; None, said once, where it is missing, or with ``D2V_FAST_NO_EXT=1``:
    ``d2v_fast.extension``)."""
    if not _NATIVE:
        _NATIVE.append(_extension.with_function(_extension.C, "layer_norm_dual_grad", "the step's Linears and LayerNorms run "
                                                "their Python Functions (same values, more host time)"))
    return _NATIVE[0]


def set_kernels(choice: str) -> None:
    """Pick the side for every later call: "auto" (defer to ``D2V_KERNELS``, default auto),
    "triton" or "torch"."""
    global _choice
    if choice not in CHOICES:
        raise ValueError(f"set_kernels({choice!r}): expected one of {CHOICES}")
    _choice = choice


_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("D2V_KERNELS") if _ENV_DATA is not None else None


def _requested() -> str:
    if _choice != "auto":
        return _choice
    # read at every call (a test or a user may set it late); from os.environ's own bytes dict
    # where it has one (POSIX), a third of the time of os.environ.get, which runs per op
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get("D2V_KERNELS")
    if isinstance(raw, bytes):
        raw = os.environ.decodevalue(raw)
    if not raw:
        return "auto"
    env = raw.strip().lower() or "auto"
    if env not in CHOICES:
        raise ValueError(f"D2V_KERNELS={env!r}: expected one of {CHOICES} (unset means auto)")
    return env


def kernels_backend(tensor: torch.Tensor, op: str | None = None) -> str:
    """"triton" or "torch": the side a call of ``op`` on ``tensor`` would run."""
    requested = _requested()
    if requested != "auto":
        return requested
    if op in EAGER_ON_AUTO:
        return "torch"
    compiled = _k.AVAILABLE and not _k.is_interpreted(_gather._move_rows_kernel)
    return "triton" if tensor.is_cuda and compiled else "torch"


def masked_gather(x: torch.Tensor, mask: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """The rows of ``x[B, T, C]`` where ``mask[B, T]`` is true, in row-major order: ``[N, C]``.
    Backward scatters the gradient back (zeros elsewhere). Needs ``N`` on the host: ``count``
    when the caller knows it (the trainer's ``--train.host_counts``), else one sync.

    data2vec 2.0 multi-mask: ``mask`` may be ``[clones*B, T]`` (row ``r`` belongs to sample
    ``r // clones``, the clones of a sample adjacent); each true ``mask[r, t]`` gives
    ``x[r // clones, t]``, without materialising a cloned ``x``. Backward sums the clones'
    gradients into ``grad_x[b, t]`` (deterministically on the Triton side). Any other mask
    row count is a ValueError."""
    op = "masked_gather" if mask.shape[0] == x.shape[0] else "masked_gather_clones"
    if kernels_backend(x, op) == "triton":
        return _gather.masked_gather(x, mask, count)
    return _twin.masked_gather(x, mask, count)


def masked_scatter(rows: torch.Tensor, mask: torch.Tensor, fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of masked_gather: ``rows[N, C]`` at the true positions of ``mask[B, T]``, ``fill``
    (``[C]`` or ``[B, T, C]``; None = zeros) elsewhere. Backward gathers the gradient to
    ``rows``, and to ``fill`` its values at the false positions (summed over them for ``[C]``).
    With clones (data2vec 2.0) everything here is in the cloned space: ``mask`` is
    ``[B*clones, T]`` and the result ``[B*clones, T, C]``."""
    if kernels_backend(rows, "masked_scatter") == "triton":
        return _gather.masked_scatter(rows, mask, fill)
    return _twin.masked_scatter(rows, mask, fill)


def build_targets(layers: Sequence[torch.Tensor] | torch.Tensor, *, padding_mask: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None, layer_norm: Optional[str] = "instance",
                  final_norm: Optional[str] = None, eps: float = 1e-5, count: Optional[int] = None) -> torch.Tensor:
    """data2vec targets (docs/design.md#targets): per-layer norm ("instance" over time per sample and
    channel, padding excluded; "layer" per token; None) of each of the K layer outputs
    (``[K, B, T, C]`` or K ``[B, T, C]``), their mean, an optional final norm; fp32 ``[B, T, C]``
    or ``[N, C]`` at the rows where ``mask`` is true. Padded positions are 0. No gradient.

    ``padding_mask`` is per sample ``[B, T]``; ``mask`` may be ``[B, T]`` or ``[clones*B, T]``
    (data2vec 2.0 multi-mask, row ``r`` of sample ``r // clones``): then row-major, each true
    ``mask[r, t]`` gives the target of sample ``r // clones`` at ``t``. The targets are computed
    once per sample; the Triton side writes them straight to every clone's rows. ``count``:
    the number of true entries of ``mask`` when the caller knows it on the host (no sync)."""
    layers = layers if isinstance(layers, torch.Tensor) else list(layers)
    if not len(layers):
        raise ValueError("build_targets: got no layers (expected K >= 1 tensors [B, T, C] or one [K, B, T, C])")
    first = layers if isinstance(layers, torch.Tensor) else layers[0]
    side = kernels_backend(first, "build_targets")
    time_axis = "instance" in (layer_norm, final_norm)
    too_long = time_axis and first.shape[-2] > _targets.MAX_T and not _targets.split_covers(layer_norm, final_norm)
    if side == "triton" and not (_requested() == "auto" and too_long):
        return _targets.build_targets(layers, padding_mask=padding_mask, mask=mask, layer_norm=layer_norm,
                                      final_norm=final_norm, eps=eps, count=count)
    return _twin.build_targets(layers, padding_mask=padding_mask, mask=mask, layer_norm=layer_norm,
                               final_norm=final_norm, eps=eps, count=count)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, *, beta: float, scale: Optional[float] = None,
                    reduction: str = "sum") -> torch.Tensor:
    """Smooth L1 with ``beta`` (MSE ``d^2`` when ``beta == 0``) summed over features, times
    ``scale`` (``1/sqrt(C)`` when None); ``reduction`` "sum" (scalar) or "none" (per row).
    fp32; gradient to ``pred`` only."""
    if kernels_backend(pred, "regression_loss") == "triton":
        return _loss.regression_loss(pred, target, beta=beta, scale=scale, reduction=reduction)
    return _twin.regression_loss(pred, target, beta=beta, scale=scale, reduction=reduction)


def ema_update_(teacher: torch.Tensor | Iterable[torch.Tensor], student: torch.Tensor | Iterable[torch.Tensor],
                decay: float | torch.Tensor, skip: Optional[torch.Tensor] = None,
                shadow: Optional[torch.Tensor] = None) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` in place, over two flat buffers
    (see ``flatten_params_``) or two parameter lists; ``decay`` a float or a 0-dim tensor
    on the parameters' device (read on the device: no host sync). ``skip``: an optional
    0-dim bool tensor on that device; where true the teacher stays as it was, bit for bit
    (a non-finite update skipped on the device, ``--train.skip_on_device``). ``shadow``: an
    optional 1-D buffer, one element per teacher element in order, given the new teacher
    values in its own dtype (``--train.bf16_teacher``: the copy the teacher's forward reads)."""
    teacher = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    student = [student] if isinstance(student, torch.Tensor) else list(student)
    if teacher and kernels_backend(teacher[0]) == "triton":
        return _ema.ema_update_(teacher, student, decay, skip, shadow)
    if skip is None:
        _twin.ema_update_(teacher, student, decay)
    else:  # the eager side has no store mask: update, then put the old values back where skipped
        before = [t.detach().clone() for t in teacher]
        _twin.ema_update_(teacher, student, decay)
        with torch.no_grad():
            for t, b in zip(teacher, before):
                t.copy_(torch.where(skip, b, t))
    if shadow is not None:
        with torch.no_grad():
            shadow.copy_(torch.cat([t.detach().reshape(-1) for t in teacher]))


def layer_norm_dual_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                        low: torch.dtype, stats: bool = True, residual: Optional[torch.Tensor] = None):
    """``(y, y.to(low), mean, rstd)`` of a LayerNorm over the last dimension of fp32 ``x``: on
    the Triton side one kernel writes both outputs; the twin is ``native_layer_norm`` and a cast.
    ``stats=False``: no backward will follow, ``mean``/``rstd`` are None; then ``residual``
    (shaped as ``x``) may be added to ``x`` in the same pass."""
    if kernels_backend(x, "layer_norm_dual") == "triton":
        return _norm.layer_norm_dual_fwd(x, weight, bias, eps, low, stats, residual)
    return _twin.layer_norm_dual_fwd(x, weight, bias, eps, low, stats, residual)


class _LayerNormDual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, low):
        y, y_low, mean, rstd = layer_norm_dual_fwd(x, weight, bias, eps, low)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output gives None, not a tensor of zeros
        return y, y_low

    @staticmethod
    def backward(ctx, grad, grad_low):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if grad is None and grad_low is None:
            return None, None, None, None, None
        # the two outputs' gradients summed in fp32, as autograd sums them after a cast's backward
        g = grad_low.to(x.dtype) if grad is None else (grad if grad_low is None else grad + grad_low)
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            g, x, [x.shape[-1]], mean, rstd, weight, bias, list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None


def layer_norm_dual(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                    low: torch.dtype = torch.bfloat16, residual: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension of fp32 ``x`` (of ``x + residual`` when given),
    returned in fp32 and as its rounding to ``low`` (bit for bit ``y.to(low)``), for a post-LN
    block under autocast whose output is both the residual stream and the next Linear's input:
    forward writes both in one pass (Triton side; without autograd, the residual add too),
    backward sums the two gradients and runs ATen's LayerNorm backward, instead of a cast, its
    backward and an add."""
    if not torch.is_grad_enabled() or not (x.requires_grad or (weight is not None and weight.requires_grad)
                                           or (bias is not None and bias.requires_grad)
                                           or (residual is not None and residual.requires_grad)):
        # no backward: no statistics, and the residual added as the row is read
        if residual is not None and residual.shape != x.shape:  # (a broadcast: added first)
            x, residual = x + residual, None
        return layer_norm_dual_fwd(x, weight, bias, eps, low, stats=False, residual=residual)[:2]
    if residual is not None:  # the sum is what LayerNorm's backward reads: autograd's add
        x = x + residual
    c = None if torch.compiler.is_compiling() else native()  # (dynamo traces the Python Function)
    if c is None:
        return _LayerNormDual.apply(x, weight, bias, eps, low)
    torch._C._set_grad_enabled(False)  # the values without autograd; one C++ node joins them to x, weight, bias
    try:
        y, y_low, mean, rstd = layer_norm_dual_fwd(x, weight, bias, eps, low)
    finally:
        torch._C._set_grad_enabled(True)
    return c.layer_norm_dual_grad(x, weight, bias, y, y_low, mean, rstd)


def representation_std(x: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the standard deviation over rows: the collapse statistic
    logged as target_var / pred_var (data2vec's own definition)."""
    x = x.float().reshape(-1, x.shape[-1])
    if x.shape[0] < 2:
        return x.new_zeros(())
    return torch.sqrt(x.var(dim=0) + 1e-6).mean()
