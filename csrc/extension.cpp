// Python bindings of d2v_fast._C. Callers go through the checked wrappers in
// d2v_fast/data/masking.py, which validate arguments with user-facing messages.
#include <torch/extension.h>

#include "masking.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2v_fast C++ data path (CPU).";
  // The GIL is released so DataLoader workers' threads and the trainer run alongside.
  m.def("span_mask", &d2v::span_mask, py::call_guard<py::gil_scoped_release>(),
        "Span mask of a batch: bool [B, T].", py::arg("maskable"), py::arg("mask_prob"), py::arg("span"),
        py::arg("seed"), py::arg("epoch"), py::arg("indices"));
  m.def("random_mask", &d2v::random_mask, py::call_guard<py::gil_scoped_release>(),
        "Random (MAE-style) masks of a batch, clones adjacent: bool [B * clones, T].", py::arg("maskable"),
        py::arg("mask_prob"), py::arg("seed"), py::arg("epoch"), py::arg("indices"), py::arg("clones"));
}
