// The float32 CPU exit head on a block of rows (pooler_head_cpu.cpp). No torch headers.
#pragma once

#include <cstdint>

namespace eek {

struct PoolerHeadArgs {
  const float* pooler_weight_t = nullptr;  // [H, M]: the first Linear's weight transposed, contiguous
  const float* pooler_bias = nullptr;      // [M]
  const float* head_weight = nullptr;      // [C, M] contiguous
  const float* head_bias = nullptr;        // [C]
  int64_t hidden = 0;                      // H
  int64_t width = 0;                       // M, the first Linear's outputs (0: H, the pooler's)
  int64_t num_labels = 0;                  // C
  int64_t x_stride = 0;                    // elements between rows of x (unit stride over H)
  bool gelu = false;                       // the activation: tanh (the pooler), or GELU (an MLP head)
  bool round_bf16 = false;                 // a bfloat16 head: round each Linear's and the activation's outputs

  int64_t out_width() const { return width > 0 ? width : hidden; }
};

// pooled [rows, M] = act(x W_1^T + b_1) and logits [rows, C] = pooled W^T + b for
// rows = 1..4 rows of x (act: tanh for the model's pooler, GELU for an MLP head's hidden
// layer); each row's values depend on that row only.
void pooler_head_rows(const PoolerHeadArgs& args, const float* x, int rows, float* pooled, float* logits);

// pooler_head_rows on `rows` rows of x (any number), each weight block read once for all of them;
// a row's values are the same as pooler_head_rows gives it.
void pooler_head_all_rows(const PoolerHeadArgs& args, const float* x, int64_t rows, float* pooled, float* logits);

// out [H] = the sum, or with `mean` the mean, of the token vectors x + s * stride (s < S, unit
// stride over H) whose valid[s] is nonzero (valid == nullptr: all of them; none: zeros),
// added in the order of s. The masked mean pooling of an exit head.
void pool_row(const float* x, int64_t stride, int64_t S, const uint8_t* valid, int64_t H, bool mean, float* out);

// Which version pooler_head_rows runs: "avx512", "avx2_fma" or "portable", the widest this CPU
// runs unless the environment variable EARLYEXIT_CPU_ISA names a narrower one (for tests).
const char* pooler_head_isa();

}  // namespace eek
