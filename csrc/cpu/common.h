// What every CPU kernel file shares: the GCC/x86-64 switch for target attributes and run-time ISA
// dispatch, the threading threshold, and the SIGNS row size. Raw pointers only, no torch.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DELTACOMP_X86_GCC 1  // GCC on x86-64: target attributes and __builtin_cpu_supports
#include <immintrin.h>
#endif

namespace deltacomp {
namespace cpu {

// Below this many multiply-adds a call runs on one thread: waking the OpenMP team costs more.
constexpr int64_t kParallelMinWork = 1 << 16;

// Bytes of one packed SIGNS row of k weights (one bit each, rows padded to whole bytes).
inline int64_t bytes_per_row(int64_t k) { return (k + 7) / 8; }

}  // namespace cpu
}  // namespace deltacomp
