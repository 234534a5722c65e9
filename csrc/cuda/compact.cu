// CUDA compaction gather: output row i (contiguous, row_bytes) = the first row_bytes of
// source row index[i]. That is hidden [n, S, H] -> [m, L, H] with L <= S (the trim to
// seq_len is the shorter row_bytes) and mask [n, S] -> [m, L]. Copies are 16 bytes wide
// when pointers, strides and sizes allow, else 4, else 1. Plain CUDA C++, no torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace eek {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename V>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const unsigned char* __restrict__ src, int64_t src_stride, int64_t n,
                       unsigned char* __restrict__ dst, int64_t row_bytes, const int64_t* __restrict__ index,
                       int64_t m) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(V));
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    const int64_t row = index[i];
    if (row < 0 || row >= n) __trap();  // like CUDA_KERNEL_ASSERT on an out-of-range index
    const V* s = reinterpret_cast<const V*>(src + row * src_stride);
    V* d = reinterpret_cast<V*>(dst + i * row_bytes);
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < words;
         k += static_cast<int64_t>(gridDim.x) * kThreads) {
      d[k] = s[k];
    }
  }
}

template <typename V>
cudaError_t launch_as(const void* src, int64_t src_stride, int64_t n, void* dst, int64_t row_bytes,
                      const int64_t* index, int64_t m, cudaStream_t stream) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(V));
  int64_t gx = (words + kThreads - 1) / kThreads;
  gx = gx < 1 ? 1 : (gx > 4096 ? 4096 : gx);
  const int64_t gy = m > 65535 ? 65535 : m;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  gather_rows_kernel<V><<<grid, kThreads, 0, stream>>>(static_cast<const unsigned char*>(src), src_stride, n,
                                                       static_cast<unsigned char*>(dst), row_bytes, index, m);
  return cudaGetLastError();
}

bool aligned_to(uintptr_t value, uintptr_t alignment) { return value % alignment == 0; }

}  // namespace

cudaError_t launch_compact(const void* src, int64_t src_row_stride, int64_t n, void* dst, int64_t row_bytes,
                           const int64_t* index, int64_t m, cudaStream_t stream) {
  if (m == 0 || row_bytes == 0) return cudaSuccess;
  const uintptr_t s = reinterpret_cast<uintptr_t>(src), d = reinterpret_cast<uintptr_t>(dst);
  const uintptr_t stride = static_cast<uintptr_t>(src_row_stride), bytes = static_cast<uintptr_t>(row_bytes);
  if (aligned_to(s, 16) && aligned_to(d, 16) && aligned_to(stride, 16) && aligned_to(bytes, 16)) {
    return launch_as<uint4>(src, src_row_stride, n, dst, row_bytes, index, m, stream);
  }
  if (aligned_to(s, 4) && aligned_to(d, 4) && aligned_to(stride, 4) && aligned_to(bytes, 4)) {
    return launch_as<uint32_t>(src, src_row_stride, n, dst, row_bytes, index, m, stream);
  }
  return launch_as<unsigned char>(src, src_row_stride, n, dst, row_bytes, index, m, stream);
}

}  // namespace cuda
}  // namespace eek
