// Mask generation for the CPU data path (docs/data.md, docs/design.md#data).
//
// Both functions fill a whole batch in one call, split over std::threads by rows. A row's
// mask depends only on (seed, epoch, index[, clone]) and its maskable pattern, never on
// the batch it sits in or the thread count. d2v_fast/data/text/masking.py holds the
// bit-identical pure-Python twin and documents the algorithm.
#pragma once

#include <cstdint>

#include <torch/extension.h>

namespace d2v {

// maskable: bool [B, T] (contiguous CPU); indices: int64 [B]. Returns bool [B, T].
torch::Tensor span_mask(
    const torch::Tensor& maskable,
    double mask_prob,
    int64_t span,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices);

// Returns bool [B * clones, T]; row b * clones + c is clone c of sample b.
torch::Tensor random_mask(
    const torch::Tensor& maskable,
    double mask_prob,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices,
    int64_t clones);

}  // namespace d2v
