// earlyexit_kernels._C: the schemas of the C++ operators and their CPU kernels.
//
// The ops live in the `earlyexit` namespace, which the Triton backend also uses from
// Python (torch.library.triton_op), so they are prefixed `cpp_` and registered as a
// library fragment. The CUDA kernels are registered by bindings_cuda.cpp, compiled
// only in a CUDA build (EEK_WITH_CUDA). Python adds the fake (meta) kernels.
#include <Python.h>
#include <torch/library.h>

#include "cpu/pooler_head_cpu.h"
#include "ops.h"

TORCH_LIBRARY_FRAGMENT(earlyexit, m) {
  // The default head: pooled = tanh(W_p x + b_p) and logits = W pooled + b, in x's dtype.
  m.def(
      "cpp_head(Tensor cls_hidden, Tensor pooler_weight, Tensor pooler_bias, Tensor head_weight, Tensor head_bias)"
      " -> (Tensor pooled, Tensor logits)");
  // The exit rule on given logits. state: the policy's state tensors in the order of
  // cpp_backend.STATE_KEYS; returns the updated ones in the same order as state0 and state1
  // (empty where the policy has fewer). With the write-back
  // tensors given, the exiting rows' returned logits, exit layer and runs are scattered to
  // rows[i] of the batch outputs.
  m.def(
      "cpp_exit_step(Tensor logits, Tensor? halting, Tensor[] state, int kind, int flags, int layer, int num_layers,"
      " int int_param, float scalar, Tensor per_layer, Tensor? rows=None, Tensor? runs=None,"
      " Tensor(a!)? out_logits=None, Tensor(b!)? out_exit_layer=None, Tensor(c!)? out_layers_run=None)"
      " -> (Tensor exits, Tensor returned, Tensor state0, Tensor state1, Tensor survivors, Tensor count)");
  // The head fused with the exit rule (policies without a halting head).
  m.def(
      "cpp_head_exit_step(Tensor cls_hidden, Tensor pooler_weight, Tensor pooler_bias, Tensor head_weight,"
      " Tensor head_bias, Tensor? halting, Tensor[] state, int kind, int flags, int layer, int num_layers,"
      " int int_param, float scalar, Tensor per_layer, Tensor? rows=None, Tensor? runs=None,"
      " Tensor(a!)? out_logits=None, Tensor(b!)? out_exit_layer=None, Tensor(c!)? out_layers_run=None)"
      " -> (Tensor exits, Tensor returned, Tensor logits, Tensor pooled, Tensor state0, Tensor state1,"
      " Tensor survivors, Tensor count)");
  // The same on the CPU in float32, the pooler weight given transposed: pooler_weight_t is
  // W_p.t().contiguous() [H_in, H_out], packed once per weight by the caller.
  m.def(
      "cpp_packed_head_exit_step(Tensor cls_hidden, Tensor pooler_weight_t, Tensor pooler_bias, Tensor head_weight,"
      " Tensor head_bias, Tensor? halting, Tensor[] state, int kind, int flags, int layer, int num_layers,"
      " int int_param, float scalar, Tensor per_layer, Tensor? rows=None, Tensor? runs=None,"
      " Tensor(a!)? out_logits=None, Tensor(b!)? out_exit_layer=None, Tensor(c!)? out_layers_run=None)"
      " -> (Tensor exits, Tensor returned, Tensor logits, Tensor pooled, Tensor state0, Tensor state1,"
      " Tensor survivors, Tensor count)");
  // The whole per-layer step of an exit head on the CPU in float32: each row of hidden [n, S, H]
  // pooled (pooling 0: its [CLS] token; 1: the mean of its tokens where mask [n, S] is nonzero,
  // all of them without a mask), then LayerNorm where norm_weight/norm_bias [H] are given, the
  // first Linear (dense_weight_t [H, M], its weight transposed; dense_bias [M]), the activation
  // (0: tanh, the model's pooler; 1: GELU, an MLP head), the last Linear (out_weight [C, M],
  // out_bias [C]) and the rule, as cpp_head_exit_step. `pooled` is the pooled row [n, H] on the
  // CPU ([0, H] on a GPU). CPU: hidden float32 or bfloat16 (logits and pooled in its dtype), the
  // weights float32 (a bfloat16 head's, converted exactly). CUDA: every tensor in the hidden
  // states' dtype (float32, float16 or bfloat16), dense_weight_t a contiguous weight's .t().
  m.def(
      "cpp_pooled_head_exit_step(Tensor hidden, Tensor? mask, int pooling, Tensor? norm_weight, Tensor? norm_bias,"
      " float norm_eps, Tensor dense_weight_t, Tensor dense_bias, int activation, Tensor out_weight, Tensor out_bias,"
      " Tensor? halting, Tensor[] state, int kind, int flags, int layer, int num_layers,"
      " int int_param, float scalar, Tensor per_layer, Tensor? rows=None, Tensor? runs=None,"
      " Tensor(a!)? out_logits=None, Tensor(b!)? out_exit_layer=None, Tensor(c!)? out_layers_run=None)"
      " -> (Tensor exits, Tensor returned, Tensor logits, Tensor pooled, Tensor state0, Tensor state1,"
      " Tensor survivors, Tensor count)");
  // Gather rows `index` of hidden [n, S, H] and mask [n, S], keep the first seq_len positions.
  // The second output is an empty tensor when mask is None.
  m.def("cpp_compact(Tensor hidden, Tensor? mask, Tensor index, int seq_len) -> (Tensor hidden, Tensor mask)");
  // The graphed step's bookkeeping after a layer where rows may leave, in one launch: with order [n]
  // the exit kernel's survivor permutation, next_rows[i] = dead if exits[order[i]] else
  // rows[order[i]], count (one int64) = how many of next_rows are not dead, written to host_count
  // too where given (pinned host memory, which a GPU writes directly), and row i of every
  // targets[t] = row order[i] of sources[t] (same shape and dtype, rows contiguous; a target never
  // overlaps a source).
  m.def(
      "cpp_gather_survivors(Tensor order, Tensor exits, Tensor rows, int dead, Tensor(a!) next_rows, Tensor(b!) count,"
      " Tensor[] sources, Tensor(c!)[] targets, Tensor(d!)? host_count=None) -> ()");
  // The continuous engine's paged token pool [T, H] (page_table [slots, pages] and lengths
  // [slots], int64, on the host): a layer call's rows [m, padded_length, H] and their mask
  // [m, padded_length] gathered from it, or, where resident_of[i] >= 0, from row row_of[i] of
  // residents[resident_of[i]] (an earlier call's output); and a call's output rows written to it
  // (slots[i] = -1: row i is not).
  m.def(
      "cpp_pool_gather(Tensor pool, Tensor page_table, Tensor lengths, int page_size, int[] slots,"
      " int padded_length, Tensor[] residents, int[] resident_of, int[] row_of) -> (Tensor hidden, Tensor mask)");
  m.def(
      "cpp_pool_scatter(Tensor(a!) pool, Tensor page_table, Tensor lengths, int page_size, int[] slots,"
      " Tensor hidden) -> ()");
  // A BERT-style encoder layer on hidden [n, S, H] with the layer's SDPA mask (or None): weights are
  // query, key, value, attention output, its LayerNorm, intermediate, output, its LayerNorm (weight
  // and bias each, 16 tensors); GELU (exact) in the feed-forward. Returns [n, S, H].
  m.def(
      "cpp_bert_layer(Tensor hidden, Tensor? mask, Tensor[] weights, float attention_eps, float output_eps,"
      " int head_size, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(earlyexit, CPU, m) {
  m.impl("cpp_head", &eek::head_cpu);
  m.impl("cpp_exit_step", &eek::exit_step_cpu);
  m.impl("cpp_head_exit_step", &eek::head_exit_step_cpu);
  m.impl("cpp_packed_head_exit_step", &eek::packed_head_exit_step_cpu);
  m.impl("cpp_pooled_head_exit_step", &eek::pooled_head_exit_step_cpu);
  m.impl("cpp_compact", &eek::compact_cpu);
  m.impl("cpp_gather_survivors", &eek::gather_survivors_cpu);
  m.impl("cpp_pool_gather", &eek::pool_gather_cpu);
  m.impl("cpp_pool_scatter", &eek::pool_scatter_cpu);
  m.impl("cpp_bert_layer", &eek::bert_layer_cpu);
}

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define EEK_CONCAT_(a, b) a##b
#define EEK_CONCAT(a, b) EEK_CONCAT_(a, b)
#define EEK_STR_(a) #a
#define EEK_STR(a) EEK_STR_(a)
#ifndef EEK_TORCH_VERSION
#define EEK_TORCH_VERSION "unknown"
#endif

// A plain Python module: importing it runs the registrations above.
extern "C" PyObject* EEK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, EEK_STR(TORCH_EXTENSION_NAME),
                                          "earlyexit_kernels C++ operators (torch.ops.earlyexit.cpp_*)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef EEK_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  PyModule_AddStringConstant(module, "TORCH_VERSION", EEK_TORCH_VERSION);
  PyModule_AddStringConstant(module, "CPU_HEAD_ISA", eek::pooler_head_isa());
  return module;
}
