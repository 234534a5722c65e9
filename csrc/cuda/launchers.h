// Launchers of the CUDA kernels: plain C++ over raw pointers and a cudaStream_t, no torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/exit_rule.h"

namespace eek {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Pooled features per block of the head kernel: the head's partial logits come in
// head_tiles(H) tiles of this many features.
constexpr int64_t kHeadTile = 64;
EEK_HD int64_t head_tiles(int64_t H) { return (H + kHeadTile - 1) / kHeadTile; }

// A head's two Linear layers: pooled = act(wp x + bp), logits = w pooled + b (all in `dtype`);
// act is tanh (the model's pooler: M = H) or, with gelu, the exact GELU (an MLP head).
struct HeadPtrs {
  const void* x = nullptr;  // [n, H], row stride x_stride (elements), unit stride over H
  int64_t x_stride = 0;
  const void* wp = nullptr;  // [M, H] contiguous
  const void* bp = nullptr;  // [M]
  const void* w = nullptr;   // [C, M] contiguous
  const void* b = nullptr;   // [C]
  int64_t H = 0;
  int64_t M = 0;
  bool gelu = false;
  void* pooled = nullptr;  // [n, M] out, or null (not written)
  void* logits = nullptr;  // [n, C] out
  float* partials = nullptr;  // [head_tiles(M), n, C] float32 scratch (the caller allocates it)
};

// The rows an exit head reads: out[r] = the [CLS] vector (mean = false) or the mean of the valid
// token vectors (mask [n, S] int64, nonzero where valid; null: every token) of hidden [n, S, H]
// (row and token strides in elements, unit stride over H), summed in float32 and rounded to
// `dtype`; then, with norm_weight/norm_bias [H] (or null), the LayerNorm in float32, rounded.
struct PoolArgs {
  const void* hidden = nullptr;
  int64_t stride_n = 0;
  int64_t stride_s = 0;
  int64_t n = 0;
  int64_t S = 0;
  int64_t H = 0;
  const int64_t* mask = nullptr;
  int64_t mask_stride = 0;
  bool mean = false;
  const void* norm_weight = nullptr;
  const void* norm_bias = nullptr;
  float eps = 1e-5f;
  void* out = nullptr;  // [n, H] contiguous
};
cudaError_t launch_pool_norm(DType dtype, const PoolArgs& args, cudaStream_t stream);

// Outputs of the rule.
struct RulePtrs {
  const float* halting = nullptr;  // [n] float32, or null
  bool* exits = nullptr;           // [n]
  float* returned = nullptr;       // [n, C]
  int64_t* survivors = nullptr;    // [n] (params.flags & kSurvivors), padded with -1
  int64_t* count = nullptr;        // [] survivors, -1 without kSurvivors
};

// head != null && rule == null: the head only. head != null && rule != null: fused.
// head == null: the rule on `logits` [n, C] (row stride logits_stride, in `dtype`).
cudaError_t launch_head_exit(DType dtype, int64_t n, int64_t C, const HeadPtrs* head, const void* logits,
                             int64_t logits_stride, const RuleParams& params, const StateArgs& state,
                             const WriteBack& write_back, const RulePtrs* rule, cudaStream_t stream);

// Output row i (row_bytes, contiguous) = the first row_bytes of source row index[i]
// (source rows src_row_stride bytes apart, n of them). 16-byte copies when aligned.
cudaError_t launch_compact(const void* src, int64_t src_row_stride, int64_t n, void* dst, int64_t row_bytes,
                           const int64_t* index, int64_t m, cudaStream_t stream);

// cpp_gather_survivors (bindings.cpp) on the GPU, one launch: rows, live count and every tensor's rows.
constexpr int kMaxGatherCopies = 12;  // eek::kMaxSurvivorCopies
struct GatherCopy {
  const void* src = nullptr;  // row order[i] at src + order[i] * src_stride (bytes)
  void* dst = nullptr;        // row i at dst + i * dst_stride (bytes)
  int64_t src_stride = 0;
  int64_t dst_stride = 0;
  int64_t bytes = 0;  // of one row
  int width = 1;      // bytes a thread moves at a time (16, 4 or 1): set by the launcher from the alignment
};
struct SurvivorGather {
  int64_t n = 0;
  const int64_t* order = nullptr;  // [n], a permutation of 0..n-1
  const bool* exits = nullptr;     // [n]
  const int64_t* rows = nullptr;   // [n]
  int64_t dead = 0;
  int64_t* next_rows = nullptr;   // [n] out
  int64_t* count = nullptr;       // [1] out
  int64_t* host_count = nullptr;  // [1] out in pinned (mapped) host memory, or null
  int num_copies = 0;
  GatherCopy copies[kMaxGatherCopies];
};
cudaError_t launch_gather_survivors(const SurvivorGather& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace eek
