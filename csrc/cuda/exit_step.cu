// CUDA kernels of the exit step. Plain CUDA C++ over raw pointers (no torch headers).
//
// head_tile_kernel: a head's first product, tiled over rows and output features.
// Block (bx, by) computes pooled[r, j] = act(W_p[j, :] . x[r, :] + b_p[j]) (W_p [M, H]; act: the
// model pooler's tanh, or an MLP head's exact GELU on the product rounded to the input dtype, as
// F.linear returns it) for the kRows rows r0 = bx * kRows.. and the kHeadTile features
// j0 = by * kHeadTile.., so a batch of n rows runs ceil(n / kRows) x ceil(M / kHeadTile) blocks and each block reads its kHeadTile rows of W_p
// once for kRows rows. The rows' [CLS] vectors are staged in shared memory. Each warp takes
// kHeadTile / kWarps features, kFeat at a time: a lane loads kUnroll 16-byte words of each of
// the kFeat weight rows before its FMAs (kFeat x kUnroll loads in flight per lane; the scalar
// path when rows are not 16-byte aligned), accumulating kRows x kFeat = 32 fp32 sums, and one
// transposing butterfly over the warp (31 shuffles) leaves lane l with the sum of
// (row l / kFeat, feature l % kFeat). pooled is rounded to the input dtype (what the reference
// feeds its classifier), written out, and kept in shared memory for the block's partial
// logits partials[by, r, c] = sum_{j in the tile} pooled[r, j] * W[c, j] (fp32; no atomics,
// so the result does not depend on scheduling).
//
// rule_kernel (one thread per row) and rule_scan_kernel (one block walking all rows, when
// the stable survivor list is asked for): a row's logits, either given or the sum of its
// partials over the tiles plus b rounded to the input dtype (written to the logits output),
// then the policy's rule (common/exit_rule.h): exits, returned logits, the new state and,
// optionally, the write-back to the batch outputs. rule_scan_kernel also lists the rows
// that stay, in order, and counts them.
//
// Launches per step: head + rule (fused step), rule alone (given logits).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.h"
#include "launchers.h"
#include "shared_memory.h"

namespace eek {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // head blocks
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 8;     // rows per head block
constexpr int kFeat = 4;     // features a warp computes at once
constexpr int kUnroll = 2;   // 16-byte words of each weight row a lane loads before its FMAs
constexpr int kTile = static_cast<int>(kHeadTile);  // features per head block
constexpr int kFeatPerWarp = kTile / kWarps;
constexpr int kRuleThreads = 128;
constexpr int kScanThreads = 1024;
static_assert(kRows * kFeat == 32, "the warp reduction leaves one (row, feature) sum per lane");
static_assert(kFeatPerWarp % kFeat == 0, "a warp's features come in groups of kFeat");

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One step of warp_transpose_sum: a lane keeps the half of its values whose index has the
// lane's bit kHalf, and adds the partner's (lane ^ kHalf) copy of that half.
template <int kHalf>
__device__ __forceinline__ void transpose_step(float (&v)[32], int lane) {
  const bool upper = (lane & kHalf) != 0;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float send = upper ? v[i] : v[i + kHalf];
    const float keep = upper ? v[i + kHalf] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
  }
}

// v[0..32) summed over the warp, transposed: lane l returns the warp's sum of v[l]. After the
// steps for bits 16 .. b, value i < b of lane l stands for index i + (l & ~(b - 1) & 31).
__device__ __forceinline__ float warp_transpose_sum(float (&v)[32]) {
  const int lane = threadIdx.x & 31;
  transpose_step<16>(v, lane);
  transpose_step<8>(v, lane);
  transpose_step<4>(v, lane);
  transpose_step<2>(v, lane);
  transpose_step<1>(v, lane);
  return v[0];
}

// acc[r * kFeat + f] = this lane's share of sum_k w[(jg + f) * H + k] * xs[r * H + k], for the
// kRows rows staged in shared memory (features jg + f >= M count as 0).
template <typename T>
__device__ __forceinline__ void lane_dot_group(const T* __restrict__ w, const T* xs, int64_t H, int64_t M, int64_t jg,
                                               bool vec, float (&acc)[32]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
  const T* wrow[kFeat];
  bool ok[kFeat];
#pragma unroll
  for (int f = 0; f < kFeat; ++f) {
    ok[f] = jg + f < M;
    wrow[f] = w + (ok[f] ? jg + f : 0) * H;
  }
  if (vec) {
    constexpr int V = Cvt<T>::kVec;
    constexpr int64_t kStep = 32 * V;  // elements the warp covers per 16-byte word of each lane
    for (int64_t k0 = static_cast<int64_t>(lane) * V; k0 < H; k0 += kStep * kUnroll) {
      uint4 wv[kUnroll][kFeat];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + u * kStep;
#pragma unroll
        for (int f = 0; f < kFeat; ++f) {
          wv[u][f] = (ok[f] && k < H) ? __ldg(reinterpret_cast<const uint4*>(wrow[f] + k)) : make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + u * kStep;
        if (k < H) {
          float wf[kFeat][V];
#pragma unroll
          for (int f = 0; f < kFeat; ++f) Cvt<T>::unpack(wv[u][f], wf[f]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            float xf[V];
            Cvt<T>::unpack(*reinterpret_cast<const uint4*>(xs + r * H + k), xf);
#pragma unroll
            for (int f = 0; f < kFeat; ++f) {
#pragma unroll
              for (int e = 0; e < V; ++e) acc[r * kFeat + f] = fmaf(wf[f][e], xf[e], acc[r * kFeat + f]);
            }
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < H; k += 32) {
      float wk[kFeat];
#pragma unroll
      for (int f = 0; f < kFeat; ++f) wk[f] = ok[f] ? Cvt<T>::to_f(wrow[f][k]) : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float xk = Cvt<T>::to_f(xs[r * H + k]);
#pragma unroll
        for (int f = 0; f < kFeat; ++f) acc[r * kFeat + f] = fmaf(wk[f], xk, acc[r * kFeat + f]);
      }
    }
  }
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

// The rule on one row (z: its C logits as float32); returns whether the row exits.
template <typename Z>
__device__ __forceinline__ bool finish_row(const KernelArgs& a, int64_t row, const Z& z) {
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
  return exits;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) head_tile_kernel(const KernelArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const HeadPtrs& h = a.head;
  const int64_t H = h.H;
  const int64_t M = h.M;
  const int64_t n = a.n;
  const int64_t C = a.C;
  const int64_t stage = ((kRows * H * static_cast<int64_t>(sizeof(T)) + 15) / 16) * 16;
  T* xs = reinterpret_cast<T*>(smem);          // [kRows, H]: the rows' [CLS] vectors
  T* ps = reinterpret_cast<T*>(smem + stage);  // [kRows, kTile]: their pooled values in this tile

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int nb = static_cast<int>(min(static_cast<int64_t>(kRows), n - r0));
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const T* x = static_cast<const T*>(h.x);
  for (int64_t i = threadIdx.x; i < kRows * H; i += kThreads) {
    const int r = static_cast<int>(i / H);
    const int64_t k = i - r * H;
    xs[i] = r < nb ? x[(r0 + r) * h.x_stride + k] : Cvt<T>::from_f(0.0f);
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int my_row = lane / kFeat;
  const int my_feat = lane % kFeat;
  const T* wp = static_cast<const T*>(h.wp);
  const T* bp = static_cast<const T*>(h.bp);
  T* pooled = static_cast<T*>(h.pooled);
#pragma unroll 1
  for (int g = 0; g < kFeatPerWarp; g += kFeat) {
    const int jt0 = warp * kFeatPerWarp + g;  // first feature of the group, within the tile
    float acc[32];
    lane_dot_group(wp, xs, H, M, j0 + jt0, a.vec, acc);
    const float sum = warp_transpose_sum(acc);  // row my_row, feature jt0 + my_feat
    const int64_t j = j0 + jt0 + my_feat;
    T v = Cvt<T>::from_f(0.0f);
    if (j < M) {
      if (h.gelu) {
        const float pre = Cvt<T>::to_f(Cvt<T>::from_f(sum + Cvt<T>::to_f(bp[j])));
        v = Cvt<T>::from_f(0.5f * pre * (1.0f + erff(pre * 0.70710678118654752f)));
      } else {
        v = Cvt<T>::from_f(tanhf(sum + Cvt<T>::to_f(bp[j])));
      }
      if (my_row < nb && pooled != nullptr) pooled[(r0 + my_row) * M + j] = v;
    }
    ps[my_row * kTile + jt0 + my_feat] = v;
  }
  __syncthreads();

  // This tile's share of every row's logits: one warp per (row, label), lanes over the tile.
  const T* w = static_cast<const T*>(h.w);
  const int tile_len = static_cast<int>(min(static_cast<int64_t>(kTile), M - j0));
  float* part = h.partials + (static_cast<int64_t>(blockIdx.y) * n + r0) * C;
  for (int64_t p = warp; p < nb * C; p += kWarps) {
    const int r = static_cast<int>(p / C);
    const int64_t c = p - r * C;
    float s = 0.0f;
    for (int jt = lane; jt < tile_len; jt += 32) {
      s = fmaf(Cvt<T>::to_f(ps[r * kTile + jt]), Cvt<T>::to_f(w[c * M + j0 + jt]), s);
    }
    s = warp_sum(s);
    if (lane == 0) part[r * C + c] = s;
  }
}

// A row of logits in T read as float32.
template <typename T>
struct RowView {
  const T* p;
  __device__ __forceinline__ float operator[](int c) const { return Cvt<T>::to_f(p[c]); }
};

// Row `row`'s logits as the rule reads them: given (`stride` elements apart), or with
// kPartials the sum of the head's partials over the tiles plus b, rounded to T and written to
// the logits output (then read back from there).
template <typename T, bool kPartials>
__device__ __forceinline__ RowView<T> row_logits(const KernelArgs& a, int64_t row, const T* given, int64_t stride) {
  if (!kPartials) return RowView<T>{given + row * stride};
  const HeadPtrs& h = a.head;
  T* out = static_cast<T*>(h.logits) + row * a.C;
  const T* b = static_cast<const T*>(h.b);
  const int64_t tiles = head_tiles(h.M);
  for (int64_t c = 0; c < a.C; ++c) {
    float s = 0.0f;
    for (int64_t t = 0; t < tiles; ++t) s += h.partials[(t * a.n + row) * a.C + c];
    out[c] = Cvt<T>::from_f(s + Cvt<T>::to_f(b[c]));
  }
  return RowView<T>{out};
}

// One thread per row. Without the rule (the head alone) it only writes the logits; with it,
// the survivor count reads -1 (not requested).
template <typename T, bool kPartials>
__global__ void __launch_bounds__(kRuleThreads) rule_kernel(const KernelArgs a, const T* logits, int64_t stride) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRuleThreads + threadIdx.x;
  if (a.has_rule && row == 0) *a.rule.count = -1;
  if (row >= a.n) return;
  const RowView<T> z = row_logits<T, kPartials>(a, row, logits, stride);
  if (a.has_rule) finish_row(a, row, z);
}

// One block walks all rows, kScanThreads at a time: the rule on each, then the stable list of
// the rows that stay: survivors[0..count) in increasing order, then the exiting rows in
// decreasing order (a permutation: the engine gathers the bookkeeping by all of it).
template <typename T, bool kPartials>
__global__ void __launch_bounds__(kScanThreads) rule_scan_kernel(const KernelArgs a, const T* logits, int64_t stride) {
  __shared__ int warp_offsets[kScanThreads / 32];
  __shared__ int chunk_total;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  int64_t* survivors = a.rule.survivors;
  int64_t base = 0;
  for (int64_t start = 0; start < a.n; start += kScanThreads) {
    const int64_t i = start + threadIdx.x;
    bool keep = false;
    if (i < a.n) keep = !finish_row(a, i, row_logits<T, kPartials>(a, i, logits, stride));
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
    const int64_t kept_before = base + warp_offsets[warp] + before;  // staying rows before row i
    if (keep) {
      survivors[kept_before] = i;
    } else if (i < a.n) {
      survivors[a.n - 1 - (i - kept_before)] = i;
    }
    base += chunk_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) *a.rule.count = base;
}

// The rule on n rows (given logits, or the head's partials): rule_scan_kernel when the
// survivors are asked for, rule_kernel otherwise.
template <typename T, bool kPartials>
cudaError_t launch_rule(const KernelArgs& a, const T* logits, int64_t stride, bool scan, cudaStream_t stream) {
  if (scan) {
    rule_scan_kernel<T, kPartials><<<1, kScanThreads, 0, stream>>>(a, logits, stride);
  } else if (a.n > 0) {
    const int64_t blocks = (a.n + kRuleThreads - 1) / kRuleThreads;
    rule_kernel<T, kPartials><<<static_cast<unsigned>(blocks), kRuleThreads, 0, stream>>>(a, logits, stride);
  } else if (a.has_rule) {
    return cudaMemsetAsync(a.rule.count, 0xff, sizeof(int64_t), stream);  // -1: not requested
  } else {
    return cudaSuccess;
  }
  return cudaGetLastError();
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
  const bool scan = rule != nullptr && (params.flags & kSurvivors);
  if (head == nullptr) {
    if (rule == nullptr) return cudaErrorInvalidValue;
    return launch_rule<T, false>(a, static_cast<const T*>(logits), logits_stride, scan, stream);
  }
  if (n > 0) {
    const int64_t H = head->H;
    const int64_t stage = ((kRows * H * static_cast<int64_t>(sizeof(T)) + 15) / 16) * 16;
    const int64_t bytes = stage + kRows * kTile * static_cast<int64_t>(sizeof(T));
    constexpr int V = Cvt<T>::kVec;
    a.vec = H % V == 0 && (reinterpret_cast<uintptr_t>(head->wp) & 15u) == 0;
    cudaError_t err = allow_dynamic_shared(head_tile_kernel<T>, bytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>((n + kRows - 1) / kRows), static_cast<unsigned>(head_tiles(head->M)));
    head_tile_kernel<T><<<grid, kThreads, static_cast<size_t>(bytes), stream>>>(a);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return launch_rule<T, true>(a, nullptr, 0, scan, stream);
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
