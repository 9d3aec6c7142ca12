// Large fresh outputs: ask Linux to back them with transparent huge pages before the first
// write. A freshly allocated multi-MiB tensor is otherwise faulted in 4 KiB page by page, which
// costs more than the copy itself (measured on the 2-core EPYC, THP in "madvise" mode: a
// 59 MB output written in ~40 ms with 4 KiB faults, ~10 ms after madvise(MADV_HUGEPAGE)).
#pragma once
#include <cstddef>
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace csfm {

// Advises the 2 MiB-aligned interior of [data, data + bytes) (outputs of 4 MiB or more): the
// range stays inside the caller's buffer. Only a hint: errors are ignored, other systems no-op.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace csfm
