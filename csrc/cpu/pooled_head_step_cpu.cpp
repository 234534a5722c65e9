// The per-layer step of an exit head on the CPU in one call, float32: the pooling of each active
// row's token vectors ([CLS] or the masked mean), the head (the model's form: tanh pooler then a
// Linear; or an MLP head: LayerNorm, Linear, GELU, Linear), the policy's rule, the write-back of
// the exiting rows and the stable survivor list, with nothing between them.
//
// Why one call: right after an encoder layer each ATen op runs on cold caches (tens of
// microseconds of dispatch apiece; benchmarks/results/intel_xeon/exit_head_in_situ_cpu.md), and the
// PyTorch masked mean alone writes a masked copy of the whole [n, S, H] block before summing.
// Here each row is read once, summed in the order of its tokens, and never copied.
//
// Each row's values depend on that row only (as in pooler_head_cpu.cpp), so a sequence gets the
// same logits whatever batch it runs in.
//
// bfloat16 hidden states: the weights come as float32 copies (exact), every product is summed in
// float32, and each step's output is rounded to bfloat16 where PyTorch's bfloat16 modules round
// theirs (the pooled mean, the LayerNorm, the first Linear, the activation, the logits), so the
// values match PyTorch's to its own bfloat16 rounding (the sums' order may differ by an ulp).
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "exit_rule_cpu.h"
#include "pooler_head_cpu.h"

namespace eek {
namespace {

constexpr int64_t kPoolCls = 0, kPoolMean = 1;
constexpr int64_t kActTanh = 0, kActGelu = 1;

// valid[n * S] as bytes (1: an attended token) from a mask of any dtype.
std::vector<uint8_t> valid_bytes(const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous();
  std::vector<uint8_t> valid(static_cast<size_t>(m.numel()));
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(), "cpp_pooled_head_exit_step", [&] {
    const scalar_t* p = m.data_ptr<scalar_t>();
    for (size_t i = 0; i < valid.size(); ++i) valid[i] = p[i] != scalar_t(0);
  });
  return valid;
}

// LayerNorm of one row in place (biased variance, as torch.nn.LayerNorm).
void layer_norm_row(float* x, int64_t H, const float* weight, const float* bias, float eps) {
  float mean = 0.0f;
  for (int64_t k = 0; k < H; ++k) mean += x[k];
  mean /= static_cast<float>(H);
  float var = 0.0f;
  for (int64_t k = 0; k < H; ++k) var += (x[k] - mean) * (x[k] - mean);
  const float rstd = 1.0f / std::sqrt(var / static_cast<float>(H) + eps);
  for (int64_t k = 0; k < H; ++k) x[k] = (x[k] - mean) * rstd * weight[k] + bias[k];
}

inline float rounded(float x, bool bf16) { return bf16 ? static_cast<float>(c10::BFloat16(x)) : x; }

// The pooled row of bfloat16 token vectors in float32 (summed in the order of s), rounded to bfloat16.
void pool_row_bf16(const c10::BFloat16* x, int64_t stride, int64_t S, const uint8_t* valid, int64_t H, bool mean,
                   float* out) {
  std::fill(out, out + H, 0.0f);
  int64_t count = 0;
  for (int64_t s = 0; s < S; ++s) {
    if (valid != nullptr && !valid[s]) continue;
    const c10::BFloat16* row = x + s * stride;
    for (int64_t k = 0; k < H; ++k) out[k] += static_cast<float>(row[k]);
    ++count;
  }
  const float scale = mean ? static_cast<float>(std::max<int64_t>(count, 1)) : 1.0f;
  for (int64_t k = 0; k < H; ++k) out[k] = rounded(out[k] / scale, true);
}

void check_vector(const at::Tensor& t, int64_t size, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "cpp_pooled_head_exit_step: ", what, " must be [", size, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "cpp_pooled_head_exit_step: ", what,
              " must be float32 on the CPU");
}

}  // namespace

HeadExitResult pooled_head_exit_step_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& mask,
                                         int64_t pooling, const std::optional<at::Tensor>& norm_weight,
                                         const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                         const at::Tensor& dense_weight_t, const at::Tensor& dense_bias,
                                         int64_t activation, const at::Tensor& out_weight, const at::Tensor& out_bias,
                                         EEK_EXIT_ARGS) {
  TORCH_CHECK(hidden.dim() == 3, "cpp_pooled_head_exit_step: hidden must be [n, S, H], got ", hidden.sizes());
  TORCH_CHECK(hidden.device().is_cpu(), "cpp_pooled_head_exit_step: tensors must be on the CPU (it has no GPU kernel)");
  const bool bf16 = hidden.scalar_type() == at::kBFloat16;
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || bf16,
              "cpp_pooled_head_exit_step: float32 or bfloat16 hidden states expected, got ", hidden.scalar_type());
  TORCH_CHECK(pooling == kPoolCls || pooling == kPoolMean, "cpp_pooled_head_exit_step: pooling must be 0 ([CLS]) or 1 (mean), got ",
              pooling);
  TORCH_CHECK(activation == kActTanh || activation == kActGelu,
              "cpp_pooled_head_exit_step: activation must be 0 (tanh) or 1 (GELU), got ", activation);
  const at::Tensor x = hidden.size(2) > 1 && hidden.stride(2) != 1 ? hidden.contiguous() : hidden;
  const int64_t n = x.size(0), S = x.size(1), H = x.size(2);
  TORCH_CHECK(S >= 1 || n == 0, "cpp_pooled_head_exit_step: hidden has no positions");
  TORCH_CHECK(dense_weight_t.dim() == 2 && dense_weight_t.size(0) == H,
              "cpp_pooled_head_exit_step: dense_weight_t must be [H, M] with H = ", H, ", got ", dense_weight_t.sizes());
  const int64_t M = dense_weight_t.size(1);
  TORCH_CHECK(out_weight.dim() == 2 && out_weight.size(1) == M && out_weight.size(0) >= 1,
              "cpp_pooled_head_exit_step: out_weight must be [C, M] with M = ", M, ", got ", out_weight.sizes());
  const int64_t C = out_weight.size(0);
  TORCH_CHECK(dense_weight_t.scalar_type() == at::kFloat && out_weight.scalar_type() == at::kFloat,
              "cpp_pooled_head_exit_step: the weights must be float32");
  check_vector(dense_bias, M, "dense_bias");
  check_vector(out_bias, C, "out_bias");
  const bool norm = norm_weight.has_value() && norm_weight->defined();
  TORCH_CHECK(norm == (norm_bias.has_value() && norm_bias->defined()),
              "cpp_pooled_head_exit_step: give both norm_weight and norm_bias, or neither");
  at::Tensor nw, nb;
  if (norm) {
    nw = norm_weight->contiguous();
    nb = norm_bias->contiguous();
    check_vector(nw, H, "norm_weight");
    check_vector(nb, H, "norm_bias");
  }
  std::vector<uint8_t> valid;
  if (pooling == kPoolMean && mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n && mask->size(1) == S,
                "cpp_pooled_head_exit_step: mask must be [n, S] = [", n, ", ", S, "], got ", mask->sizes());
    valid = valid_bytes(*mask);
  }
  const at::Tensor wt = dense_weight_t.contiguous(), db = dense_bias.contiguous();
  const at::Tensor w2 = out_weight.contiguous(), b2 = out_bias.contiguous();

  at::Tensor pooled = at::empty({n, H}, x.options());
  at::Tensor logits = at::empty({n, C}, x.options());
  ExitCall call = prepare_exit_call(n, C, x.device(), halting, state, kind, flags, layer, num_layers, int_param, scalar,
                                    per_layer, rows, runs, out_logits, out_exit_layer, out_layers_run);
  if (n == 0) {
    call.count.fill_((call.params.flags & kSurvivors) ? 0 : -1);
    return head_exit_result(call, logits, pooled);
  }
  PoolerHeadArgs args;
  args.pooler_weight_t = wt.data_ptr<float>();
  args.pooler_bias = db.data_ptr<float>();
  args.head_weight = w2.data_ptr<float>();
  args.head_bias = b2.data_ptr<float>();
  args.hidden = H;
  args.width = M;
  args.num_labels = C;
  args.x_stride = H;
  args.gelu = activation == kActGelu;
  args.round_bf16 = bf16;

  const char* base = static_cast<const char*>(x.data_ptr());
  const int64_t element = static_cast<int64_t>(x.element_size());
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  char* pooled_out = static_cast<char*>(pooled.data_ptr());
  char* logits_out = static_cast<char*>(logits.data_ptr());
  const uint8_t* valid_rows = valid.empty() ? nullptr : valid.data();
  const float* norm_w = norm ? nw.data_ptr<float>() : nullptr;
  const float* norm_b = norm ? nb.data_ptr<float>() : nullptr;
  // Pool (and norm) every row, then both Linears over all rows at once (each weight block read
  // once for all of them), then the rule row by row.
  std::vector<float> xf(n * H), act(n * M), zf(n * C);
  for (int64_t row = 0; row < n; ++row) {
    float* p = xf.data() + row * H;
    const char* first = base + row * s0 * element;
    const uint8_t* row_valid = valid_rows != nullptr ? valid_rows + row * S : nullptr;
    if (bf16) {
      const auto* tokens = reinterpret_cast<const c10::BFloat16*>(first);
      if (pooling == kPoolCls) {
        for (int64_t k = 0; k < H; ++k) p[k] = static_cast<float>(tokens[k]);
      } else {
        pool_row_bf16(tokens, s1, S, row_valid, H, true, p);
      }
      auto* out = reinterpret_cast<c10::BFloat16*>(pooled_out) + row * H;
      for (int64_t k = 0; k < H; ++k) out[k] = c10::BFloat16(p[k]);
    } else {
      const auto* tokens = reinterpret_cast<const float*>(first);
      if (pooling == kPoolCls) {
        std::copy(tokens, tokens + H, p);
      } else {
        pool_row(tokens, s1, S, row_valid, H, true, p);
      }
      std::copy(p, p + H, reinterpret_cast<float*>(pooled_out) + row * H);
    }
    if (norm) {
      layer_norm_row(p, H, norm_w, norm_b, static_cast<float>(norm_eps));
      if (bf16)
        for (int64_t k = 0; k < H; ++k) p[k] = rounded(p[k], true);
    }
  }
  pooler_head_all_rows(args, xf.data(), n, act.data(), zf.data());
  if (bf16) {
    auto* out = reinterpret_cast<c10::BFloat16*>(logits_out);
    for (int64_t i = 0; i < n * C; ++i) out[i] = c10::BFloat16(zf[i]);
  } else {
    std::copy(zf.begin(), zf.end(), reinterpret_cast<float*>(logits_out));
  }
  rule_rows(call, C, 0, n, zf.data());
  finish_survivors(call, n);
  return head_exit_result(call, logits, pooled);
}

}  // namespace eek
