// Host-side preparation of an exit-step call, shared by the CPU and the CUDA op
// implementations: argument checks, the lowered RuleParams, the new state tensors,
// the outputs and the raw pointers the kernels read. Torch headers: .cpp files only.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "exit_rule.h"

namespace eek {

struct ExitCall {
  RuleParams params{};
  StateArgs state{};
  WriteBack write_back{};
  int64_t n = 0;
  at::Tensor halting;  // float32 [n] contiguous, or undefined
  at::Tensor exits, returned, survivors, count;
  std::vector<at::Tensor> new_state;
  std::vector<at::Tensor> inputs;  // contiguous copies kept alive for the kernels
};

inline at::Tensor state_tensor(const std::vector<at::Tensor>& state, size_t i, at::ScalarType dtype,
                               at::IntArrayRef shape, const at::Device& device, const char* what) {
  TORCH_CHECK(state.size() > i, "cpp_exit_step: missing state tensor '", what, "'");
  const at::Tensor& t = state[i];
  TORCH_CHECK(t.scalar_type() == dtype, "cpp_exit_step: state '", what, "' must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "cpp_exit_step: state '", what, "' must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == device, "cpp_exit_step: state '", what, "' is on ", t.device(), " but the logits are on ",
              device);
  return t.contiguous();
}

inline int out_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kOutF32;
    case at::kHalf:
      return kOutF16;
    case at::kBFloat16:
      return kOutBF16;
    default:
      TORCH_CHECK(false, "cpp_exit_step: out_logits must be float32, float16 or bfloat16, got ", t);
  }
  return kOutF32;
}

// n rows, C labels on `device`. Allocates the outputs and fills every pointer.
inline ExitCall prepare_exit_call(int64_t n, int64_t C, const at::Device& device,
                                  const std::optional<at::Tensor>& halting, const std::vector<at::Tensor>& state,
                                  int64_t kind, int64_t flags, int64_t layer, int64_t num_layers, int64_t int_param,
                                  double scalar, const at::Tensor& per_layer, const std::optional<at::Tensor>& rows,
                                  const std::optional<at::Tensor>& runs, const std::optional<at::Tensor>& out_logits,
                                  const std::optional<at::Tensor>& out_exit_layer,
                                  const std::optional<at::Tensor>& out_layers_run) {
  TORCH_CHECK(kind >= 0 && kind < kNumKinds, "cpp_exit_step: unknown policy kind ", kind);
  TORCH_CHECK(num_layers >= 1 && layer >= 1 && layer <= num_layers, "cpp_exit_step: layer ", layer,
              " outside 1..", num_layers);
  TORCH_CHECK(C >= 1, "cpp_exit_step: need at least one label");
  TORCH_CHECK(per_layer.device().is_cpu() && per_layer.scalar_type() == at::kFloat && per_layer.dim() == 2 &&
                  per_layer.size(0) == 2 && per_layer.size(1) >= layer,
              "cpp_exit_step: per_layer must be a float32 CPU tensor [2, >= layer]");
  ExitCall call;
  call.n = n;
  RuleParams& p = call.params;
  p.kind = static_cast<int>(kind);
  p.flags = static_cast<int>(flags);
  p.layer = static_cast<int>(layer);
  p.num_layers = static_cast<int>(num_layers);
  p.num_labels = static_cast<int>(C);
  p.int_param = static_cast<int>(int_param);
  auto values = per_layer.accessor<float, 2>();
  p.threshold = values[0][layer - 1];
  p.temperature = values[1][layer - 1];
  p.scalar = static_cast<float>(scalar);
  p.log_c = static_cast<float>(std::log(static_cast<double>(C)));

  const bool needs_halting = kind == kQExit || kind == kDact;
  if (needs_halting) {
    TORCH_CHECK(halting.has_value() && halting->defined(), "cpp_exit_step: this policy needs the halting logit");
  }
  if (halting.has_value() && halting->defined()) {
    TORCH_CHECK(halting->dim() == 1 && halting->size(0) == n, "cpp_exit_step: halting_logit must be [", n, "]");
    TORCH_CHECK(halting->device() == device, "cpp_exit_step: halting_logit is on the wrong device");
    TORCH_CHECK(at::isFloatingType(halting->scalar_type()), "cpp_exit_step: halting_logit must be floating point");
    call.halting = halting->to(at::kFloat).contiguous();
  }

  auto i64 = at::TensorOptions().dtype(at::kLong).device(device);
  auto i32 = at::TensorOptions().dtype(at::kInt).device(device);
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  StateArgs& s = call.state;
  auto keep = [&](at::Tensor t) {
    call.inputs.push_back(t);
    return t;
  };
  switch (kind) {
    case kPatience: {
      TORCH_CHECK(C >= 1, "Patience needs labels");
      s.i64_in = keep(state_tensor(state, 0, at::kLong, {n}, device, "prev_pred")).data_ptr<int64_t>();
      s.i32_in = keep(state_tensor(state, 1, at::kInt, {n}, device, "counter")).data_ptr<int32_t>();
      call.new_state = {at::empty({n}, i64), at::empty({n}, i32)};
      s.i64_out = call.new_state[0].data_ptr<int64_t>();
      s.i32_out = call.new_state[1].data_ptr<int32_t>();
      break;
    }
    case kPatienceReg: {
      s.f0_in = keep(state_tensor(state, 0, at::kFloat, {n}, device, "prev_value")).data_ptr<float>();
      s.i32_in = keep(state_tensor(state, 1, at::kInt, {n}, device, "counter")).data_ptr<int32_t>();
      call.new_state = {at::empty({n}, f32), at::empty({n}, i32)};
      s.f0_out = call.new_state[0].data_ptr<float>();
      s.i32_out = call.new_state[1].data_ptr<int32_t>();
      break;
    }
    case kQExit: {
      s.f0_in = keep(state_tensor(state, 0, at::kFloat, {n}, device, "cdf")).data_ptr<float>();
      s.f1_in = keep(state_tensor(state, 1, at::kFloat, {n}, device, "remaining")).data_ptr<float>();
      if (flags & kStochastic) {
        TORCH_CHECK(state.size() > 2 && state[2].dim() == 2 && state[2].size(0) == n &&
                        state[2].size(1) >= layer,
                    "cpp_exit_step: stochastic QExit needs the uniforms [n, L]");
        at::Tensor u = keep(state_tensor(state, 2, at::kFloat, state[2].sizes(), device, "uniforms"));
        s.uniforms = u.data_ptr<float>();
        s.uniforms_stride = u.size(1);
      }
      call.new_state = {at::empty({n}, f32), at::empty({n}, f32)};
      s.f0_out = call.new_state[0].data_ptr<float>();
      s.f1_out = call.new_state[1].data_ptr<float>();
      break;
    }
    case kVoting: {
      TORCH_CHECK(C >= 2, "Voting needs num_labels >= 2");
      s.vi_in = keep(state_tensor(state, 0, at::kInt, {n, C}, device, "votes")).data_ptr<int32_t>();
      s.vf_in = keep(state_tensor(state, 1, at::kFloat, {n, C}, device, "prob_sum")).data_ptr<float>();
      call.new_state = {at::empty({n, C}, i32), at::empty({n, C}, f32)};
      s.vi_out = call.new_state[0].data_ptr<int32_t>();
      s.vf_out = call.new_state[1].data_ptr<float>();
      break;
    }
    case kDact: {
      TORCH_CHECK(C >= 2, "DACT needs num_labels >= 2");
      s.vf_in = keep(state_tensor(state, 0, at::kFloat, {n, C}, device, "accumulated")).data_ptr<float>();
      s.f0_in = keep(state_tensor(state, 1, at::kFloat, {n}, device, "pi")).data_ptr<float>();
      call.new_state = {at::empty({n, C}, f32), at::empty({n}, f32)};
      s.vf_out = call.new_state[0].data_ptr<float>();
      s.f0_out = call.new_state[1].data_ptr<float>();
      break;
    }
    case kScheduled: {
      s.i64_in = keep(state_tensor(state, 0, at::kLong, {n}, device, "exit_layers")).data_ptr<int64_t>();
      break;
    }
    default:
      break;
  }

  call.exits = at::empty({n}, at::TensorOptions().dtype(at::kBool).device(device));
  call.returned = at::empty({n, C}, f32);
  call.count = at::empty({}, i64);
  call.survivors = at::empty({(flags & kSurvivors) ? n : 0}, i64);

  if (out_logits.has_value() && out_logits->defined()) {
    TORCH_CHECK(rows.has_value() && runs.has_value() && out_exit_layer.has_value() && out_layers_run.has_value(),
                "cpp_exit_step: the write-back needs rows, runs, out_logits, out_exit_layer and out_layers_run");
    const at::Tensor& ol = *out_logits;
    const at::Tensor& oe = *out_exit_layer;
    const at::Tensor& orun = *out_layers_run;
    TORCH_CHECK(ol.dim() == 2 && ol.size(1) == C && ol.stride(1) == 1 && ol.device() == device,
                "cpp_exit_step: out_logits must be [B, C] with unit stride over C on the logits' device");
    const int64_t B = ol.size(0);
    TORCH_CHECK(oe.scalar_type() == at::kLong && oe.dim() == 1 && oe.size(0) == B && oe.is_contiguous() &&
                    oe.device() == device,
                "cpp_exit_step: out_exit_layer must be a contiguous int64 [B]");
    TORCH_CHECK(orun.scalar_type() == at::kLong && orun.dim() == 1 && orun.size(0) == B && orun.is_contiguous() &&
                    orun.device() == device,
                "cpp_exit_step: out_layers_run must be a contiguous int64 [B]");
    at::Tensor r = keep(rows->to(at::kLong).contiguous());
    at::Tensor ru = keep(runs->to(at::kLong).contiguous());
    TORCH_CHECK(r.dim() == 1 && r.size(0) == n && ru.dim() == 1 && ru.size(0) == n && r.device() == device &&
                    ru.device() == device,
                "cpp_exit_step: rows and runs must be [", n, "] on the logits' device");
    if (device.is_cpu() && n > 0) {  // on a GPU this would sync; the kernel skips such rows instead
      const int64_t* p = r.data_ptr<int64_t>();
      const auto [lo, hi] = std::minmax_element(p, p + n);
      TORCH_CHECK(*lo >= 0 && *hi < B, "cpp_exit_step: rows must index the batch of ", B, ", got values in [", *lo,
                  ", ", *hi, "]");
    }
    WriteBack& wb = call.write_back;
    wb.logits = ol.data_ptr();
    wb.out_dtype = out_dtype_code(ol.scalar_type());
    wb.logits_stride = ol.stride(0);
    wb.exit_layer = oe.data_ptr<int64_t>();
    wb.layers_run = orun.data_ptr<int64_t>();
    wb.rows = r.data_ptr<int64_t>();
    wb.runs = ru.data_ptr<int64_t>();
    wb.batch = B;
  }
  return call;
}

// The new state as two tensors (every policy has at most two; an unused one is empty): a
// Tensor[] output would keep torch.compile from functionalizing the ops' write-back.
using ExitResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using HeadExitResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline at::Tensor new_state_at(const ExitCall& call, size_t i) {
  if (i < call.new_state.size()) return call.new_state[i];
  return at::empty({0}, call.exits.options().dtype(at::kFloat));
}

// (exits, returned, state0, state1, survivors, count)
inline ExitResult exit_result(const ExitCall& call) {
  return {call.exits, call.returned, new_state_at(call, 0), new_state_at(call, 1), call.survivors, call.count};
}

// (exits, returned, logits, pooled, state0, state1, survivors, count)
inline HeadExitResult head_exit_result(const ExitCall& call, const at::Tensor& logits, const at::Tensor& pooled) {
  return {call.exits,           call.returned,         logits,         pooled,
          new_state_at(call, 0), new_state_at(call, 1), call.survivors, call.count};
}

// Checks shared by the head ops; returns the row stride of cls_hidden (unit stride over H required,
// otherwise the caller makes it contiguous first).
inline void check_head_args(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& bp, const at::Tensor& w,
                            const at::Tensor& b) {
  TORCH_CHECK(x.dim() == 2, "cpp_head: cls_hidden must be [n, H], got ", x.sizes());
  const int64_t H = x.size(1);
  TORCH_CHECK(wp.dim() == 2 && wp.size(0) == H && wp.size(1) == H, "cpp_head: pooler_weight must be [H, H]");
  TORCH_CHECK(bp.dim() == 1 && bp.size(0) == H, "cpp_head: pooler_bias must be [H]");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == H && w.size(0) >= 1, "cpp_head: head_weight must be [C, H]");
  TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "cpp_head: head_bias must be [C]");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "cpp_head: float32, float16 or bfloat16 expected, got ", t);
  for (const at::Tensor* other : {&wp, &bp, &w, &b}) {
    TORCH_CHECK(other->scalar_type() == t, "cpp_head: the weights must have the hidden states' dtype ", t);
    TORCH_CHECK(other->device() == x.device(), "cpp_head: the weights must be on the hidden states' device");
  }
}

// The head's inputs as the kernels read them (unit stride over H, contiguous weights) and
// its new outputs pooled [n, H] and logits [n, C]; the CPU and the CUDA ops share it.
struct HeadTensors {
  at::Tensor x, wp, bp, w, b, pooled, logits;
};

inline HeadTensors head_tensors(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight,
                                const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                const at::Tensor& head_bias) {
  check_head_args(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias);
  HeadTensors in;
  in.x = (cls_hidden.size(1) > 1 && cls_hidden.stride(1) != 1) ? cls_hidden.contiguous() : cls_hidden;
  in.wp = pooler_weight.contiguous();
  in.bp = pooler_bias.contiguous();
  in.w = head_weight.contiguous();
  in.b = head_bias.contiguous();
  const int64_t n = in.x.size(0), H = in.x.size(1), C = in.w.size(0);
  in.pooled = at::empty({n, H}, cls_hidden.options());
  in.logits = at::empty({n, C}, cls_hidden.options());
  return in;
}

}  // namespace eek
