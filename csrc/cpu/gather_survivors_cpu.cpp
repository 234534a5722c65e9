// The graphed step's bookkeeping after a layer where rows may leave, in one op: the rows' next
// positions (exited rows marked dead), the live count, and every per-row tensor (hidden states,
// mask, extents, the policy's state) gathered in the exit kernel's survivor order. Before it the
// step launched a masked fill, an index_select and a compare-and-sum for the rows and one
// index_select per tensor (7 to 10 launches an exit layer on a GPU). Its CUDA twin is
// cuda/gather_survivors.cu; the checks below serve both.
#include <ATen/Parallel.h>

#include <cstring>

#include "../ops.h"

namespace eek {
namespace {

// Whether every dimension but the first is laid out contiguously (a row is one block of memory).
bool rows_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const at::Tensor& order, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dtype && t.is_contiguous(),
              "cpp_gather_survivors: ", what, " must be a contiguous [", n, "] ", dtype, " tensor, got ", t.sizes(),
              " ", t.scalar_type());
  TORCH_CHECK(t.device() == order.device(), "cpp_gather_survivors: ", what, " must be on ", order.device(), ", got ",
              t.device());
}

}  // namespace

std::vector<RowCopySpec> survivor_copies(const at::Tensor& order, const at::Tensor& exits, const at::Tensor& rows,
                                         const at::Tensor& next_rows, const at::Tensor& count, at::TensorList sources,
                                         at::TensorList targets, const std::optional<at::Tensor>& host_count) {
  TORCH_CHECK(order.dim() == 1, "cpp_gather_survivors: order must be 1-D, got ", order.sizes());
  const int64_t n = order.size(0);
  check_vector(order, n, at::kLong, order, "order");
  check_vector(exits, n, at::kBool, order, "exits");
  check_vector(rows, n, at::kLong, order, "rows");
  check_vector(next_rows, n, at::kLong, order, "next_rows");
  TORCH_CHECK(count.numel() == 1 && count.scalar_type() == at::kLong && count.device() == order.device(),
              "cpp_gather_survivors: count must be one int64 on ", order.device());
  if (host_count.has_value() && host_count->defined()) {
    TORCH_CHECK(host_count->numel() == 1 && host_count->scalar_type() == at::kLong && host_count->device().is_cpu(),
                "cpp_gather_survivors: host_count must be one int64 in host memory");
    TORCH_CHECK(order.device().is_cpu() || host_count->is_pinned(),
                "cpp_gather_survivors: host_count must be pinned (torch.zeros(..., pin_memory=True)) for a GPU to "
                "write it");
  }
  TORCH_CHECK(sources.size() == targets.size(), "cpp_gather_survivors: ", sources.size(), " sources but ",
              targets.size(), " targets");
  TORCH_CHECK(static_cast<int64_t>(sources.size()) <= kMaxSurvivorCopies, "cpp_gather_survivors: at most ",
              kMaxSurvivorCopies, " tensors a call, got ", sources.size());
  std::vector<RowCopySpec> copies;
  for (size_t t = 0; t < sources.size(); ++t) {
    const at::Tensor& src = sources[t];
    const at::Tensor& dst = targets[t];
    TORCH_CHECK(src.dim() >= 1 && src.sizes() == dst.sizes() && src.size(0) == n, "cpp_gather_survivors: tensor ",
                t, ": source ", src.sizes(), " and target ", dst.sizes(), " must have the same shape, ", n,
                " rows first");
    TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "cpp_gather_survivors: tensor ", t, ": source ",
                src.scalar_type(), " and target ", dst.scalar_type(), " must have the same dtype");
    TORCH_CHECK(src.device() == order.device() && dst.device() == order.device(), "cpp_gather_survivors: tensor ", t,
                " must be on ", order.device());
    TORCH_CHECK(rows_contiguous(src) && rows_contiguous(dst), "cpp_gather_survivors: tensor ", t,
                ": each row must be contiguous (only the row stride may differ)");
    const int64_t es = static_cast<int64_t>(src.element_size());
    const int64_t row_elements = n > 0 ? src.numel() / n : 0;
    copies.push_back({static_cast<const char*>(src.data_ptr()), static_cast<char*>(dst.data_ptr()),
                      src.stride(0) * es, dst.stride(0) * es, row_elements * es});
  }
  return copies;
}

void gather_survivors_cpu(const at::Tensor& order, const at::Tensor& exits, const at::Tensor& rows, int64_t dead,
                          const at::Tensor& next_rows, const at::Tensor& count, at::TensorList sources,
                          at::TensorList targets, const std::optional<at::Tensor>& host_count) {
  TORCH_CHECK(order.device().is_cpu(), "cpp_gather_survivors (CPU): tensors must be on the CPU");
  const std::vector<RowCopySpec> copies =
      survivor_copies(order, exits, rows, next_rows, count, sources, targets, host_count);
  const int64_t n = order.size(0);
  const int64_t* idx = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < n, "cpp_gather_survivors: order[", i, "] = ", idx[i], " is not a row of ", n);
  }
  const bool* ex = exits.data_ptr<bool>();
  const int64_t* src_rows = rows.data_ptr<int64_t>();
  int64_t* out_rows = next_rows.data_ptr<int64_t>();
  int64_t live = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = ex[idx[i]] ? dead : src_rows[idx[i]];
    out_rows[i] = row;
    live += row != dead;
  }
  *count.data_ptr<int64_t>() = live;
  if (host_count.has_value() && host_count->defined()) *host_count->data_ptr<int64_t>() = live;
  int64_t row_bytes = 0;
  for (const RowCopySpec& c : copies) row_bytes += c.bytes;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (const RowCopySpec& c : copies) {
        std::memcpy(c.dst + i * c.dst_stride, c.src + idx[i] * c.src_stride, static_cast<size_t>(c.bytes));
      }
    }
  });
}

}  // namespace eek
