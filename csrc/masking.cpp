#include "masking.h"
#include "row_rng.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace d2v {
namespace {

// Domain separation, so span and random masks of the same sample are independent.
constexpr uint64_t kSpanKind = 0x5350414EULL;    // "SPAN"
constexpr uint64_t kRandomKind = 0x52414E44ULL;  // "RAND"

// Compacts the maskable positions of one row into pos; returns their count L.
inline int64_t maskable_positions(const bool* row, int64_t T, int32_t* pos) {
  int64_t L = 0;
  for (int64_t t = 0; t < T; ++t) {
    pos[L] = static_cast<int32_t>(t);
    L += row[t] ? 1 : 0;
  }
  return L;
}

// First n entries of a uniformly random permutation of [0, L), left in perm[0, n).
inline void partial_shuffle(RowRng& rng, int32_t* perm, int64_t L, int64_t n) {
  for (int64_t i = 0; i < L; ++i) perm[i] = static_cast<int32_t>(i);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(L - i)));
    std::swap(perm[i], perm[j]);
  }
}

// Below this many positions per thread, starting a std::thread (~20-40 us) costs more than
// the rows it would take (~0.3 us per 512 positions); 256 x 512 rows still use 2 threads.
constexpr int64_t kMinPositionsPerThread = 32768;

// Runs body(begin, end, pos, perm) over contiguous row ranges on up to
// at::get_num_threads() threads (never more threads than rows). The calling thread takes
// the first range. pos and perm are per-thread scratch of T ints each. work_per_row is the
// positions written per input row (T, or T * clones).
template <class Body>
void parallel_rows(int64_t rows, int64_t T, int64_t work_per_row, const Body& body) {
  if (rows == 0) return;
  const int64_t by_work = std::max<int64_t>(1, rows * work_per_row / kMinPositionsPerThread);
  const int64_t nthreads =
      std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), rows, by_work}));
  std::vector<std::exception_ptr> errors(nthreads);
  auto work = [&](int64_t tid) {
    try {
      const int64_t begin = rows * tid / nthreads;
      const int64_t end = rows * (tid + 1) / nthreads;
      std::vector<int32_t> pos(static_cast<size_t>(T)), perm(static_cast<size_t>(T));
      body(begin, end, pos.data(), perm.data());
    } catch (...) {
      errors[tid] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(nthreads - 1);
  int64_t next = 1;
  try {
    for (; next < nthreads; ++next) threads.emplace_back(work, next);
  } catch (const std::system_error&) {
    // Out of threads: the calling thread takes the ranges that got none.
  }
  work(0);
  for (int64_t tid = next; tid < nthreads; ++tid) work(tid);
  for (auto& th : threads) th.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

void check_inputs(const torch::Tensor& maskable, const torch::Tensor& indices) {
  TORCH_CHECK(maskable.dim() == 2 && maskable.scalar_type() == torch::kBool,
              "maskable must be a 2-D bool tensor, got ", maskable.scalar_type(), " with shape ", maskable.sizes());
  TORCH_CHECK(maskable.device().is_cpu() && maskable.is_contiguous(), "maskable must be a contiguous CPU tensor");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == torch::kLong && indices.device().is_cpu() &&
                  indices.is_contiguous(),
              "indices must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(indices.size(0) == maskable.size(0), "indices has length ", indices.size(0),
              ", expected the batch size ", maskable.size(0));
  TORCH_CHECK(maskable.size(1) <= INT32_MAX, "maskable has ", maskable.size(1), " positions, at most 2^31-1 supported");
}

}  // namespace

torch::Tensor span_mask(
    const torch::Tensor& maskable,
    double mask_prob,
    int64_t span,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices) {
  check_inputs(maskable, indices);
  TORCH_CHECK(mask_prob >= 0.0 && mask_prob <= 1.0, "mask_prob must be in [0, 1], got ", mask_prob);
  TORCH_CHECK(span >= 1, "span must be >= 1, got ", span);
  const int64_t B = maskable.size(0);
  const int64_t T = maskable.size(1);
  // Zeroed by the row workers: torch::zeros runs an OpenMP fill at this size, whose
  // spinning workers then compete with our threads (~1.5-2x slower at 256 x 512, 2 cores).
  auto out = torch::empty({B, T}, maskable.options());
  const bool* in_ptr = maskable.data_ptr<bool>();
  bool* out_ptr = out.data_ptr<bool>();
  const int64_t* idx_ptr = indices.data_ptr<int64_t>();

  parallel_rows(B, T, T, [&](int64_t begin, int64_t end, int32_t* pos, int32_t* perm) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = maskable_positions(in_ptr + b * T, T, pos);
      RowRng rng{row_key(kSpanKind, seed, epoch, static_cast<uint64_t>(idx_ptr[b]), 0)};
      // Drawn even when L == 0 so the stream layout never depends on L.
      const double u = rng.uniform();
      const double expected = (mask_prob * static_cast<double>(L)) / static_cast<double>(span);
      const int64_t n = std::min<int64_t>(static_cast<int64_t>(std::floor(expected + u)), L);
      partial_shuffle(rng, perm, L, n);
      bool* row_out = out_ptr + b * T;
      std::fill(row_out, row_out + T, false);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t start = perm[i];
        const int64_t stop = start + std::min<int64_t>(span, L - start);
        for (int64_t k = start; k < stop; ++k) row_out[pos[k]] = true;
      }
    }
  });
  return out;
}

torch::Tensor random_mask(
    const torch::Tensor& maskable,
    double mask_prob,
    uint64_t seed,
    uint64_t epoch,
    const torch::Tensor& indices,
    int64_t clones) {
  check_inputs(maskable, indices);
  TORCH_CHECK(mask_prob >= 0.0 && mask_prob <= 1.0, "mask_prob must be in [0, 1], got ", mask_prob);
  TORCH_CHECK(clones >= 1, "clones must be >= 1, got ", clones);
  const int64_t B = maskable.size(0);
  const int64_t T = maskable.size(1);
  auto out = torch::empty({B * clones, T}, maskable.options());
  const bool* in_ptr = maskable.data_ptr<bool>();
  bool* out_ptr = out.data_ptr<bool>();
  const int64_t* idx_ptr = indices.data_ptr<int64_t>();

  parallel_rows(B, T, T * clones, [&](int64_t begin, int64_t end, int32_t* pos, int32_t* perm) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = maskable_positions(in_ptr + b * T, T, pos);
      const int64_t n = std::min<int64_t>(static_cast<int64_t>(static_cast<double>(L) * mask_prob), L);
      for (int64_t c = 0; c < clones; ++c) {
        RowRng rng{row_key(kRandomKind, seed, epoch, static_cast<uint64_t>(idx_ptr[b]), static_cast<uint64_t>(c))};
        partial_shuffle(rng, perm, L, n);
        bool* row_out = out_ptr + (b * clones + c) * T;
        std::fill(row_out, row_out + T, false);
        for (int64_t i = 0; i < n; ++i) row_out[pos[perm[i]]] = true;
      }
    }
  });
  return out;
}

}  // namespace d2v
