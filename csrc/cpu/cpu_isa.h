// Run-time choice between the two builds of a CPU kernel's instruction-set-specific part
// (cpu/isa/): baseline (SSE2 on any x86-64, or the target's default elsewhere) and AVX2 + FMA.
// For the dispatchers only (cpu/*.cpp); the cpu/isa sources do not include it.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(CPU_CAPABILITY)
#error "cpu/cpu_isa.h is for the dispatchers, not for the cpu/isa sources"
#endif

namespace evomask::cpu {

// Whether to run the AVX2 build: it was built (EVOMASK_CPU_AVX2, defined by CMake on x86-64 with
// GCC or Clang: cmake/EvomaskCpuIsa.cmake), this CPU runs AVX2 and FMA code (it was compiled with
// -mavx2 -mfma), and EVOMASK_CPU_ISA=baseline does not say no, as it does to test the baseline
// build on an AVX2 machine. __builtin_cpu_supports also checks that the OS saves the AVX state.
inline bool use_avx2() {
#if defined(EVOMASK_CPU_AVX2) && defined(__x86_64__) && defined(__GNUC__)  // GCC, and Clang (it defines __GNUC__)
  const char* isa = std::getenv("EVOMASK_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace evomask::cpu
