// What every CPU kernel file shares: the GCC/x86-64 switch for target attributes, the run-time choice
// of code path (Isa, active_isa), the threading threshold, and the SIGNS row size. Raw pointers only,
// no torch (the files build for aarch64 too: tests/arm/).
#pragma once
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DELTACOMP_X86_GCC 1  // GCC on x86-64: target attributes and __builtin_cpu_supports
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#define DELTACOMP_NEON 1  // NEON is part of the aarch64 baseline: no run-time check needed
#include <arm_neon.h>
#endif

namespace deltacomp {
namespace cpu {

// Code paths, in the order a CPU supports them. kAvx512 needs F + BW + VL, kAvx2 needs AVX2 + FMA.
// kPortable is the plain C++ loops (which GCC may still compile as AVX2 clones on x86).
enum class Isa : int { kPortable = 0, kNeon = 1, kAvx2 = 2, kAvx512 = 3 };

// The best path this build has and this CPU supports (checked once).
Isa best_isa();
// The path the kernels take now: best_isa(), or the one DELTACOMP_ISA (avx512 | avx2 | neon | portable)
// asks for when the CPU supports it (an unsupported or unknown value leaves best_isa()). Read on every
// call so tests and benchmarks can switch paths in one process. The older DELTACOMP_CPU_ISA is still
// honoured when DELTACOMP_ISA is unset: generic = avx2, baseline = portable.
Isa active_isa();
// "avx512", "avx2", "neon", "portable"
const char* isa_name(Isa isa);

// OpenMP's thread count (torch.set_num_threads sets it); 1 in a build without OpenMP (setup.py: macOS's
// Apple clang has no -fopenmp, or DELTACOMP_OPENMP=0), where every `omp` pragma is ignored and the kernels
// run on the calling thread.
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Below this many multiply-adds a call runs on one thread: waking the OpenMP team costs more.
constexpr int64_t kParallelMinWork = 1 << 16;

// Whether a call of `work` multiply-adds splits over OpenMP threads: enough work, and more than one thread
// (torch.set_num_threads sets OpenMP's). Even with `if (false)`, entering an `omp parallel` region costs
// libgomp a team start and a futex call (a decode step paid 9 of them per svd-mixed layer), so the helpers
// below enter one only when this is true, and otherwise run the same code on this thread.
inline bool parallel_worth(int64_t work) { return work >= kParallelMinWork && max_threads() > 1; }

// body(i) for i in [0, count): over the threads in dynamic chunks of `chunk` where parallel_worth(work).
template <typename F>
inline void for_each_index(int64_t count, int64_t chunk, int64_t work, const F& body) {
  if (parallel_worth(work)) {
#pragma omp parallel for schedule(dynamic, chunk)
    for (int64_t i = 0; i < count; ++i) body(i);
  } else {
    for (int64_t i = 0; i < count; ++i) body(i);
  }
}

// body() in a parallel region where parallel_worth(work) (its orphaned `omp for` loops split over the
// team), else once on this thread (the same `omp for` loops then run here whole).
template <typename F>
inline void region(int64_t work, const F& body) {
  if (parallel_worth(work)) {
#pragma omp parallel
    body();
  } else {
    body();
  }
}

// Scratch memory of one call site that a thread keeps between calls: `thread_local std::vector<T> buf;` at
// the site, then `Kept<T> s(buf, n)` sizes it (its contents are unspecified: the site writes before it
// reads) and, when s ends, gives back a buffer over kKeptBytes (a many-row call's; a decode step's stay).
// A decode step calls each kernel once per layer and token: fresh vectors cost a malloc and a free each
// time, and in glibc a malloc of 1 KB or more after small frees also consolidates the free lists. A site
// must not be re-entered on its thread while its Kept lives (no kernel here recurses).
constexpr size_t kKeptBytes = size_t{1} << 20;

template <typename T>
class Kept {
 public:
  Kept(std::vector<T>& buf, size_t n) : buf_(buf) { buf_.resize(n); }
  ~Kept() {
    if (buf_.capacity() * sizeof(T) > kKeptBytes) std::vector<T>().swap(buf_);
  }
  Kept(const Kept&) = delete;
  Kept& operator=(const Kept&) = delete;
  std::vector<T>& vec() { return buf_; }
  T* data() { return buf_.data(); }
  T& operator[](size_t i) { return buf_[i]; }

 private:
  std::vector<T>& buf_;
};

// A weight widened to fp32: fp32 as is, a bf16 bit pattern (uint16_t) exactly.
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Bytes of one packed SIGNS row of k weights (one bit each, rows padded to whole bytes).
inline int64_t bytes_per_row(int64_t k) { return (k + 7) / 8; }

}  // namespace cpu
}  // namespace deltacomp
