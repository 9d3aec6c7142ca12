// Vector types and stores shared by the CPU kernels: GCC/Clang vector extensions, AVX-512
// where the build targets it, so float loops keep a fixed, vectorised order without
// -ffast-math.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define CSFM_VW 16
#elif defined(__AVX__)
#define CSFM_VW 8
#else
#define CSFM_VW 4
#endif

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vector types passed between internal (inlined) helpers: no ABI is involved, so
// GCC's note about their ABI on targets without AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace csfm {

constexpr int VW = CSFM_VW;  // floats per vector register
typedef float vf __attribute__((vector_size(CSFM_VW * sizeof(float))));

// Outputs at least this large are written with non-temporal stores: it saves reading every
// line of the output before overwriting it, and the output would not stay in cache anyway.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

// Non-temporal store of a whole vector to a vector-aligned address (falls back to a plain
// store without AVX); stream_fence() makes them visible before the kernel returns.
inline void vstream(float* p, vf v) {
#if CSFM_VW == 16
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif CSFM_VW == 8
  _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
#else
  vstore(p, v);
#endif
}
inline void stream_fence() {
#if CSFM_VW >= 8
  _mm_sfence();
#endif
}

// Whether an output of `rows` rows of `d` floats at `out` is written with vstream: large
// enough (kStreamBytes), and every row starts on a vector boundary.
inline bool use_streaming_stores(const float* out, int64_t rows, int64_t d) {
  return rows * d * static_cast<int64_t>(sizeof(float)) >= kStreamBytes && d % VW == 0 &&
         reinterpret_cast<uintptr_t>(out) % (VW * sizeof(float)) == 0;
}

}  // namespace csfm
