#include "frame_masking.h"
#include "row_rng.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace d2v {
namespace {

// Domain separation from the text and image masks' kinds.
constexpr uint64_t kFrameKind = 0x4652414DULL;  // "FRAM"
constexpr uint64_t kFrameBlockKind = 0x46424C4BULL;  // "FBLK"

void check_frame_args(const torch::Tensor& indices, int64_t num_frames, double mask_prob) {
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == torch::kLong && indices.device().is_cpu() &&
                  indices.is_contiguous(),
              "indices must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(num_frames >= 1 && num_frames <= INT32_MAX, "num_frames out of range: ", num_frames);
  TORCH_CHECK(mask_prob >= 0.0 && mask_prob <= 1.0, "mask_prob must be in [0, 1], got ", mask_prob);
}

}  // namespace

torch::Tensor frame_span_mask(
    int64_t num_frames,
    double mask_prob,
    int64_t span,
    int64_t min_masks,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices,
    int64_t clones) {
  check_frame_args(indices, num_frames, mask_prob);
  TORCH_CHECK(span >= 1 && min_masks >= 0 && clones >= 1, "need span >= 1, min_masks >= 0, clones >= 1");
  const int64_t T = num_frames;
  const int64_t B = indices.size(0);
  const int64_t rows = B * clones;
  auto out = torch::zeros({rows, T}, torch::kBool);
  // bool storage is one byte holding 0 or 1; flip_random writes only 0 or 1.
  auto* cells = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<RowRng> rngs;
  rngs.reserve(static_cast<size_t>(rows));
  std::vector<int64_t> counts(static_cast<size_t>(rows));
  std::vector<int32_t> perm(static_cast<size_t>(T));

  // Pass 1: each row's spans. num = max(min_masks, floor(mask_prob * T / span + u)) starts
  // drawn without replacement from [0, room), room = T - span, or T - num - 1 when that
  // leaves fewer than num + 1 starts (fairseq's rule for short inputs).
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < clones; ++c) {
      const int64_t r = b * clones + c;
      RowRng rng{row_key(kFrameKind, seed, epoch, static_cast<uint64_t>(idx[b]), static_cast<uint64_t>(c))};
      const double u = rng.uniform();
      const int64_t num = std::max<int64_t>(
          min_masks, static_cast<int64_t>(std::floor((mask_prob * static_cast<double>(T)) / static_cast<double>(span) + u)));
      int64_t room = T - span;
      if (room <= num) room = T - num - 1;
      TORCH_CHECK(room >= num && room > 0, num_frames, " frames cannot hold ", num, " mask spans of ", span);
      for (int64_t i = 0; i < room; ++i) perm[i] = static_cast<int32_t>(i);
      uint8_t* row = cells + r * T;
      for (int64_t i = 0; i < num; ++i) {
        const int64_t j = i + static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(room - i)));
        std::swap(perm[i], perm[j]);
        const int64_t stop = std::min<int64_t>(perm[i] + span, T);
        for (int64_t t = perm[i]; t < stop; ++t) row[t] = 1;
      }
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) count += row[t];
      counts[r] = count;
      rngs.push_back(rng);
    }
  }
  if (rows == 0) return out;

  // Pass 2: every row thinned to the batch's smallest count, dropping a uniformly random
  // subset of its masked frames (the stream continues where pass 1 left it).
  const int64_t target = *std::min_element(counts.begin(), counts.end());
  std::vector<int32_t> pos;
  pos.reserve(static_cast<size_t>(T));
  for (int64_t r = 0; r < rows; ++r) {
    if (counts[r] > target) flip_random(rngs[r], cells + r * T, T, true, counts[r] - target, pos);
  }
  return out;
}

torch::Tensor frame_block_mask(
    int64_t num_frames,
    double mask_prob,
    int64_t span,
    double mask_prob_adjust,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices,
    int64_t clones) {
  check_frame_args(indices, num_frames, mask_prob);
  TORCH_CHECK(span >= 1 && clones >= 1, "need span >= 1, clones >= 1");
  TORCH_CHECK(mask_prob_adjust >= 0.0, "mask_prob_adjust must be >= 0, got ", mask_prob_adjust);
  const int64_t T = num_frames;
  const int64_t B = indices.size(0);
  const int64_t centres = static_cast<int64_t>(
      static_cast<double>(T) * ((mask_prob + mask_prob_adjust) / static_cast<double>(span)));
  const int64_t target = static_cast<int64_t>(static_cast<double>(T) * mask_prob);
  const int64_t offset = span / 2;
  auto out = torch::zeros({B * clones, T}, torch::kBool);
  auto* cells = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<int32_t> pos;
  pos.reserve(static_cast<size_t>(T));

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < clones; ++c) {
      RowRng rng{row_key(kFrameBlockKind, seed, epoch, static_cast<uint64_t>(idx[b]), static_cast<uint64_t>(c))};
      uint8_t* row = cells + (b * clones + c) * T;
      // centres with replacement; frames centre - offset .. centre - offset + span - 1, clamped
      for (int64_t i = 0; i < centres; ++i) {
        const int64_t centre = static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(T)));
        for (int64_t k = 0; k < span; ++k) row[std::clamp<int64_t>(centre + k - offset, 0, T - 1)] = 1;
      }
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) n += row[t];
      if (n > target) flip_random(rng, row, T, true, n - target, pos);
      else if (n < target) flip_random(rng, row, T, false, target - n, pos);
    }
  }
  return out;
}

}  // namespace d2v
