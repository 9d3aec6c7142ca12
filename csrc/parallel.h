// Static work split over std::threads for the CPU kernels (no OpenMP: torch ships its own
// runtime and two in one process oversubscribe the cores).
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace csfm {

// Calls fn(begin, end, worker) on n_threads contiguous chunks of [0, n); worker in [0, n_threads).
// Runs inline when one thread suffices. fn must not throw.
template <typename Fn>
void parallel_chunks(int64_t n, int n_threads, Fn fn) {
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n)));
  if (n_threads == 1) {
    fn(int64_t{0}, n, 0);
    return;
  }
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
}

}  // namespace csfm
