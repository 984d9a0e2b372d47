// The few spellings the CUDA kernels need that differ between nvcc and the CPU SIMT emulator of
// the tests (tests/simt/simt.h, which defines EVOMASK_SIMT_EMULATION and its own versions), so the
// same device code compiles for both.
#pragma once

#ifndef EVOMASK_SIMT_EMULATION
// The block's dynamic shared memory, 16-byte aligned, as an array of `type` named `name`.
#define EVOMASK_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
