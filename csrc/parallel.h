// Static work split for the CPU kernels. Built with OpenMP, the extension links libgomp.so.1,
// which the dynamic linker resolves to the copy torch already loaded (same soname), so the
// kernels run on torch's own worker threads: no second pool, and no contention with torch's
// workers still spinning after the previous aten op. Without OpenMP: std::threads per call.
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace csfm {

// Calls fn(begin, end, worker) on up to n_threads contiguous chunks of [0, n); worker in
// [0, n_threads). Runs inline when one thread suffices. fn must not throw.
template <typename Fn>
void parallel_chunks(int64_t n, int n_threads, Fn fn) {
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n)));
  if (n_threads == 1) {
    fn(int64_t{0}, n, 0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
  {
    // The runtime may grant fewer threads than asked: split over the ones that came.
    const int workers = omp_get_num_threads();
    const int w = omp_get_thread_num();
    const int64_t chunk = (n + workers - 1) / workers;
    const int64_t begin = std::min<int64_t>(n, w * chunk);
    const int64_t end = std::min<int64_t>(n, begin + chunk);
    if (begin < end) fn(begin, end, w);
  }
#else
  std::vector<std::thread> workers;
  workers.reserve(n_threads - 1);
  const int64_t chunk = (n + n_threads - 1) / n_threads;
  for (int w = 1; w < n_threads; ++w) {
    const int64_t begin = std::min<int64_t>(n, w * chunk);
    const int64_t end = std::min<int64_t>(n, begin + chunk);
    workers.emplace_back([=, &fn] { fn(begin, end, w); });
  }
  fn(0, std::min<int64_t>(n, chunk), 0);
  for (auto& t : workers) t.join();
#endif
}

}  // namespace csfm
