// Emulated cub::BlockReduce for tests/simt (found before the real cub, which needs nvcc). As in
// cub, the result is defined in thread 0 only; the other threads get their own input back, so
// device code that wrongly reads it elsewhere goes wrong here too.
#pragma once

namespace cub {

template <class T, int kThreads>
class BlockReduce {
 public:
  struct TempStorage {
    T values[kThreads];
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <class Op>
  T Reduce(T value, Op op) {
    storage_.values[threadIdx.x] = value;
    __syncthreads();
    T result = value;
    if (threadIdx.x == 0) {
      for (unsigned t = 1; t < blockDim.x; ++t) result = op(result, storage_.values[t]);
    }
    __syncthreads();
    return result;
  }
  T Sum(T value) {
    return Reduce(value, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
