// Frame masks for speech: the span masks of data2vec (v1) speech (fairseq
// compute_mask_indices with static spans, min_masks, require_same_masks) and the block masks of
// data2vec 2.0 speech (fairseq compute_block_mask_1d). A row's span mask depends only on
// (seed, epoch, index, clone) and the arguments, the thinning to the batch's smallest count
// also on that count; a block mask row on (seed, epoch, index, clone) and the arguments alone.
// d2v_fast/data/audio/masking.py holds the bit-identical Python twins and documents them.
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

// indices: int64 [B]. Returns bool [B * clones, num_frames], row b * clones + c clone c of
// sample b: int(T * (mask_prob + mask_prob_adjust) / span) block centres drawn with
// replacement, each masking the span frames around it (clamped at the ends), then exactly
// int(T * mask_prob) masked frames per row (extra ones unmasked, missing ones added).
torch::Tensor frame_block_mask(
    int64_t num_frames,
    double mask_prob,
    int64_t span,
    double mask_prob_adjust,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices,
    int64_t clones);

}  // namespace d2v
