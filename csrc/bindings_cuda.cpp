// The CUDA kernels of the earlyexit::cpp_* operators (schemas in bindings.cpp). Compiled
// only in a CUDA build (setup.py defines EEK_WITH_CUDA); the kernels themselves are in
// csrc/cuda/*.cu, plain CUDA C++ without torch headers, launched on the current stream of
// the tensors' device (a guard makes it current for the call).
#ifdef EEK_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/launchers.h"
#include "ops.h"

namespace eek {
namespace {

cuda::DType dtype_of(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return cuda::kF32;
    case at::kHalf:
      return cuda::kF16;
    case at::kBFloat16:
      return cuda::kBF16;
    default:
      TORCH_CHECK(false, name, ": float32, float16 or bfloat16 expected, got ", t);
  }
  return cuda::kF32;
}

void check_launch(cudaError_t err, const char* name) {
  TORCH_CHECK(err == cudaSuccess, name, ": CUDA launch failed: ", cudaGetErrorString(err));
}

struct HeadInputs : HeadTensors {
  at::Tensor partials;  // [head_tiles(H), n, C] float32: each feature tile's share of the logits
  cuda::HeadPtrs ptrs;
};

HeadInputs head_inputs(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight, const at::Tensor& pooler_bias,
                       const at::Tensor& head_weight, const at::Tensor& head_bias) {
  TORCH_CHECK(cls_hidden.is_cuda(), "cpp_head (CUDA): tensors must be on a CUDA device");
  HeadInputs in;
  static_cast<HeadTensors&>(in) = head_tensors(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias);
  const int64_t n = in.x.size(0), H = in.x.size(1), C = in.w.size(0);
  in.partials = at::empty({cuda::head_tiles(H), n, C}, in.x.options().dtype(at::kFloat));
  cuda::HeadPtrs& p = in.ptrs;
  p.x = in.x.data_ptr();
  p.x_stride = in.x.stride(0);
  p.wp = in.wp.data_ptr();
  p.bp = in.bp.data_ptr();
  p.w = in.w.data_ptr();
  p.b = in.b.data_ptr();
  p.H = H;
  p.M = H;
  p.pooled = in.pooled.data_ptr();
  p.logits = in.logits.data_ptr();
  p.partials = in.partials.data_ptr<float>();
  return in;
}

cuda::RulePtrs rule_ptrs(ExitCall& call) {
  cuda::RulePtrs r;
  r.halting = call.halting.defined() ? call.halting.data_ptr<float>() : nullptr;
  r.exits = call.exits.data_ptr<bool>();
  r.returned = call.returned.data_ptr<float>();
  r.survivors = call.survivors.numel() > 0 ? call.survivors.data_ptr<int64_t>() : nullptr;
  r.count = call.count.data_ptr<int64_t>();
  return r;
}

std::tuple<at::Tensor, at::Tensor> head_cuda(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight,
                                             const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                             const at::Tensor& head_bias) {
  c10::cuda::CUDAGuard guard(cls_hidden.device());
  HeadInputs in = head_inputs(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias);
  RuleParams params{};
  check_launch(cuda::launch_head_exit(dtype_of(in.x.scalar_type(), "cpp_head"), in.x.size(0), in.w.size(0),
                                      &in.ptrs, nullptr, 0, params, StateArgs{}, WriteBack{}, nullptr,
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "cpp_head");
  return {in.pooled, in.logits};
}

ExitResult exit_step_cuda(const at::Tensor& logits, EEK_EXIT_ARGS) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_cuda(), "cpp_exit_step (CUDA): logits must be [n, C] on a GPU");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "cpp_exit_step: logits must be floating point");
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor z = logits;
  const auto t = z.scalar_type();
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) z = z.to(at::kFloat);
  if (z.size(1) > 1 && z.stride(1) != 1) z = z.contiguous();
  const int64_t n = z.size(0), C = z.size(1);
  ExitCall call = prepare_exit_call(n, C, z.device(), halting, state, kind, flags, layer, num_layers, int_param,
                                    scalar, per_layer, rows, runs, out_logits, out_exit_layer, out_layers_run);
  cuda::RulePtrs r = rule_ptrs(call);
  check_launch(cuda::launch_head_exit(dtype_of(z.scalar_type(), "cpp_exit_step"), n, C, nullptr, z.data_ptr(),
                                      z.stride(0), call.params, call.state, call.write_back, &r,
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "cpp_exit_step");
  return exit_result(call);
}

HeadExitResult head_exit_step_cuda(const at::Tensor& cls_hidden, const at::Tensor& pooler_weight,
                                   const at::Tensor& pooler_bias, const at::Tensor& head_weight,
                                   const at::Tensor& head_bias, EEK_EXIT_ARGS) {
  c10::cuda::CUDAGuard guard(cls_hidden.device());
  HeadInputs in = head_inputs(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias);
  const int64_t n = in.x.size(0), C = in.w.size(0);
  ExitCall call = prepare_exit_call(n, C, in.x.device(), halting, state, kind, flags, layer, num_layers, int_param,
                                    scalar, per_layer, rows, runs, out_logits, out_exit_layer, out_layers_run);
  cuda::RulePtrs r = rule_ptrs(call);
  check_launch(cuda::launch_head_exit(dtype_of(in.x.scalar_type(), "cpp_head_exit_step"), n, C, &in.ptrs, nullptr, 0,
                                      call.params, call.state, call.write_back, &r,
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "cpp_head_exit_step");
  return head_exit_result(call, in.logits, in.pooled);
}

// cpp_pooled_head_exit_step on a GPU: the pooling (and LayerNorm) kernel unless the head reads
// the [CLS] rows as they are, then the head and the rule as in head_exit_step_cuda. Every
// tensor in the hidden states' dtype; dense_weight_t [H, M] is the transpose of a contiguous
// [M, H] weight (the caller passes weight.t(), a view: no copy).
HeadExitResult pooled_head_exit_step_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& mask,
                                          int64_t pooling, const std::optional<at::Tensor>& norm_weight,
                                          const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                          const at::Tensor& dense_weight_t, const at::Tensor& dense_bias,
                                          int64_t activation, const at::Tensor& out_weight, const at::Tensor& out_bias,
                                          EEK_EXIT_ARGS) {
  const char* name = "cpp_pooled_head_exit_step";
  TORCH_CHECK(hidden.dim() == 3 && hidden.is_cuda(), name, " (CUDA): hidden must be [n, S, H] on a GPU, got ",
              hidden.sizes());
  TORCH_CHECK(pooling == 0 || pooling == 1, name, ": pooling must be 0 ([CLS]) or 1 (mean), got ", pooling);
  TORCH_CHECK(activation == 0 || activation == 1, name, ": activation must be 0 (tanh) or 1 (GELU), got ", activation);
  c10::cuda::CUDAGuard guard(hidden.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::DType dtype = dtype_of(hidden.scalar_type(), name);
  const at::Tensor x = hidden.size(2) > 1 && hidden.stride(2) != 1 ? hidden.contiguous() : hidden;
  const int64_t n = x.size(0), S = x.size(1), H = x.size(2);
  TORCH_CHECK(S >= 1 || n == 0, name, ": hidden has no positions");
  TORCH_CHECK(dense_weight_t.dim() == 2 && dense_weight_t.size(0) == H, name, ": dense_weight_t must be [H, M] with H = ",
              H, ", got ", dense_weight_t.sizes());
  const int64_t M = dense_weight_t.size(1);
  TORCH_CHECK(out_weight.dim() == 2 && out_weight.size(1) == M && out_weight.size(0) >= 1, name,
              ": out_weight must be [C, M] with M = ", M, ", got ", out_weight.sizes());
  const int64_t C = out_weight.size(0);
  const bool norm = norm_weight.has_value() && norm_weight->defined();
  TORCH_CHECK(norm == (norm_bias.has_value() && norm_bias->defined()), name,
              ": give both norm_weight and norm_bias, or neither");
  auto check = [&](const at::Tensor& t, int64_t size, const char* what) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), name, ": ", what,
                " must be in the hidden states' dtype and on their device");
    TORCH_CHECK(size < 0 || (t.dim() == 1 && t.size(0) == size), name, ": ", what, " must be [", size, "], got ",
                t.sizes());
  };
  auto same = [&](const at::Tensor& t, int64_t size, const char* what) {
    check(t, size, what);
    return t.contiguous();
  };
  check(dense_weight_t, -1, "dense_weight_t");
  // [M, H]: no copy when given a contiguous weight's .t()
  const at::Tensor wp = dense_weight_t.t().contiguous();
  const at::Tensor bp = same(dense_bias, M, "dense_bias"), w = same(out_weight, -1, "out_weight");
  const at::Tensor b = same(out_bias, C, "out_bias");

  // [n, H] with row stride x.stride(0): the [CLS] rows in place
  at::Tensor rows_in = S > 0 ? x.select(1, 0) : at::zeros({n, H}, x.options());
  if (pooling == 1 || norm) {
    at::Tensor valid;
    if (pooling == 1 && mask.has_value() && mask->defined()) {
      TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n && mask->size(1) == S && mask->device() == x.device(), name,
                  ": mask must be [n, S] = [", n, ", ", S, "] on the hidden states' device, got ", mask->sizes());
      valid = mask->to(at::kLong).contiguous();
    }
    at::Tensor nw, nb;
    if (norm) {
      nw = same(*norm_weight, H, "norm_weight");
      nb = same(*norm_bias, H, "norm_bias");
    }
    rows_in = at::empty({n, H}, x.options());
    cuda::PoolArgs pa;
    pa.hidden = x.data_ptr();
    pa.stride_n = x.stride(0);
    pa.stride_s = x.stride(1);
    pa.n = n;
    pa.S = S;
    pa.H = H;
    pa.mask = valid.defined() ? valid.data_ptr<int64_t>() : nullptr;
    pa.mask_stride = S;
    pa.mean = pooling == 1;
    pa.norm_weight = norm ? nw.data_ptr() : nullptr;
    pa.norm_bias = norm ? nb.data_ptr() : nullptr;
    pa.eps = static_cast<float>(norm_eps);
    pa.out = rows_in.data_ptr();
    check_launch(cuda::launch_pool_norm(dtype, pa, stream), name);
  }
  at::Tensor logits = at::empty({n, C}, x.options());
  at::Tensor partials = at::empty({cuda::head_tiles(M), n, C}, x.options().dtype(at::kFloat));
  cuda::HeadPtrs p;
  p.x = rows_in.data_ptr();
  p.x_stride = rows_in.stride(0);
  p.wp = wp.data_ptr();
  p.bp = bp.data_ptr();
  p.w = w.data_ptr();
  p.b = b.data_ptr();
  p.H = H;
  p.M = M;
  p.gelu = activation == 1;
  p.logits = logits.data_ptr();
  p.partials = partials.data_ptr<float>();
  ExitCall call = prepare_exit_call(n, C, x.device(), halting, state, kind, flags, layer, num_layers, int_param, scalar,
                                    per_layer, rows, runs, out_logits, out_exit_layer, out_layers_run);
  cuda::RulePtrs r = rule_ptrs(call);
  check_launch(cuda::launch_head_exit(dtype, n, C, &p, nullptr, 0, call.params, call.state, call.write_back, &r, stream),
               name);
  return head_exit_result(call, logits, at::empty({0, H}, x.options()));
}

std::tuple<at::Tensor, at::Tensor> compact_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& mask,
                                                const at::Tensor& index, int64_t seq_len) {
  TORCH_CHECK(hidden.dim() == 3 && hidden.is_cuda(), "cpp_compact (CUDA): hidden must be [n, S, H] on a GPU");
  TORCH_CHECK(index.dim() == 1 && index.device() == hidden.device(),
              "cpp_compact: index must be 1-D on the hidden states' device");
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "cpp_compact: index must be int64 or int32");
  TORCH_CHECK(seq_len >= 0, "cpp_compact: seq_len must be >= 0");
  c10::cuda::CUDAGuard guard(hidden.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t n = hidden.size(0), S = hidden.size(1), H = hidden.size(2);
  const int64_t L = std::min(seq_len, S), m = index.size(0);
  at::Tensor idx = index.to(at::kLong).contiguous();
  at::Tensor h = (hidden.stride(2) == 1 || H <= 1) && (hidden.stride(1) == H || S <= 1) ? hidden : hidden.contiguous();
  at::Tensor out = at::empty({m, L, H}, hidden.options());
  const int64_t es = static_cast<int64_t>(h.element_size());
  check_launch(cuda::launch_compact(h.data_ptr(), h.stride(0) * es, n, out.data_ptr(), L * H * es,
                                    idx.data_ptr<int64_t>(), m, stream),
               "cpp_compact");
  at::Tensor out_mask;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n && mask->size(1) == S && mask->device() == hidden.device(),
                "cpp_compact: mask must be [n, S] on the hidden states' device");
    at::Tensor mk = (mask->stride(1) == 1 || S <= 1) ? *mask : mask->contiguous();
    out_mask = at::empty({m, L}, mask->options());
    const int64_t mes = static_cast<int64_t>(mk.element_size());
    check_launch(cuda::launch_compact(mk.data_ptr(), mk.stride(0) * mes, n, out_mask.data_ptr(), L * mes,
                                      idx.data_ptr<int64_t>(), m, stream),
                 "cpp_compact");
  } else {
    out_mask = at::empty({0}, hidden.options().dtype(at::kLong));
  }
  return {out, out_mask};
}

void gather_survivors_cuda(const at::Tensor& order, const at::Tensor& exits, const at::Tensor& rows, int64_t dead,
                           const at::Tensor& next_rows, const at::Tensor& count, at::TensorList sources,
                           at::TensorList targets, const std::optional<at::Tensor>& host_count) {
  static_assert(cuda::kMaxGatherCopies == kMaxSurvivorCopies, "one limit for both devices");
  TORCH_CHECK(order.is_cuda(), "cpp_gather_survivors (CUDA): order must be on a GPU");
  const std::vector<RowCopySpec> copies =
      survivor_copies(order, exits, rows, next_rows, count, sources, targets, host_count);
  c10::cuda::CUDAGuard guard(order.device());
  cuda::SurvivorGather a;
  a.n = order.size(0);
  a.order = order.data_ptr<int64_t>();
  a.exits = exits.data_ptr<bool>();
  a.rows = rows.data_ptr<int64_t>();
  a.dead = dead;
  a.next_rows = next_rows.data_ptr<int64_t>();
  a.count = count.data_ptr<int64_t>();
  a.host_count = host_count.has_value() && host_count->defined() ? host_count->data_ptr<int64_t>() : nullptr;
  a.num_copies = static_cast<int>(copies.size());
  for (size_t t = 0; t < copies.size(); ++t) {
    a.copies[t].src = copies[t].src;
    a.copies[t].dst = copies[t].dst;
    a.copies[t].src_stride = copies[t].src_stride;
    a.copies[t].dst_stride = copies[t].dst_stride;
    a.copies[t].bytes = copies[t].bytes;
  }
  check_launch(cuda::launch_gather_survivors(a, c10::cuda::getCurrentCUDAStream().stream()), "cpp_gather_survivors");
}

}  // namespace
}  // namespace eek

TORCH_LIBRARY_IMPL(earlyexit, CUDA, m) {
  m.impl("cpp_head", &eek::head_cuda);
  m.impl("cpp_exit_step", &eek::exit_step_cuda);
  m.impl("cpp_head_exit_step", &eek::head_exit_step_cuda);
  m.impl("cpp_pooled_head_exit_step", &eek::pooled_head_exit_step_cuda);
  m.impl("cpp_compact", &eek::compact_cuda);
  m.impl("cpp_gather_survivors", &eek::gather_survivors_cuda);
}

#endif  // EEK_WITH_CUDA
