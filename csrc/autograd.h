// Autograd nodes of the encoder step written in C++ (forward's bookkeeping and the whole
// backward): the same ATen ops, value for value, as the Python autograd Functions they stand
// in for (d2v_fast/models/encoder.py ``_ShadowLinearFn``, d2v_fast/ops ``_LayerNormDual``).
// Like those, they have no double backward (the step never differentiates a gradient).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace d2v {

// ``a @ b`` with its result in ``dtype``: one GEMM on a GPU whose torch has ``aten::mm.dtype``,
// else the GEMM in ``a``'s dtype and a cast.
at::Tensor mm_out_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype);

// ``x @ w_t + b`` on the low-precision copies ``w``/``w_t``/``b`` of a Linear's ``weight`` and
// ``bias``; the gradients go to ``x``, ``weight`` and ``bias`` (in their dtypes). ``x_low``:
// ``x`` already rounded to the copies' dtype (used for the GEMM, no cast). ``fp32_grads``: the
// parameter gradients straight from the GEMM and the sum in the parameters' dtype.
at::Tensor shadow_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& w, const at::Tensor& w_t, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& x_low, bool fp32_grads);

// A LayerNorm's two outputs ``y`` (fp32) and ``y_low`` (its rounding), computed by the caller
// without autograd, joined to ``x``, ``weight`` and ``bias`` by one node whose backward sums the
// two gradients in fp32 and runs ATen's LayerNorm backward with the saved ``mean``/``rstd``.
std::tuple<at::Tensor, at::Tensor> layer_norm_dual_grad(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& y,
                                             const at::Tensor& y_low, const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace d2v
