// The per-row random stream every mask in csrc/ draws from: splitmix64 keyed by
// (kind, seed, epoch, index, clone). One definition for text, audio and image masks; the
// Python twins (d2v_fast/data/masking.py) mirror it bit for bit.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace d2v {

// splitmix64 finaliser: a cheap bijection with full avalanche, so nearby
// (seed, epoch, index) tuples give unrelated streams.
inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// `kind` separates the mask families, so two kinds of mask of one sample are independent.
inline uint64_t row_key(uint64_t kind, uint64_t seed, uint64_t epoch, uint64_t index, uint64_t clone) {
  uint64_t k = mix(seed ^ kind);
  k = mix(k ^ epoch);
  k = mix(k ^ index);
  return mix(k ^ clone);
}

inline uint64_t mul_high(uint64_t a, uint64_t b) {
#if defined(_MSC_VER)
  return __umulh(a, b);
#else
  __extension__ typedef unsigned __int128 u128;
  return static_cast<uint64_t>((static_cast<u128>(a) * b) >> 64);
#endif
}

// splitmix64 stream keyed per row.
struct RowRng {
  uint64_t s;

  uint64_t next() {
    s += 0x9E3779B97F4A7C15ULL;
    return mix(s);
  }
  // 53 random bits: every value is an exact double in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Lemire's multiply-shift, without the rejection step: the bias is < r / 2^64,
  // far below anything a mask of a few thousand positions can show, and it keeps the
  // stream position independent of the drawn values (simple to mirror in Python).
  uint64_t bounded(uint64_t r) { return mul_high(next(), r); }
};

// Flips `count` positions whose value is `from` (picked uniformly without replacement,
// by a partial Fisher-Yates shuffle over those positions in index order).
inline void flip_random(RowRng& rng, uint8_t* cells, int64_t L, bool from, int64_t count, std::vector<int32_t>& pos) {
  pos.clear();
  for (int64_t t = 0; t < L; ++t)
    if (static_cast<bool>(cells[t]) == from) pos.push_back(static_cast<int32_t>(t));
  const int64_t n = static_cast<int64_t>(pos.size());
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(n - i)));
    std::swap(pos[i], pos[j]);
    cells[pos[i]] = from ? 0 : 1;
  }
}

}  // namespace d2v
