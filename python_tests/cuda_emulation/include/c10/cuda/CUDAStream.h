// Emulation stand-in: one default "stream", the kernels run synchronously on the CPU.
#pragma once
#include "emu_cuda.h"
namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
