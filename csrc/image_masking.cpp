#include "image_masking.h"
#include "row_rng.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace d2v {
namespace {

// Domain separation from the text masks' kinds (csrc/masking.cpp).
constexpr uint64_t kBlockKind = 0x42454954ULL;    // "BEIT"
constexpr uint64_t kInverseKind = 0x49424C4BULL;  // "IBLK"

// Python's round(): to nearest, ties to even (std::nearbyint in the default rounding mode).
inline int64_t round_half_even(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

void check_indices(const torch::Tensor& indices) {
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == torch::kLong && indices.device().is_cpu() &&
                  indices.is_contiguous(),
              "indices must be a contiguous 1-D int64 CPU tensor");
}

void check_grid(int64_t height, int64_t width) {
  TORCH_CHECK(height >= 1 && width >= 1 && height * width <= INT32_MAX, "bad patch grid ", height, "x", width);
}

}  // namespace

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
    const torch::Tensor& indices) {
  check_indices(indices);
  check_grid(height, width);
  TORCH_CHECK(num_masked >= 0 && num_masked <= height * width, "num_masked out of range: ", num_masked);
  TORCH_CHECK(min_block >= 1 && max_block >= min_block, "need 1 <= min_block <= max_block");
  TORCH_CHECK(min_aspect > 0 && max_aspect >= min_aspect, "need 0 < min_aspect <= max_aspect");
  const int64_t B = indices.size(0);
  const int64_t L = height * width;
  auto out = torch::zeros({B, L}, torch::kBool);
  bool* out_ptr = out.data_ptr<bool>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const double log_lo = std::log(min_aspect);
  const double log_hi = std::log(max_aspect);
  std::vector<uint8_t> cells(static_cast<size_t>(L));

  for (int64_t b = 0; b < B; ++b) {
    RowRng rng{row_key(kBlockKind, seed, epoch, static_cast<uint64_t>(idx[b]), 0)};
    std::fill(cells.begin(), cells.end(), 0);
    int64_t count = 0;
    while (count < num_masked) {
      const int64_t budget = std::min(num_masked - count, max_block);
      int64_t added = 0;
      // BEiT: up to 10 tries to place a block of min_block..budget patches that adds
      // between 1 and budget new masked patches; stop when none fits.
      for (int attempt = 0; attempt < 10 && added == 0; ++attempt) {
        const double area = static_cast<double>(min_block) +
                            static_cast<double>(budget - min_block) * rng.uniform();
        const double aspect = std::exp(log_lo + (log_hi - log_lo) * rng.uniform());
        const int64_t h = round_half_even(std::sqrt(area * aspect));
        const int64_t w = round_half_even(std::sqrt(area / aspect));
        if (w >= width || h >= height) continue;
        const int64_t top = static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(height - h + 1)));
        const int64_t left = static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(width - w + 1)));
        int64_t fresh = 0;
        for (int64_t y = top; y < top + h; ++y)
          for (int64_t x = left; x < left + w; ++x) fresh += cells[y * width + x] ? 0 : 1;
        if (fresh > 0 && fresh <= budget) {
          for (int64_t y = top; y < top + h; ++y)
            for (int64_t x = left; x < left + w; ++x) cells[y * width + x] = 1;
          added = fresh;
        }
      }
      if (added == 0) break;
      count += added;
    }
    for (int64_t t = 0; t < L; ++t) out_ptr[b * L + t] = cells[t] != 0;
  }
  return out;
}

torch::Tensor inverse_block_mask(
    int64_t height,
    int64_t width,
    double mask_prob,
    int64_t block,
    double mask_prob_adjust,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices,
    int64_t clones) {
  check_indices(indices);
  check_grid(height, width);
  TORCH_CHECK(mask_prob >= 0.0 && mask_prob <= 1.0, "mask_prob must be in [0, 1], got ", mask_prob);
  TORCH_CHECK(block >= 1, "block must be >= 1, got ", block);
  TORCH_CHECK(clones >= 1, "clones must be >= 1, got ", clones);
  const int64_t B = indices.size(0);
  const int64_t L = height * width;
  const double keep_prob = 1.0 - mask_prob;
  // fairseq compute_block_mask_2d: centres for the visible blocks, then exactly
  // int(L * keep_prob) visible patches per row (extra ones hidden, missing ones added).
  const int64_t centres = std::max<int64_t>(
      0, static_cast<int64_t>(static_cast<double>(L) * ((keep_prob + mask_prob_adjust) /
                                                         static_cast<double>(block * block))));
  const int64_t target = static_cast<int64_t>(static_cast<double>(L) * keep_prob);
  const int64_t offset = block / 2;
  auto out = torch::empty({B * clones, L}, torch::kBool);
  bool* out_ptr = out.data_ptr<bool>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<uint8_t> visible(static_cast<size_t>(L));
  std::vector<int32_t> pos;
  pos.reserve(static_cast<size_t>(L));

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < clones; ++c) {
      RowRng rng{row_key(kInverseKind, seed, epoch, static_cast<uint64_t>(idx[b]), static_cast<uint64_t>(c))};
      std::fill(visible.begin(), visible.end(), 0);
      for (int64_t i = 0; i < centres; ++i) {
        const int64_t centre = static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(L)));
        const int64_t cy = centre / width, cx = centre % width;
        // blocks at the border are clipped (coordinates clamped), as in fairseq
        for (int64_t dy = 0; dy < block; ++dy) {
          const int64_t y = std::clamp<int64_t>(cy + dy - offset, 0, height - 1);
          for (int64_t dx = 0; dx < block; ++dx) {
            const int64_t x = std::clamp<int64_t>(cx + dx - offset, 0, width - 1);
            visible[y * width + x] = 1;
          }
        }
      }
      int64_t n = 0;
      for (int64_t t = 0; t < L; ++t) n += visible[t];
      if (n > target) flip_random(rng, visible.data(), L, true, n - target, pos);
      else if (n < target) flip_random(rng, visible.data(), L, false, target - n, pos);
      bool* row = out_ptr + (b * clones + c) * L;
      for (int64_t t = 0; t < L; ++t) row[t] = visible[t] == 0;
    }
  }
  return out;
}

}  // namespace d2v
