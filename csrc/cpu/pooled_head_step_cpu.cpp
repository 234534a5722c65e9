// The per-layer step of an exit head on the CPU in one call, float32: the pooling of each active
// row's token vectors ([CLS] or the masked mean), the head (the model's form: tanh pooler then a
// Linear; or an MLP head: LayerNorm, Linear, GELU, Linear), the policy's rule, the write-back of
// the exiting rows and the stable survivor list, in blocks of rows with nothing between them.
//
// Why one call: right after an encoder layer each ATen op runs on cold caches (tens of
// microseconds of dispatch apiece; benchmarks/results/exit_head_in_situ_cpu.md), and the
// PyTorch masked mean alone writes a masked copy of the whole [n, S, H] block before summing.
// Here each row is read once, summed in the order of its tokens, and never copied.
//
// Each row's values depend on that row only (as in pooler_head_cpu.cpp), so a sequence gets the
// same logits whatever batch it runs in.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "exit_rule_cpu.h"
#include "pooler_head_cpu.h"

namespace eek {
namespace {

constexpr int kRows = 4;  // rows per block: pooler_head_rows shares each weight load between them

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
  TORCH_CHECK(hidden.scalar_type() == at::kFloat, "cpp_pooled_head_exit_step: float32 expected, got ",
              hidden.scalar_type());
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

  const float* base = x.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  float* pooled_out = pooled.data_ptr<float>();
  float* logits_out = logits.data_ptr<float>();
  const uint8_t* valid_rows = valid.empty() ? nullptr : valid.data();
  const float* norm_w = norm ? nw.data_ptr<float>() : nullptr;
  const float* norm_b = norm ? nb.data_ptr<float>() : nullptr;
  const int64_t blocks = (n + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xf(kRows * H), act(kRows * M), zf(kRows * C);
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t r0 = block * kRows;
      const int nb_rows = static_cast<int>(std::min<int64_t>(kRows, n - r0));
      for (int r = 0; r < nb_rows; ++r) {
        const int64_t row = r0 + r;
        float* p = pooled_out + row * H;
        if (pooling == kPoolCls) {
          std::copy(base + row * s0, base + row * s0 + H, p);
        } else {
          pool_row(base + row * s0, s1, S, valid_rows != nullptr ? valid_rows + row * S : nullptr, H, true, p);
        }
        std::copy(p, p + H, xf.data() + r * H);
        if (norm) layer_norm_row(xf.data() + r * H, H, norm_w, norm_b, static_cast<float>(norm_eps));
      }
      pooler_head_rows(args, xf.data(), nb_rows, act.data(), zf.data());
      std::copy(zf.data(), zf.data() + nb_rows * C, logits_out + r0 * C);
      rule_rows(call, C, r0, nb_rows, zf.data());
    }
  });
  finish_survivors(call, n);
  return head_exit_result(call, logits, pooled);
}

}  // namespace eek
