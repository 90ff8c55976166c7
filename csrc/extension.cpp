// Python bindings of d2v_fast._C. Callers go through the checked wrappers in
// d2v_fast/data/masking.py, which validate arguments with user-facing messages.
#include <torch/extension.h>

#include "autograd.h"
#include "frame_masking.h"
#include "image_masking.h"
#include "masking.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2v_fast C++ data path (CPU) and host-side autograd nodes of the encoder step.";
  // The GIL is released so DataLoader workers' threads and the trainer run alongside.
  m.def("span_mask", &d2v::span_mask, py::call_guard<py::gil_scoped_release>(),
        "Span mask of a batch: bool [B, T].", py::arg("maskable"), py::arg("mask_prob"), py::arg("span"),
        py::arg("seed"), py::arg("epoch"), py::arg("indices"));
  m.def("random_mask", &d2v::random_mask, py::call_guard<py::gil_scoped_release>(),
        "Random (MAE-style) masks of a batch, clones adjacent: bool [B * clones, T].", py::arg("maskable"),
        py::arg("mask_prob"), py::arg("seed"), py::arg("epoch"), py::arg("indices"), py::arg("clones"));
  m.def("block_mask", &d2v::block_mask, py::call_guard<py::gil_scoped_release>(),
        "BEiT block masks of a batch of images: bool [B, height * width].", py::arg("height"), py::arg("width"),
        py::arg("num_masked"), py::arg("min_block"), py::arg("max_block"), py::arg("min_aspect"),
        py::arg("max_aspect"), py::arg("seed"), py::arg("epoch"), py::arg("indices"));
  m.def("inverse_block_mask", &d2v::inverse_block_mask, py::call_guard<py::gil_scoped_release>(),
        "data2vec 2.0 inverse block masks, clones adjacent: bool [B * clones, height * width].", py::arg("height"),
        py::arg("width"), py::arg("mask_prob"), py::arg("block"), py::arg("mask_prob_adjust"), py::arg("seed"),
        py::arg("epoch"), py::arg("indices"), py::arg("clones"));
  m.def("frame_span_mask", &d2v::frame_span_mask, py::call_guard<py::gil_scoped_release>(),
        "Speech span masks of a batch, clones adjacent, the same count per row: bool [B * clones, T].",
        py::arg("num_frames"), py::arg("mask_prob"), py::arg("span"), py::arg("min_masks"), py::arg("seed"),
        py::arg("epoch"), py::arg("indices"), py::arg("clones"));
  m.def("frame_block_mask", &d2v::frame_block_mask, py::call_guard<py::gil_scoped_release>(),
        "data2vec 2.0 speech block masks, clones adjacent, int(mask_prob * T) per row: bool [B * clones, T].",
        py::arg("num_frames"), py::arg("mask_prob"), py::arg("span"), py::arg("mask_prob_adjust"), py::arg("seed"),
        py::arg("epoch"), py::arg("indices"), py::arg("clones"));
  // Autograd nodes: called on the step's path, the GIL held (they create graph nodes).
  m.def("shadow_linear", &d2v::shadow_linear, "A Linear on low-precision weight copies, gradients to the parameters.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("w"), py::arg("w_t"), py::arg("b"),
        py::arg("x_low"), py::arg("fp32_grads"));
  m.def("layer_norm_dual_grad", &d2v::layer_norm_dual_grad,
        "A LayerNorm's fp32 and rounded outputs joined to its inputs by one autograd node.", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("y_low"), py::arg("mean"), py::arg("rstd"));
}
