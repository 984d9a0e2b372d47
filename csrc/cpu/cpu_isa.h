// Run-time choice between a CPU kernel's baseline build (SSE2, any x86-64) and its AVX2 build.
#pragma once

#include <cstdlib>
#include <cstring>

namespace evomask::cpu {

// Whether this CPU runs AVX2 code (and FMA, when `with_fma`); EVOMASK_CPU_ISA=baseline says no,
// so the baseline builds can be tested on an AVX2 machine.
inline bool use_avx2(bool with_fma) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  const char* isa = std::getenv("EVOMASK_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && (!with_fma || __builtin_cpu_supports("fma"));
#else
  (void)with_fma;
  return false;
#endif
}

}  // namespace evomask::cpu
