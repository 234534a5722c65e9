// The CUDA kernel that pools each row of a layer's output for an exit head (PoolArgs in
// launchers.h). Plain CUDA C++ over raw pointers (no torch headers).
//
// pool_norm_kernel: one block per row. Thread t owns features t, t + kPoolThreads, ... and keeps
// their float32 sums in shared memory; the block walks the row's tokens in order, reading each
// valid token's vector once, coalesced over the features (padding is never read; a row without
// a valid token gives zeros). The mean is rounded to the input dtype, as the reference's
// masked mean returns it; the LayerNorm (two block reductions: the mean, then the biased
// variance of the centred values) runs in float32 and its output is rounded to the input dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.h"
#include "launchers.h"
#include "shared_memory.h"

namespace eek {
namespace cuda {
namespace {

constexpr int kPoolThreads = 256;
constexpr int kPoolWarps = kPoolThreads / 32;

// The block's sum of v (every thread gets it).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kPoolWarps; ++w) total += scratch[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kPoolThreads) pool_norm_kernel(const PoolArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* sums = reinterpret_cast<float*>(smem);  // [H]: this row's pooled values
  __shared__ float scratch[kPoolWarps];
  const int64_t row = blockIdx.x;
  const int64_t H = a.H;
  const T* x = static_cast<const T*>(a.hidden) + row * a.stride_n;
  for (int64_t h = threadIdx.x; h < H; h += kPoolThreads) sums[h] = 0.0f;
  if (a.mean) {
    float count = 0.0f;
    const int64_t* valid = a.mask != nullptr ? a.mask + row * a.mask_stride : nullptr;
    for (int64_t s = 0; s < a.S; ++s) {
      if (valid != nullptr && valid[s] == 0) continue;
      count += 1.0f;
      const T* token = x + s * a.stride_s;
      for (int64_t h = threadIdx.x; h < H; h += kPoolThreads) sums[h] += Cvt<T>::to_f(token[h]);
    }
    const float divisor = count > 0.0f ? count : 1.0f;
    for (int64_t h = threadIdx.x; h < H; h += kPoolThreads) {
      sums[h] = Cvt<T>::to_f(Cvt<T>::from_f(sums[h] / divisor));
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += kPoolThreads) sums[h] = Cvt<T>::to_f(x[h]);
  }
  T* out = static_cast<T*>(a.out) + row * H;
  if (a.norm_weight == nullptr) {
    for (int64_t h = threadIdx.x; h < H; h += kPoolThreads) out[h] = Cvt<T>::from_f(sums[h]);
    return;
  }
  float part = 0.0f;
  for (int64_t h = threadIdx.x; h < H; h += kPoolThreads) part += sums[h];
  const float mean = block_sum(part, scratch) / static_cast<float>(H);
  part = 0.0f;
  for (int64_t h = threadIdx.x; h < H; h += kPoolThreads) {
    const float d = sums[h] - mean;
    part += d * d;
  }
  const float rstd = 1.0f / sqrtf(block_sum(part, scratch) / static_cast<float>(H) + a.eps);
  const T* weight = static_cast<const T*>(a.norm_weight);
  const T* bias = static_cast<const T*>(a.norm_bias);
  for (int64_t h = threadIdx.x; h < H; h += kPoolThreads) {
    const float y = (sums[h] - mean) * rstd * Cvt<T>::to_f(weight[h]) + Cvt<T>::to_f(bias[h]);
    out[h] = Cvt<T>::from_f(y);
  }
}

template <typename T>
cudaError_t launch_typed_pool(const PoolArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const int64_t bytes = a.H * static_cast<int64_t>(sizeof(float));
  const cudaError_t err = allow_dynamic_shared(pool_norm_kernel<T>, bytes);
  if (err != cudaSuccess) return err;
  pool_norm_kernel<T><<<static_cast<unsigned>(a.n), kPoolThreads, static_cast<size_t>(bytes), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pool_norm(DType dtype, const PoolArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case kF16:
      return launch_typed_pool<__half>(args, stream);
    case kBF16:
      return launch_typed_pool<__nv_bfloat16>(args, stream);
    case kF32:
      return launch_typed_pool<float>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace eek
