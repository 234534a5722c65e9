// The float32 CPU exit head on a block of rows (pooler_head_cpu.cpp). No torch headers.
#pragma once

#include <cstdint>

namespace eek {

struct PoolerHeadArgs {
  const float* pooler_weight_t = nullptr;  // [H_in, H_out]: W_p transposed, contiguous
  const float* pooler_bias = nullptr;      // [H]
  const float* head_weight = nullptr;      // [C, H] contiguous
  const float* head_bias = nullptr;        // [C]
  int64_t hidden = 0;                      // H
  int64_t num_labels = 0;                  // C
  int64_t x_stride = 0;                    // elements between rows of x (unit stride over H)
};

// pooled [rows, H] = tanh(x W_p^T + b_p) and logits [rows, C] = pooled W^T + b for
// rows = 1..4 rows of x; each row's values depend on that row only.
void pooler_head_rows(const PoolerHeadArgs& args, const float* x, int rows, float* pooled, float* logits);

// Which version pooler_head_rows runs: "avx512", "avx2_fma" or "portable", the widest this CPU
// runs unless the environment variable EARLYEXIT_CPU_ISA names a narrower one (for tests).
const char* pooler_head_isa();

}  // namespace eek
