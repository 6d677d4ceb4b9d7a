// Host side of the CPU kernels (compiled once, baseline ISA): which capability's kernels run,
// and the output allocation with huge pages (see kernels.h).
#include "kernels.h"

#include <ATen/Version.h>
#include <ATen/ops/empty.h>

#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace taylor_kernels::cpu {

int capability() {
  static const int chosen = [] {
#ifdef TK_CPU_X86
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512") return 2;
    if (name == "AVX2") return 1;
#endif
    return 0;
  }();
  return chosen;
}

const char* capability_name() { return pick<const char>({"DEFAULT", "AVX2", "AVX512"}); }

at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto ptr = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t begin = (ptr + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (ptr + out.nbytes()) & ~(kHuge - 1);
  if (end >= begin + 2 * kHuge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return out;
}

}  // namespace taylor_kernels::cpu
