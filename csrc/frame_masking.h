// Frame masks for speech (docs/speech.md): the span masks of both published audio recipes
// (fairseq compute_mask_indices with static spans, min_masks, require_same_masks). A row's
// spans depend only on (seed, epoch, index, clone) and the arguments; the thinning to the
// batch's smallest count also on that count. d2v_fast/data/audio/masking.py holds the
// bit-identical Python twin and documents the algorithm.
#pragma once

#include <cstdint>

#include <torch/extension.h>

namespace d2v {

// indices: int64 [B]. Returns bool [B * clones, num_frames]; row b * clones + c is clone c
// of sample b; every row masks the same number of frames. The caller (the Python wrapper)
// has checked that num_frames can hold the spans.
torch::Tensor frame_span_mask(
    int64_t num_frames,
    double mask_prob,
    int64_t span,
    int64_t min_masks,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices,
    int64_t clones);

}  // namespace d2v
