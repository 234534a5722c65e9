// A BERT-style encoder layer (post-norm, SDPA attention, GELU feed-forward) as one operator:
// the same ATen calls, in the same order, as earlyexit_kernels.engine.layers.packed_layer.OpByOpLayer
// on every position (so the same result, bit for bit), without Python between them.
#include <ATen/ATen.h>

#include "ops.h"

namespace eek {

namespace {

enum Weight {
  kQueryW, kQueryB, kKeyW, kKeyB, kValueW, kValueB,
  kAttentionOutW, kAttentionOutB, kAttentionNormW, kAttentionNormB,
  kIntermediateW, kIntermediateB, kOutputW, kOutputB, kOutputNormW, kOutputNormB,
  kWeights
};

}  // namespace

at::Tensor bert_layer_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& mask, at::TensorList weights,
                          double attention_eps, double output_eps, int64_t head_size, double scaling) {
  TORCH_CHECK(hidden.dim() == 3, "cpp_bert_layer: hidden must be [n, S, H], got ", hidden.sizes());
  TORCH_CHECK(hidden.device().is_cpu(), "cpp_bert_layer (CPU): hidden must be on the CPU");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kWeights, "cpp_bert_layer: ", static_cast<int64_t>(kWeights),
              " weights expected (query, key, value, attention output, its norm, intermediate, output, its norm: "
              "weight and bias each), got ", weights.size());
  const int64_t n = hidden.size(0), length = hidden.size(1), width = hidden.size(2);
  TORCH_CHECK(head_size >= 1 && weights[kQueryW].size(0) % head_size == 0, "cpp_bert_layer: head_size ", head_size,
              " does not divide the attention width ", weights[kQueryW].size(0));
  auto heads = [&](const at::Tensor& projected) { return projected.view({n, length, -1, head_size}).transpose(1, 2); };
  const at::Tensor query = heads(at::linear(hidden, weights[kQueryW], weights[kQueryB]));
  const at::Tensor key = heads(at::linear(hidden, weights[kKeyW], weights[kKeyB]));
  const at::Tensor value = heads(at::linear(hidden, weights[kValueW], weights[kValueB]));
  at::Tensor mixed = at::scaled_dot_product_attention(query, key, value, mask, 0.0, /*is_causal=*/false, scaling);
  // transformers' SDPA attention returns [n, S, heads, head_size], contiguous; the layer flattens the heads.
  mixed = mixed.reshape({mixed.size(0), -1, length, value.size(-1)}).transpose(1, 2).contiguous();
  mixed = mixed.reshape({n, length, -1}).contiguous();
  at::Tensor attended = at::linear(mixed, weights[kAttentionOutW], weights[kAttentionOutB]).add_(hidden);
  attended = at::layer_norm(attended, {width}, weights[kAttentionNormW], weights[kAttentionNormB], attention_eps);
  at::Tensor inner = at::linear(attended, weights[kIntermediateW], weights[kIntermediateB]);
  at::gelu_(inner);
  at::Tensor out = at::linear(inner, weights[kOutputW], weights[kOutputB]).add_(attended);
  return at::layer_norm(out, {width}, weights[kOutputNormW], weights[kOutputNormB], output_eps);
}

}  // namespace eek
