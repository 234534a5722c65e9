// CUDA kernels of the exit step. Plain CUDA C++ over raw pointers (no torch headers).
//
// head_exit_kernel: one block of kThreads threads per kRows rows. The rows' [CLS]
// vectors are staged in shared memory; each warp takes output features j and computes
// the kRows dot products W[j, :] . x[r, :] with fp32 accumulation (16-byte loads of the
// weight row when aligned, warp shuffle reduction), so each weight row is read once
// per kRows rows. pooled = tanh(. + b_p) is rounded to the input dtype (what the
// reference feeds its classifier), then the logits the same way, then one thread per
// row applies the policy's rule (common/exit_rule.h), writes exits, returned logits,
// the new state and, optionally, the write-back to the batch outputs.
//
// rule_kernel: the rule alone on given logits, one thread per row.
// survivors_kernel: the stable list of the rows that stay and their count (one block).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace eek {
namespace cuda {
namespace {

constexpr int kRows = 4;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRuleThreads = 128;
constexpr int kScanThreads = 1024;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  // The 4 floats of a 16-byte word.
  static constexpr int kVec = 4;
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float bits(unsigned int word, int hi) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(hi ? word >> 16 : word & 0xffffu)));
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) {
    out[0] = bits(v.x, 0);
    out[1] = bits(v.x, 1);
    out[2] = bits(v.y, 0);
    out[3] = bits(v.y, 1);
    out[4] = bits(v.z, 0);
    out[5] = bits(v.z, 1);
    out[6] = bits(v.w, 0);
    out[7] = bits(v.w, 1);
  }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float bits(unsigned int word, int hi) {
    return __uint_as_float(hi ? (word & 0xffff0000u) : (word << 16));
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) {
    out[0] = bits(v.x, 0);
    out[1] = bits(v.x, 1);
    out[2] = bits(v.y, 0);
    out[3] = bits(v.y, 1);
    out[4] = bits(v.z, 0);
    out[5] = bits(v.z, 1);
    out[6] = bits(v.w, 0);
    out[7] = bits(v.w, 1);
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// acc[r] = sum_k w[k] * xs[r * H + k] for the kRows rows staged in shared memory, reduced
// over the warp (every lane gets the sums).
template <typename T>
__device__ __forceinline__ void warp_dot_rows(const T* __restrict__ w, const T* xs, int64_t H, bool vec,
                                              float acc[kRows]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  if (vec) {
    constexpr int V = Cvt<T>::kVec;
    for (int64_t k = static_cast<int64_t>(lane) * V; k < H; k += 32 * V) {
      float wf[V];
      Cvt<T>::unpack(__ldg(reinterpret_cast<const uint4*>(w + k)), wf);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float xf[V];
        Cvt<T>::unpack(*reinterpret_cast<const uint4*>(xs + r * H + k), xf);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[r] = fmaf(wf[e], xf[e], acc[r]);
      }
    }
  } else {
    for (int64_t k = lane; k < H; k += 32) {
      const float wk = Cvt<T>::to_f(w[k]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] = fmaf(wk, Cvt<T>::to_f(xs[r * H + k]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
}

__device__ __forceinline__ void store_out(const WriteBack& wb, int64_t index, float value) {
  switch (wb.out_dtype) {
    case kOutF16:
      static_cast<__half*>(wb.logits)[index] = __float2half_rn(value);
      break;
    case kOutBF16:
      static_cast<__nv_bfloat16*>(wb.logits)[index] = __float2bfloat16_rn(value);
      break;
    default:
      static_cast<float*>(wb.logits)[index] = value;
  }
}

struct KernelArgs {
  HeadPtrs head;
  RulePtrs rule;
  RuleParams params;
  StateArgs state;
  WriteBack write_back;
  int64_t n;
  int64_t C;
  bool vec;
  bool has_rule;
};

template <typename Z>
__device__ __forceinline__ void finish_row(const KernelArgs& a, int64_t row, const Z& z) {
  const float halting = a.rule.halting != nullptr ? a.rule.halting[row] : __int_as_float(0x7fc00000);
  float* returned = a.rule.returned + row * a.C;
  const bool exits = apply_rule(a.params, a.state, row, z, halting, returned);
  a.rule.exits[row] = exits;
  const WriteBack& wb = a.write_back;
  const int64_t dst = (exits && wb.logits != nullptr) ? wb.rows[row] : -1;
  if (dst >= 0 && dst < wb.batch) {
    for (int64_t c = 0; c < a.C; ++c) store_out(wb, dst * wb.logits_stride + c, returned[c]);
    wb.exit_layer[dst] = a.params.layer;
    wb.layers_run[dst] = wb.runs[row];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) head_exit_kernel(const KernelArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t H = a.head.H;
  const int64_t C = a.C;
  const int64_t stage = ((kRows * H * static_cast<int64_t>(sizeof(T)) + 15) / 16) * 16;
  T* xs = reinterpret_cast<T*>(smem);
  T* ps = reinterpret_cast<T*>(smem + stage);
  float* zs = reinterpret_cast<float*>(smem + 2 * stage);

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int nb = static_cast<int>(min(static_cast<int64_t>(kRows), a.n - r0));
  const T* x = static_cast<const T*>(a.head.x);
  for (int64_t i = threadIdx.x; i < kRows * H; i += kThreads) {
    const int r = static_cast<int>(i / H);
    const int64_t k = i - r * H;
    xs[i] = r < nb ? x[(r0 + r) * a.head.x_stride + k] : Cvt<T>::from_f(0.0f);
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const T* wp = static_cast<const T*>(a.head.wp);
  const T* bp = static_cast<const T*>(a.head.bp);
  T* pooled = static_cast<T*>(a.head.pooled);
  float acc[kRows];
  for (int64_t j = warp; j < H; j += kWarps) {
    warp_dot_rows(wp + j * H, xs, H, a.vec, acc);
    if (lane < kRows) {
      // Lane r keeps row r's value (a register array indexed by a constant per unrolled step).
      float mine = acc[0];
#pragma unroll
      for (int r = 1; r < kRows; ++r) mine = lane == r ? acc[r] : mine;
      const T v = Cvt<T>::from_f(tanhf(mine + Cvt<T>::to_f(bp[j])));
      ps[lane * H + j] = v;
      if (lane < nb) pooled[(r0 + lane) * H + j] = v;
    }
  }
  __syncthreads();

  const T* w = static_cast<const T*>(a.head.w);
  const T* b = static_cast<const T*>(a.head.b);
  T* logits = static_cast<T*>(a.head.logits);
  for (int64_t c = warp; c < C; c += kWarps) {
    warp_dot_rows(w + c * H, ps, H, a.vec, acc);
    if (lane < nb) {
      float mine = acc[0];
#pragma unroll
      for (int r = 1; r < kRows; ++r) mine = lane == r ? acc[r] : mine;
      const T v = Cvt<T>::from_f(mine + Cvt<T>::to_f(b[c]));
      logits[(r0 + lane) * C + c] = v;
      zs[lane * C + c] = Cvt<T>::to_f(v);
    }
  }
  if (!a.has_rule) return;
  __syncthreads();
  if (threadIdx.x < nb) {
    const float* z = zs + threadIdx.x * C;
    finish_row(a, r0 + threadIdx.x, z);
  }
}

// A row of logits in T read as float32.
template <typename T>
struct RowView {
  const T* p;
  __device__ __forceinline__ float operator[](int c) const { return Cvt<T>::to_f(p[c]); }
};

template <typename T>
__global__ void __launch_bounds__(kRuleThreads) rule_kernel(const KernelArgs a, const T* logits, int64_t stride) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRuleThreads + threadIdx.x;
  if (row >= a.n) return;
  const RowView<T> z{logits + row * stride};
  finish_row(a, row, z);
}

// Stable survivor list: survivors[0..count) = rows with exits == false, in order; the rest -1.
__global__ void __launch_bounds__(kScanThreads) survivors_kernel(const bool* exits, int64_t n, int64_t* survivors,
                                                                 int64_t* count) {
  __shared__ int warp_offsets[kScanThreads / 32];
  __shared__ int chunk_total;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  int64_t base = 0;
  for (int64_t start = 0; start < n; start += kScanThreads) {
    const int64_t i = start + threadIdx.x;
    const bool keep = i < n && !exits[i];
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    const int before = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_offsets[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int mine = lane < kScanThreads / 32 ? warp_offsets[lane] : 0;
      int inclusive = mine;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      if (lane < kScanThreads / 32) warp_offsets[lane] = inclusive - mine;
      if (lane == 31) chunk_total = inclusive;
    }
    __syncthreads();
    if (keep) survivors[base + warp_offsets[warp] + before] = i;
    base += chunk_total;
    __syncthreads();
  }
  for (int64_t i = base + threadIdx.x; i < n; i += kScanThreads) survivors[i] = -1;
  if (threadIdx.x == 0) *count = base;
}

template <typename T>
cudaError_t launch_typed(int64_t n, int64_t C, const HeadPtrs* head, const void* logits, int64_t logits_stride,
                         const RuleParams& params, const StateArgs& state, const WriteBack& write_back,
                         const RulePtrs* rule, cudaStream_t stream) {
  KernelArgs a{};
  if (head != nullptr) a.head = *head;
  if (rule != nullptr) a.rule = *rule;
  a.params = params;
  a.state = state;
  a.write_back = write_back;
  a.n = n;
  a.C = C;
  a.has_rule = rule != nullptr;
  if (n > 0) {
    if (head != nullptr) {
      const int64_t H = head->H;
      const int64_t stage = ((kRows * H * static_cast<int64_t>(sizeof(T)) + 15) / 16) * 16;
      const int64_t bytes = 2 * stage + kRows * C * static_cast<int64_t>(sizeof(float));
      constexpr int V = Cvt<T>::kVec;
      auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
      a.vec = H % V == 0 && aligned(head->wp) && aligned(head->w);
      int device = 0, optin = 0;
      cudaError_t err = cudaGetDevice(&device);
      if (err != cudaSuccess) return err;
      err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      if (err != cudaSuccess) return err;
      if (bytes > optin) return cudaErrorInvalidValue;
      if (bytes > 48 * 1024) {
        err = cudaFuncSetAttribute(head_exit_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(bytes));
        if (err != cudaSuccess) return err;
      }
      const int64_t blocks = (n + kRows - 1) / kRows;
      head_exit_kernel<T><<<static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(bytes), stream>>>(a);
    } else {
      const int64_t blocks = (n + kRuleThreads - 1) / kRuleThreads;
      rule_kernel<T><<<static_cast<unsigned>(blocks), kRuleThreads, 0, stream>>>(a, static_cast<const T*>(logits),
                                                                                 logits_stride);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (rule != nullptr) {
    if (params.flags & kSurvivors) {
      survivors_kernel<<<1, kScanThreads, 0, stream>>>(rule->exits, n, rule->survivors, rule->count);
      return cudaGetLastError();
    }
    return cudaMemsetAsync(rule->count, 0xff, sizeof(int64_t), stream);  // -1: not requested
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_head_exit(DType dtype, int64_t n, int64_t C, const HeadPtrs* head, const void* logits,
                             int64_t logits_stride, const RuleParams& params, const StateArgs& state,
                             const WriteBack& write_back, const RulePtrs* rule, cudaStream_t stream) {
  switch (dtype) {
    case kF16:
      return launch_typed<__half>(n, C, head, logits, logits_stride, params, state, write_back, rule, stream);
    case kBF16:
      return launch_typed<__nv_bfloat16>(n, C, head, logits, logits_stride, params, state, write_back, rule,
                                         stream);
    case kF32:
      return launch_typed<float>(n, C, head, logits, logits_stride, params, state, write_back, rule, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace eek
