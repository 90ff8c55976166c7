// Host-side autograd nodes of the encoder step (see autograd.h): the same ATen ops as the
// Python autograd Functions in d2v_fast/models/encoder.py and d2v_fast/ops/__init__.py, with
// forward's bookkeeping and the whole backward in C++, so that the Python interpreter is not
// on the step's path once per Linear and once per LayerNorm.
#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

namespace d2v {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor rows(const at::Tensor& x) { return x.dim() == 2 ? x : x.reshape({-1, x.size(-1)}); }

// aten::mm.dtype (a GEMM with its result in another dtype, CUDA only) where this torch has it.
std::optional<c10::OperatorHandle> mm_dtype_op() {
  static const std::optional<c10::OperatorHandle> op = c10::Dispatcher::singleton().findOp({"aten::mm", "dtype"});
  return op;
}

// ``d2v_fast::mm_out_dtype`` through the dispatcher: one op to a profiler or a dispatch mode
// (d2v_fast/cost.py counts it as the one GEMM it is on a GPU).
at::Tensor call_mm_out_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("d2v_fast::mm_out_dtype", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>();
  return op.call(a, b, dtype);
}

struct ShadowLinearFn : public torch::autograd::Function<ShadowLinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& w, const at::Tensor& w_t,
                            const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& x_low,
                            bool fp32_grads) {
    const bool has_low = x_low.has_value() && x_low->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    at::Tensor x2 = rows(has_low ? *x_low : x.to(w_t.scalar_type()));
    ctx->save_for_backward({x2, w});
    ctx->saved_data["shape"] = x.sizes().vec();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["p_dtype"] = weight.scalar_type();
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["fp32"] = fp32_grads;
    at::Tensor out = (b.has_value() && b->defined()) ? at::addmm(*b, x2, w_t) : at::mm(x2, w_t);
    if (x.dim() == 2) return out;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out.size(1);
    return out.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x2 = saved[0];
    const at::Tensor& w = saved[1];
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto p_dtype = ctx->saved_data["p_dtype"].toScalarType();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // fp32_grads was decided by the caller at forward time (the Python twin decides in backward,
    // from the gradient's device: the same answer, the device being the same)
    const bool fp32 = ctx->saved_data["fp32"].toBool() && p_dtype != grads[0].scalar_type();
    at::Tensor g2 = rows(grads[0]);
    at::Tensor gx, gw, gb;
    // edges are the tensor inputs in order: x, weight, [bias], ...
    if (ctx->needs_input_grad(0)) {
      // an fp32 input (cast here to the copy's dtype) takes its gradient from the GEMM too
      const bool wide = ctx->saved_data["fp32"].toBool() && x_dtype == at::kFloat &&
                        x_dtype != grads[0].scalar_type();
      gx = wide ? call_mm_out_dtype(g2, w, x_dtype) : g2.mm(w);
      if (shape.size() != 2) gx = gx.view(shape);
      if (!wide) gx = gx.to(x_dtype);
    }
    if (ctx->needs_input_grad(1)) {
      gw = fp32 ? call_mm_out_dtype(g2.t(), x2, p_dtype) : g2.t().mm(x2).to(p_dtype);
    }
    if (has_bias && ctx->needs_input_grad(2)) {
      gb = fp32 ? at::sum(g2, {0}, false, p_dtype) : at::sum(g2, {0}).to(p_dtype);
    }
    return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct LayerNormDualFn : public torch::autograd::Function<LayerNormDualFn> {
  // ``outs`` (y, y_low) come as one non-tensor argument: outputs that are not inputs take this
  // node as their history as they are (an input returned would be returned as a view of itself).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::tuple<at::Tensor, at::Tensor>& outs,
                               const at::Tensor& mean, const at::Tensor& rstd) {
    const bool has_w = weight.has_value() && weight->defined();
    const bool has_b = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, has_w ? *weight : at::Tensor(), has_b ? *bias : at::Tensor(), mean, rstd});
    ctx->saved_data["has_w"] = has_w;
    ctx->saved_data["has_b"] = has_b;
    ctx->set_materialize_grads(false);  // an unused output gives an undefined gradient, not zeros
    return {std::get<0>(outs), std::get<1>(outs)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    const at::Tensor& grad_low = grads[1];
    variable_list out(6);  // one per forward argument
    if (!grad.defined() && !grad_low.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const bool has_w = ctx->saved_data["has_w"].toBool();
    const bool has_b = ctx->saved_data["has_b"].toBool();
    // the two outputs' gradients summed in fp32, as autograd sums them after a cast's backward
    at::Tensor g = !grad.defined() ? grad_low.to(x.scalar_type()) : (!grad_low.defined() ? grad : grad + grad_low);
    const size_t w_edge = 1, b_edge = has_w ? 2 : 1;
    std::array<bool, 3> mask = {ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(w_edge),
                                has_b && ctx->needs_input_grad(b_edge)};
    std::optional<at::Tensor> weight = has_w ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    std::optional<at::Tensor> bias = has_b ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    auto res = at::native_layer_norm_backward(g, x, {x.size(-1)}, saved[3], saved[4], weight, bias, mask);
    out[0] = std::get<0>(res);
    out[1] = std::get<1>(res);
    out[2] = std::get<2>(res);
    return out;
  }
};

}  // namespace

at::Tensor mm_out_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype) {
  // 1: aten::mm.dtype took these dtypes on this device before; -1: it raised (a build or device
  // without its kernel), and the GEMM and cast run from then on, as where torch lacks the op
  static std::atomic<int> works{0};
  if (a.is_cuda() && a.scalar_type() != dtype && works.load() >= 0) {
    if (auto op = mm_dtype_op()) {
      try {
        at::Tensor out = op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>().call(a, b, dtype);
        works.store(1);
        return out;
      } catch (const c10::Error&) {
        if (works.load() == 1) throw;  // it worked before: a real error, not a missing kernel
        works.store(-1);
      }
    }
  }
  return a.mm(b).to(dtype);
}

at::Tensor shadow_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& w, const at::Tensor& w_t, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& x_low, bool fp32_grads) {
  return ShadowLinearFn::apply(x, weight, bias, w, w_t, b, x_low, fp32_grads);
}

std::tuple<at::Tensor, at::Tensor> layer_norm_dual_grad(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& y,
                                             const at::Tensor& y_low, const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(!y.requires_grad() && !y_low.requires_grad(), "layer_norm_dual_grad: y and y_low must be computed "
              "without autograd (under torch.no_grad())");
  auto out = LayerNormDualFn::apply(x, weight, bias, std::make_tuple(y, y_low), mean, rstd);
  return {out[0], out[1]};
}

}  // namespace d2v

// a fragment: the Python custom ops (d2v_fast/kernels) share the namespace
TORCH_LIBRARY_FRAGMENT(d2v_fast, m) { m.def("mm_out_dtype(Tensor a, Tensor b, ScalarType dtype) -> Tensor"); }

TORCH_LIBRARY_IMPL(d2v_fast, CompositeExplicitAutograd, m) { m.impl("mm_out_dtype", &d2v::mm_out_dtype); }
