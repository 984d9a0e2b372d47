// Both CUDA tree kernels' device code, compiled for the host against simt.h and exposed with a C
// ABI for tests/test_simt_emulated.py (ctypes). Buffers are contiguous host arrays laid out as the
// op's tensors; each entry point plans and launches as the .cu launcher does, with the shared
// memory limit as an argument so that the global-memory fallbacks can be forced.
#include "simt.h"

#include "cuda/linkage_tree_kernel.cuh"
#include "cuda/tree_warp_kernel.cuh"

using namespace evomask::cuda;

extern "C" {

// The warp-per-image kernel; returns 1 (launching nothing) where its triangle exceeds max_shared.
int simt_tree_warp(const float* sim, int64_t batch, int64_t n, int64_t max_shared, int64_t* children, float* heights,
                   int64_t* levels, int64_t* sizes) {
  const size_t bytes = tree_warp_shared_bytes(n);
  if (bytes > static_cast<size_t>(max_shared)) return 1;
  simt::launch(tree_warp_kernel, static_cast<unsigned>(batch), kLoadThreads, bytes, sim, static_cast<int>(n),
               children, heights, levels, sizes);
  return 0;
}

// The block kernel's dynamic shared bytes with everything in shared memory (one byte less moves
// the matrix to global memory).
int64_t simt_tree_block_shared_bytes(int64_t n) {
  Workspace ws;
  return static_cast<int64_t>(plan_linkage_tree(n, SIZE_MAX, &ws));
}

// The block-per-image kernel, with the launcher's plan (plan_linkage_tree): matrix and state in
// shared memory when they fit in max_shared, otherwise in (here: host) global buffers.
int simt_tree_block(const float* sim, int64_t batch, int64_t n, int64_t max_shared, int64_t* children, float* heights,
                    int64_t* levels, int64_t* sizes) {
  Workspace ws;
  const size_t dynamic = plan_linkage_tree(n, static_cast<size_t>(max_shared), &ws);
  std::vector<int64_t> global((global_workspace_bytes(ws, batch, n) + 7) / 8);  // 8-byte aligned
  bind_global_workspace(&ws, batch, n, reinterpret_cast<unsigned char*>(global.data()));
  simt::launch(linkage_tree_kernel, static_cast<unsigned>(batch), kThreads, dynamic, sim, n, ws, children, heights,
               levels, sizes);
  return (ws.matrix_in_shared ? 0 : 2) + (ws.state_in_shared ? 0 : 4);
}

}  // extern "C"
