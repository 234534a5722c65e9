// CPU kernels of the exit step: the default head tanh(W_p h + b_p) -> W_i . + b_i with
// float32 accumulation, then the policy's rule (common/exit_rule.h) per row, the
// optional write-back and the stable survivor list, in blocks of kRows rows through
// at::parallel_for (one thread: the extension is built without OpenMP, see setup.py); the
// generic head's dot products are plain loops the compiler vectorises, the float32 head is
// pooler_head_cpu.cpp's.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "exit_rule_cpu.h"
#include "pooler_head_cpu.h"

namespace eek {
namespace {

constexpr int kRows = 4;  // rows per block: each weight row is read once for kRows dot products

template <typename T>
struct HeadArgs {
  const T* x = nullptr;  // [n, H], row stride x_stride, unit stride over H
  int64_t x_stride = 0;
  const T* wp = nullptr;  // [H, H] contiguous
  const T* bp = nullptr;  // [H]
  const T* w = nullptr;   // [C, H] contiguous
  const T* b = nullptr;   // [C]
  int64_t H = 0;
  T* pooled = nullptr;  // [n, H] out
  T* logits = nullptr;  // [n, C] out
  bool wp_transposed = false;  // float32 only: wp is W_p transposed [H_in, H_out], for pooler_head_rows
};

// out[r] = sum_k in[r*H + k] * float(weight[k]) for the kRows rows of `in`.
template <typename T>
inline void dot_rows(const float* in, const T* weight, int64_t H, float out[kRows]) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  const float* x0 = in;
  const float* x1 = in + H;
  const float* x2 = in + 2 * H;
  const float* x3 = in + 3 * H;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t k = 0; k < H; ++k) {
    const float wk = static_cast<float>(weight[k]);
    a0 += x0[k] * wk;
    a1 += x1[k] * wk;
    a2 += x2[k] * wk;
    a3 += x3[k] * wk;
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

// The head on rows r0 .. r0+nb-1: writes pooled and logits (in T) and zf [kRows, C], the
// logits rounded to T and read back as float32 (what logits.float() gives the rule).
template <typename T>
void head_block(const HeadArgs<T>& a, int64_t C, int64_t r0, int nb, float* xf, float* pf, float* zf) {
  const int64_t H = a.H;
  if constexpr (std::is_same_v<T, float>) {
    if (a.wp_transposed) {
      PoolerHeadArgs args;
      args.pooler_weight_t = a.wp;
      args.pooler_bias = a.bp;
      args.head_weight = a.w;
      args.head_bias = a.b;
      args.hidden = H;
      args.num_labels = C;
      args.x_stride = a.x_stride;
      pooler_head_rows(args, a.x + r0 * a.x_stride, nb, a.pooled + r0 * H, a.logits + r0 * C);
      std::copy(a.logits + r0 * C, a.logits + (r0 + nb) * C, zf);
      return;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float* dst = xf + r * H;
    if (r < nb) {
      const T* src = a.x + (r0 + r) * a.x_stride;
      for (int64_t k = 0; k < H; ++k) dst[k] = static_cast<float>(src[k]);
    } else {
      std::fill(dst, dst + H, 0.0f);
    }
  }
  float acc[kRows];
  for (int64_t j = 0; j < H; ++j) {
    dot_rows(xf, a.wp + j * H, H, acc);
    const float bias = static_cast<float>(a.bp[j]);
    for (int r = 0; r < kRows; ++r) {
      const T v = static_cast<T>(std::tanh(acc[r] + bias));
      if (r < nb) a.pooled[(r0 + r) * H + j] = v;
      pf[r * H + j] = r < nb ? static_cast<float>(v) : 0.0f;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    dot_rows(pf, a.w + c * H, H, acc);
    const float bias = static_cast<float>(a.b[c]);
    for (int r = 0; r < nb; ++r) {
      const T v = static_cast<T>(acc[r] + bias);
      a.logits[(r0 + r) * C + c] = v;
      zf[r * C + c] = static_cast<float>(v);
    }
  }
}

inline void store_out(const WriteBack& wb, int64_t index, float value) {
  switch (wb.out_dtype) {
    case kOutF16:
      static_cast<c10::Half*>(wb.logits)[index] = c10::Half(value);
      break;
    case kOutBF16:
      static_cast<c10::BFloat16*>(wb.logits)[index] = c10::BFloat16(value);
      break;
    default:
      static_cast<float*>(wb.logits)[index] = value;
  }
}

// call == nullptr: the head only. head == nullptr: the rule on `logits` only.
template <typename T>
void run_cpu(ExitCall* call, int64_t n, int64_t C, const T* logits, int64_t logits_stride, const HeadArgs<T>* head) {
  if (n == 0) {
    if (call != nullptr) call->count.fill_((call->params.flags & kSurvivors) ? 0 : -1);
    return;
  }
  const int64_t blocks = (n + kRows - 1) / kRows;
  const int64_t grain = head != nullptr ? 1 : 256;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> xf, pf, zf(kRows * C);
    if (head != nullptr) {
      xf.resize(kRows * head->H);
      pf.resize(kRows * head->H);
    }
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t r0 = block * kRows;
      const int nb = static_cast<int>(std::min<int64_t>(kRows, n - r0));
      if (head != nullptr) {
        head_block(*head, C, r0, nb, xf.data(), pf.data(), zf.data());
      } else {
        for (int r = 0; r < nb; ++r) {
          const T* src = logits + (r0 + r) * logits_stride;
          for (int64_t c = 0; c < C; ++c) zf[r * C + c] = static_cast<float>(src[c]);
        }
      }
      if (call != nullptr) rule_rows(*call, C, r0, nb, zf.data());
    }
  });
  if (call != nullptr) finish_survivors(*call, n);
}

at::Tensor as_rule_input(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "cpp_exit_step: logits must be [n, C], got ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "cpp_exit_step (CPU): logits must be on the CPU");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "cpp_exit_step: logits must be floating point");
  at::Tensor z = logits;
  const auto t = z.scalar_type();
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) z = z.to(at::kFloat);
  if (z.size(1) > 1 && z.stride(1) != 1) z = z.contiguous();
  return z;
}

template <typename T>
HeadArgs<T> head_args(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& bp, const at::Tensor& w,
                      const at::Tensor& b, const at::Tensor& pooled, const at::Tensor& logits) {
  HeadArgs<T> a;
  a.x = x.data_ptr<T>();
  a.x_stride = x.stride(0);
  a.wp = wp.data_ptr<T>();
  a.bp = bp.data_ptr<T>();
  a.w = w.data_ptr<T>();
  a.b = b.data_ptr<T>();
  a.H = x.size(1);
  a.pooled = pooled.data_ptr<T>();
  a.logits = logits.data_ptr<T>();
  return a;
}

// Calls f(T{}) with T the C++ type of float32, float16 or bfloat16.
template <typename F>
void dispatch_float3(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, name, ": float32, float16 or bfloat16 expected, got ", t);
  }
}

HeadTensors head_inputs(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight, const at::Tensor& pooler_bias,
                        const at::Tensor& head_weight, const at::Tensor& head_bias) {
  TORCH_CHECK(cls_hidden.device().is_cpu(), "cpp_head (CPU): tensors must be on the CPU");
  return head_tensors(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias);
}

}  // namespace

void rule_rows(ExitCall& call, int64_t C, int64_t r0, int64_t nb, const float* zf) {
  const float* halting = call.halting.defined() ? call.halting.data_ptr<float>() : nullptr;
  bool* exits = call.exits.data_ptr<bool>();
  float* returned = call.returned.data_ptr<float>();
  const WriteBack& wb = call.write_back;
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t row = r0 + r;
    const float h = halting != nullptr ? halting[row] : std::numeric_limits<float>::quiet_NaN();
    float* out = returned + row * C;
    const bool e = apply_rule(call.params, call.state, row, zf + r * C, h, out);
    exits[row] = e;
    const int64_t dst = (e && wb.logits != nullptr) ? wb.rows[row] : -1;
    if (dst >= 0 && dst < wb.batch) {
      for (int64_t c = 0; c < C; ++c) store_out(wb, dst * wb.logits_stride + c, out[c]);
      wb.exit_layer[dst] = call.params.layer;
      wb.layers_run[dst] = wb.runs[row];
    }
  }
}

void finish_survivors(ExitCall& call, int64_t n) {
  if (!(call.params.flags & kSurvivors)) {
    call.count.fill_(-1);
    return;
  }
  const bool* exits = call.exits.data_ptr<bool>();
  int64_t kept = 0;
  int64_t* survivors = call.survivors.data_ptr<int64_t>();
  // survivors[0..kept): the staying rows in increasing order; then the exiting rows in
  // decreasing order, so that the list is a permutation (the engine gathers by all of it).
  for (int64_t row = 0; row < n; ++row) {
    if (!exits[row]) {
      if (survivors != nullptr) survivors[kept] = row;
      ++kept;
    } else if (survivors != nullptr) {
      survivors[n - 1 - (row - kept)] = row;
    }
  }
  call.count.fill_(survivors != nullptr ? kept : int64_t(-1));
}

std::tuple<at::Tensor, at::Tensor> head_cpu(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight,
                                            const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                            const at::Tensor& head_bias) {
  HeadTensors in = head_inputs(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias);
  dispatch_float3(in.x.scalar_type(), "cpp_head", [&](auto tag) {
    using scalar_t = decltype(tag);
    auto a = head_args<scalar_t>(in.x, in.wp, in.bp, in.w, in.b, in.pooled, in.logits);
    run_cpu<scalar_t>(nullptr, in.x.size(0), in.w.size(0), nullptr, 0, &a);
  });
  return {in.pooled, in.logits};
}

ExitResult exit_step_cpu(const at::Tensor& logits, EEK_EXIT_ARGS) {
  at::Tensor z = as_rule_input(logits);
  const int64_t n = z.size(0), C = z.size(1);
  ExitCall call = prepare_exit_call(n, C, z.device(), halting, state, kind, flags, layer, num_layers, int_param,
                                    scalar, per_layer, rows, runs, out_logits, out_exit_layer, out_layers_run);
  dispatch_float3(z.scalar_type(), "cpp_exit_step", [&](auto tag) {
    using scalar_t = decltype(tag);
    run_cpu<scalar_t>(&call, n, C, z.data_ptr<scalar_t>(), z.stride(0), nullptr);
  });
  return exit_result(call);
}

HeadExitResult packed_head_exit_step_cpu(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight_t,
                                         const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                         const at::Tensor& head_bias, EEK_EXIT_ARGS) {
  TORCH_CHECK(cls_hidden.device().is_cpu(), "cpp_packed_head_exit_step: tensors must be on the CPU (it has no GPU kernel)");
  TORCH_CHECK(cls_hidden.scalar_type() == at::kFloat,
              "cpp_packed_head_exit_step: float32 expected, got ", cls_hidden.scalar_type(),
              "; use cpp_head_exit_step for float16 and bfloat16");
  // W_p^T has W_p's shape [H, H], so the shared checks hold for it.
  HeadTensors in = head_inputs(cls_hidden, pooler_weight_t, pooler_bias, head_weight, head_bias);
  const int64_t n = in.x.size(0), C = in.w.size(0);
  ExitCall call = prepare_exit_call(n, C, in.x.device(), halting, state, kind, flags, layer, num_layers, int_param,
                                    scalar, per_layer, rows, runs, out_logits, out_exit_layer, out_layers_run);
  auto a = head_args<float>(in.x, in.wp, in.bp, in.w, in.b, in.pooled, in.logits);
  a.wp_transposed = true;
  run_cpu<float>(&call, n, C, nullptr, 0, &a);
  return head_exit_result(call, in.logits, in.pooled);
}

HeadExitResult head_exit_step_cpu(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight,
                                  const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                  const at::Tensor& head_bias, EEK_EXIT_ARGS) {
  HeadTensors in = head_inputs(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias);
  const int64_t n = in.x.size(0), C = in.w.size(0);
  ExitCall call = prepare_exit_call(n, C, in.x.device(), halting, state, kind, flags, layer, num_layers, int_param,
                                    scalar, per_layer, rows, runs, out_logits, out_exit_layer, out_layers_run);
  dispatch_float3(in.x.scalar_type(), "cpp_head_exit_step", [&](auto tag) {
    using scalar_t = decltype(tag);
    auto a = head_args<scalar_t>(in.x, in.wp, in.bp, in.w, in.b, in.pooled, in.logits);
    run_cpu<scalar_t>(&call, n, C, nullptr, 0, &a);
  });
  return head_exit_result(call, in.logits, in.pooled);
}

}  // namespace eek
