// The operators of earlyexit_kernels._C (schemas in bindings.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/exit_op.h"

namespace eek {

#define EEK_EXIT_ARGS                                                                                                  \
  const std::optional<at::Tensor>&halting, const std::vector<at::Tensor>&state, int64_t kind, int64_t flags,          \
      int64_t layer, int64_t num_layers, int64_t int_param, double scalar, const at::Tensor &per_layer,                \
      const std::optional<at::Tensor>&rows, const std::optional<at::Tensor>&runs,                                     \
      const std::optional<at::Tensor>&out_logits, const std::optional<at::Tensor>&out_exit_layer,                     \
      const std::optional<at::Tensor>&out_layers_run

std::tuple<at::Tensor, at::Tensor> head_cpu(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight,
                                            const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                            const at::Tensor& head_bias);
ExitResult exit_step_cpu(const at::Tensor& logits, EEK_EXIT_ARGS);
HeadExitResult head_exit_step_cpu(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight,
                                  const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                  const at::Tensor& head_bias, EEK_EXIT_ARGS);
// cpp_head_exit_step in float32 with the pooler weight given transposed ([H_in, H_out]),
// for the CPU's register-blocked head (cpu/pooler_head_cpu.cpp).
HeadExitResult packed_head_exit_step_cpu(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight_t,
                                         const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                         const at::Tensor& head_bias, EEK_EXIT_ARGS);
// The pooling of each row ([CLS] or masked mean), the exit head (tanh pooler or MLP) and the rule
// in one call, float32 (cpu/pooled_head_step_cpu.cpp).
HeadExitResult pooled_head_exit_step_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& mask,
                                         int64_t pooling, const std::optional<at::Tensor>& norm_weight,
                                         const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                         const at::Tensor& dense_weight_t, const at::Tensor& dense_bias,
                                         int64_t activation, const at::Tensor& out_weight, const at::Tensor& out_bias,
                                         EEK_EXIT_ARGS);
std::tuple<at::Tensor, at::Tensor> compact_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& mask,
                                               const at::Tensor& index, int64_t seq_len);
std::tuple<at::Tensor, at::Tensor> pool_gather_cpu(const at::Tensor& pool, const at::Tensor& page_table,
                                                   const at::Tensor& lengths, int64_t page_size, at::IntArrayRef slots,
                                                   int64_t padded_length, const std::vector<at::Tensor>& residents,
                                                   at::IntArrayRef resident_of, at::IntArrayRef row_of);
void pool_scatter_cpu(const at::Tensor& pool, const at::Tensor& page_table, const at::Tensor& lengths,
                      int64_t page_size, at::IntArrayRef slots, const at::Tensor& hidden);

// The graphed step's bookkeeping after an exit layer in one op (cpu/gather_survivors_cpu.cpp):
// next_rows[i] = dead where exits[order[i]] else rows[order[i]], count = the rows of next_rows
// that are not dead (also written to host_count, pinned host memory, where given), and row i of
// every targets[t] = row order[i] of sources[t].
void gather_survivors_cpu(const at::Tensor& order, const at::Tensor& exits, const at::Tensor& rows, int64_t dead,
                          const at::Tensor& next_rows, const at::Tensor& count, at::TensorList sources,
                          at::TensorList targets, const std::optional<at::Tensor>& host_count);

// One tensor's rows moved by cpp_gather_survivors: `bytes` from src + order[i] * src_stride to
// dst + i * dst_stride.
struct RowCopySpec {
  const char* src;
  char* dst;
  int64_t src_stride;
  int64_t dst_stride;
  int64_t bytes;
};
// The most tensors one cpp_gather_survivors call moves (the hidden states, the mask, the extents
// and a policy's state fit with room): the CUDA kernel takes their copies as one parameter.
constexpr int64_t kMaxSurvivorCopies = 12;
// cpp_gather_survivors' arguments checked (the same on every device) and laid out as copies.
std::vector<RowCopySpec> survivor_copies(const at::Tensor& order, const at::Tensor& exits, const at::Tensor& rows,
                                         const at::Tensor& next_rows, const at::Tensor& count, at::TensorList sources,
                                         at::TensorList targets, const std::optional<at::Tensor>& host_count);

// A BERT-style layer on every position, as OpByOpLayer runs it (bert_layer_cpu.cpp).
at::Tensor bert_layer_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& mask, at::TensorList weights,
                          double attention_eps, double output_eps, int64_t head_size, double scaling);

}  // namespace eek
