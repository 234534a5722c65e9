// cpp_gather_survivors on the GPU: the graphed step's bookkeeping after an exit layer in one
// launch (the CPU's twin and the checks: cpu/gather_survivors_cpu.cpp). Block (x, i) moves the
// x-th share of output row i of every tensor from source row order[i]; blocks (0, i) write
// next_rows[i]; block (0, 0) also counts the live rows, into device memory and, where given,
// straight into pinned host memory (no copy launched after the graph). Plain CUDA C++, no torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace eek {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerRow = 256;

template <typename V>
__device__ __forceinline__ void copy_share(const unsigned char* src, unsigned char* dst, int64_t bytes) {
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  const int64_t words = bytes / static_cast<int64_t>(sizeof(V));
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < words;
       k += static_cast<int64_t>(gridDim.x) * kThreads) {
    d[k] = s[k];
  }
}

__global__ void __launch_bounds__(kThreads) gather_survivors_kernel(const SurvivorGather a) {
  for (int64_t i = blockIdx.y; i < a.n; i += gridDim.y) {
    const int64_t from = a.order[i];
    if (from < 0 || from >= a.n) __trap();  // like CUDA_KERNEL_ASSERT on an out-of-range index
    if (blockIdx.x == 0 && threadIdx.x == 0) a.next_rows[i] = a.exits[from] ? a.dead : a.rows[from];
    // Unrolled with a fixed bound: each copy's fields read at a constant offset of the parameters
    // (a parameter array indexed at run time would be copied to local memory).
#pragma unroll
    for (int t = 0; t < kMaxGatherCopies; ++t) {
      if (t < a.num_copies) {
        const GatherCopy& c = a.copies[t];
        const unsigned char* s = static_cast<const unsigned char*>(c.src) + from * c.src_stride;
        unsigned char* d = static_cast<unsigned char*>(c.dst) + i * c.dst_stride;
        if (c.width == 16) {
          copy_share<uint4>(s, d, c.bytes);
        } else if (c.width == 4) {
          copy_share<uint32_t>(s, d, c.bytes);
        } else {
          copy_share<unsigned char>(s, d, c.bytes);
        }
      }
    }
  }
  if (blockIdx.x != 0 || blockIdx.y != 0) return;
  // The live rows after the layer: those that stay and were not dead already. order is a
  // permutation, so counting over the source rows gives the count of next_rows not dead.
  __shared__ long long warp_sums[kThreads / 32];
  long long live = 0;
  for (int64_t j = threadIdx.x; j < a.n; j += kThreads) live += (!a.exits[j] && a.rows[j] != a.dead) ? 1 : 0;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) live += __shfl_xor_sync(0xffffffffu, live, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = live;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long total = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    *a.count = total;
    if (a.host_count != nullptr) *a.host_count = total;  // mapped pinned memory (unified addressing)
  }
}

bool aligned_to(uintptr_t value, uintptr_t alignment) { return value % alignment == 0; }

int width_of(const GatherCopy& c) {
  const uintptr_t s = reinterpret_cast<uintptr_t>(c.src), d = reinterpret_cast<uintptr_t>(c.dst);
  const uintptr_t a = static_cast<uintptr_t>(c.src_stride), b = static_cast<uintptr_t>(c.dst_stride);
  const uintptr_t bytes = static_cast<uintptr_t>(c.bytes);
  for (const int width : {16, 4}) {
    if (aligned_to(s, width) && aligned_to(d, width) && aligned_to(a, width) && aligned_to(b, width) &&
        aligned_to(bytes, width)) {
      return width;
    }
  }
  return 1;
}

}  // namespace

cudaError_t launch_gather_survivors(const SurvivorGather& args, cudaStream_t stream) {
  if (args.num_copies < 0 || args.num_copies > kMaxGatherCopies) return cudaErrorInvalidValue;
  SurvivorGather a = args;
  if (a.host_count != nullptr) {
    // Under unified addressing pinned host memory has the same address on the device, which the
    // kernel writes. Checked with the calls the head's launch already makes inside a CUDA graph's
    // capture (cudaHostGetDevicePointer is not one a capture is known to allow); refused where not.
    int device = 0, unified = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&unified, cudaDevAttrUnifiedAddressing, device);
    if (err != cudaSuccess) return err;
    if (unified == 0) return cudaErrorNotSupported;
  }
  int64_t widest = 0;  // words of the widest row share, in its copy's width
  for (int t = 0; t < a.num_copies; ++t) {
    a.copies[t].width = width_of(a.copies[t]);
    const int64_t words = a.copies[t].bytes / a.copies[t].width;
    widest = words > widest ? words : widest;
  }
  int64_t gx = (widest + kThreads - 1) / kThreads;
  gx = gx < 1 ? 1 : (gx > kMaxBlocksPerRow ? kMaxBlocksPerRow : gx);
  int64_t gy = a.n > 65535 ? 65535 : a.n;
  gy = gy < 1 ? 1 : gy;  // one block at least: the count is written for an empty bucket too
  gather_survivors_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace eek
