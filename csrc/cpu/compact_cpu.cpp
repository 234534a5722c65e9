// CPU compaction gather: rows `index` of hidden [n, S, H] (and mask [n, S]) into a new
// contiguous [m, L, H] (and [m, L]) with L = min(seq_len, S). Each output row is one
// contiguous block of L*H elements taken from the start of its source row, so the copy
// is a memcpy per row, rows split over threads. Where nothing moves (the rows kept are the
// first m, in order, and no position is trimmed) the outputs are views of the inputs' first
// m rows: no copy at all.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "../ops.h"

namespace eek {
namespace {

// Copy `bytes` from the start of source row index[i] (row stride src_stride bytes) to
// output row i (contiguous). Returns false if an index is out of range.
bool gather_rows(const char* src, int64_t src_stride, int64_t n, char* dst, int64_t bytes, const int64_t* index,
                 int64_t m) {
  std::atomic<bool> ok{true};
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(bytes, 1));
  at::parallel_for(0, m, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = index[i];
      if (row < 0 || row >= n) {
        ok = false;
        continue;
      }
      std::memcpy(dst + i * bytes, src + row * src_stride, static_cast<size_t>(bytes));
    }
  });
  return ok;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compact_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& mask,
                                               const at::Tensor& index, int64_t seq_len) {
  TORCH_CHECK(hidden.dim() == 3, "cpp_compact: hidden must be [n, S, H], got ", hidden.sizes());
  TORCH_CHECK(index.dim() == 1, "cpp_compact: index must be 1-D");
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "cpp_compact: index must be int64 or int32");
  TORCH_CHECK(seq_len >= 0, "cpp_compact: seq_len must be >= 0");
  TORCH_CHECK(hidden.device().is_cpu() && index.device().is_cpu(), "cpp_compact (CPU): tensors must be on the CPU");
  const int64_t n = hidden.size(0), S = hidden.size(1), H = hidden.size(2);
  const int64_t L = std::min(seq_len, S);
  const int64_t m = index.size(0);
  at::Tensor idx = index.to(at::kLong).contiguous();
  if (L == S && m <= n && hidden.is_contiguous() && (!mask.has_value() || !mask->defined() || mask->is_contiguous())) {
    const int64_t* p = idx.data_ptr<int64_t>();
    bool in_place = true;
    for (int64_t i = 0; i < m && in_place; ++i) in_place = p[i] == i;
    if (in_place) {
      at::Tensor out_mask = at::empty({0}, hidden.options().dtype(at::kLong));
      if (mask.has_value() && mask->defined()) {
        TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n && mask->size(1) == S,
                    "cpp_compact: mask must be [n, S] = [", n, ", ", S, "], got ", mask->sizes());
        out_mask = mask->narrow(0, 0, m);
      }
      return {hidden.narrow(0, 0, m), out_mask};
    }
  }
  // Only the row stride may be arbitrary; otherwise work on a contiguous copy.
  at::Tensor h = (hidden.stride(2) == 1 || H <= 1) && (hidden.stride(1) == H || S <= 1) ? hidden : hidden.contiguous();
  at::Tensor out = at::empty({m, L, H}, hidden.options());
  const int64_t es = static_cast<int64_t>(h.element_size());
  if (m > 0 && L * H > 0) {
    TORCH_CHECK(gather_rows(static_cast<const char*>(h.data_ptr()), h.stride(0) * es, n,
                            static_cast<char*>(out.data_ptr()), L * H * es, idx.data_ptr<int64_t>(), m),
                "cpp_compact: index out of range for ", n, " rows");
  } else if (m > 0) {
    const int64_t* p = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < m; ++i) TORCH_CHECK(p[i] >= 0 && p[i] < n, "cpp_compact: index out of range");
  }
  at::Tensor out_mask;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n && mask->size(1) == S,
                "cpp_compact: mask must be [n, S] = [", n, ", ", S, "], got ", mask->sizes());
    TORCH_CHECK(mask->device().is_cpu(), "cpp_compact (CPU): mask must be on the CPU");
    at::Tensor mk = (mask->stride(1) == 1 || S <= 1) ? *mask : mask->contiguous();
    out_mask = at::empty({m, L}, mask->options());
    const int64_t mes = static_cast<int64_t>(mk.element_size());
    if (m > 0 && L > 0) {
      TORCH_CHECK(gather_rows(static_cast<const char*>(mk.data_ptr()), mk.stride(0) * mes, n,
                              static_cast<char*>(out_mask.data_ptr()), L * mes, idx.data_ptr<int64_t>(), m),
                  "cpp_compact: index out of range for ", n, " rows");
    }
  } else {
    out_mask = at::empty({0}, hidden.options().dtype(at::kLong));
  }
  return {out, out_mask};
}

}  // namespace eek
