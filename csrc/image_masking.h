// Patch masks for images (docs/images.md): BEiT block masking (data2vec v1) and inverse block
// masking (data2vec 2.0). A row's mask depends only on (seed, epoch, index[, clone]) and
// the arguments; d2v_fast/data/images/masking.py holds the bit-identical Python twin and
// documents the algorithms.
#pragma once

#include <cstdint>

#include <torch/extension.h>

namespace d2v {

// indices: int64 [B]. Returns bool [B, height * width], row-major patch order.
torch::Tensor block_mask(
    int64_t height,
    int64_t width,
    int64_t num_masked,
    int64_t min_block,
    int64_t max_block,
    double min_aspect,
    double max_aspect,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices);

// Returns bool [B * clones, height * width]; row b * clones + c is clone c of sample b.
// Every row masks exactly height * width - int(height * width * (1 - mask_prob)) patches.
torch::Tensor inverse_block_mask(
    int64_t height,
    int64_t width,
    double mask_prob,
    int64_t block,
    double mask_prob_adjust,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices,
    int64_t clones);

}  // namespace d2v
