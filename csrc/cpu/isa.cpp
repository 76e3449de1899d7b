// The run-time choice of CPU code path (see common.h). Raw C++, no torch: tests/arm/ builds it for
// aarch64 with the kernels.
#include <cstdlib>
#include <initializer_list>
#include <cstring>

#include "common.h"

namespace deltacomp {
namespace cpu {
namespace {

bool supported(Isa isa) {
  switch (isa) {
    case Isa::kPortable: return true;
#if DELTACOMP_X86_GCC
    case Isa::kAvx2: {
      static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
      return has;
    }
    case Isa::kAvx512: {
      static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl");
      return has;
    }
#endif
#if DELTACOMP_NEON
    case Isa::kNeon: return true;
#endif
    default: return false;
  }
}

// The value of DELTACOMP_ISA (or the legacy DELTACOMP_CPU_ISA) as a path; false when unset or unknown.
bool requested(Isa* out) {
  const char* v = std::getenv("DELTACOMP_ISA");
  if (v && *v) {
    static const struct { const char* name; Isa isa; } kNames[] = {
        {"avx512", Isa::kAvx512}, {"avx2", Isa::kAvx2}, {"neon", Isa::kNeon}, {"portable", Isa::kPortable}};
    for (const auto& e : kNames)
      if (std::strcmp(v, e.name) == 0) {
        *out = e.isa;
        return true;
      }
    return false;
  }
  v = std::getenv("DELTACOMP_CPU_ISA");  // before DELTACOMP_ISA existed: generic = the AVX2-machine path
  if (v && std::strcmp(v, "generic") == 0) {
    *out = Isa::kAvx2;
    return true;
  }
  if (v && std::strcmp(v, "baseline") == 0) {
    *out = Isa::kPortable;
    return true;
  }
  return false;
}

}  // namespace

Isa best_isa() {
  static const Isa best = [] {
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kNeon})
      if (supported(isa)) return isa;
    return Isa::kPortable;
  }();
  return best;
}

Isa active_isa() {
  Isa want;
  return requested(&want) && supported(want) ? want : best_isa();
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNeon: return "neon";
    default: return "portable";
  }
}

}  // namespace cpu
}  // namespace deltacomp
