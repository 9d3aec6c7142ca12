// Row gather / scatter-with-fill for masked pretraining (drop masked tokens before the
// encoder, put them back with a learned fill vector after it), forward and backward.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "memory.h"
#include "parallel.h"
#include "simd.h"

namespace csfm {
namespace {

// Threads worth starting for copying `rows` rows of `d` floats: at least ~64 KiB each.
int copy_threads(int n_threads, int64_t rows, int64_t d) {
  const int64_t bytes = rows * std::max<int64_t>(d, 1) * static_cast<int64_t>(sizeof(float));
  const int64_t by_size = std::max<int64_t>(1, bytes / (64 * 1024));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({n_threads, by_size, rows})));
}

// Copies one row of d floats; with `stream`, by non-temporal stores (dst vector-aligned and
// d a multiple of VW: see use_streaming_stores).
inline void copy_row(float* dst, const float* src, int64_t d, bool stream) {
  if (!stream) {
    std::memcpy(dst, src, static_cast<size_t>(d) * sizeof(float));
    return;
  }
  for (int64_t j = 0; j < d; j += VW) vstream(dst + j, vload(src + j));
}

}  // namespace

void gather_rows(const float* src, const int64_t* rows, int64_t K, int64_t D, float* out,
                 int n_threads) {
  if (K <= 0 || D <= 0) return;
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(float);
  advise_huge_pages(out, static_cast<size_t>(K) * row_bytes);
  const bool stream = use_streaming_stores(out, K, D);
  parallel_chunks(K, copy_threads(n_threads, K, D), [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) copy_row(out + i * D, src + rows[i] * D, D, stream);
    if (stream) stream_fence();
  });
}

void scatter_rows_fill(const float* src, const int64_t* source_rows, const float* fill,
                       int64_t M, int64_t D, float* out, int n_threads) {
  if (M <= 0 || D <= 0) return;
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(float);
  advise_huge_pages(out, static_cast<size_t>(M) * row_bytes);
  const bool stream = use_streaming_stores(out, M, D);
  parallel_chunks(M, copy_threads(n_threads, M, D), [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = source_rows[i];
      copy_row(out + i * D, r >= 0 ? src + r * D : fill, D, stream);
    }
    if (stream) stream_fence();
  });
}

void scatter_rows_fill_backward(const float* grad_out, const int64_t* source_rows, int64_t M,
                                int64_t K, int64_t D, float* grad_src, float* grad_fill,
                                int n_threads) {
  if (D <= 0) return;
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(float);
  advise_huge_pages(grad_src, static_cast<size_t>(K) * row_bytes);

  // Rows of grad_src that no output row refers to get zeros (skipped when all K are kept).
  int64_t kept = 0;
  for (int64_t i = 0; i < M; ++i) kept += source_rows[i] >= 0;
  if (kept < K) {
    std::vector<unsigned char> seen(static_cast<size_t>(K), 0);
    for (int64_t i = 0; i < M; ++i)
      if (source_rows[i] >= 0) seen[static_cast<size_t>(source_rows[i])] = 1;
    for (int64_t r = 0; r < K; ++r)
      if (!seen[static_cast<size_t>(r)]) std::memset(grad_src + r * D, 0, row_bytes);
  }

  const int nt = copy_threads(n_threads, M, D);
  // per-thread partial sums of the dropped rows, in double, summed in worker order
  std::vector<double> partial(static_cast<size_t>(nt) * static_cast<size_t>(D), 0.0);
  if (M > 0) {
    parallel_chunks(M, nt, [&](int64_t b, int64_t e, int worker) {
      double* acc = partial.data() + static_cast<size_t>(worker) * static_cast<size_t>(D);
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = source_rows[i];
        const float* g = grad_out + i * D;
        if (r >= 0) {
          std::memcpy(grad_src + r * D, g, row_bytes);
        } else {
          for (int64_t j = 0; j < D; ++j) acc[j] += g[j];
        }
      }
    });
  }
  for (int64_t j = 0; j < D; ++j) {
    double s = 0.0;
    for (int w = 0; w < nt; ++w) s += partial[static_cast<size_t>(w) * D + j];
    grad_fill[j] = static_cast<float>(s);
  }
}

}  // namespace csfm
