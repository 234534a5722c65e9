// The continuous engine's paged token pool on the CPU: a layer call's rows gathered from the
// pool (or from the outputs of earlier calls, which the engine keeps) and a call's output rows written back to it.
//
// pool [T, H] holds pages of page_size tokens; page_table[slot, j] is the page of a slot's
// positions j * page_size ..; lengths[slot] its valid positions. A slot's valid positions in
// one page are contiguous in the pool, so every copy is a memcpy of up to a page of tokens
// (the index ops it replaces copy one token row at a time).
#include <algorithm>
#include <cstring>

#include "../ops.h"

namespace eek {
namespace {

struct PoolView {
  char* data;
  int64_t tokens;
  int64_t row_bytes;  // H * element size
  const int64_t* page_table;
  int64_t slots;
  int64_t pages_per_slot;
  const int64_t* lengths;
  int64_t page_size;
};

PoolView view_of(const at::Tensor& pool, const at::Tensor& page_table, const at::Tensor& lengths, int64_t page_size,
                 const char* op) {
  TORCH_CHECK(pool.dim() == 2 && pool.is_contiguous(), op, ": pool must be a contiguous [T, H] tensor, got ",
              pool.sizes());
  TORCH_CHECK(page_table.dim() == 2 && page_table.scalar_type() == at::kLong && page_table.is_contiguous(), op,
              ": page_table must be a contiguous int64 [slots, pages] tensor");
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong && lengths.is_contiguous() &&
                  lengths.size(0) == page_table.size(0),
              op, ": lengths must be a contiguous int64 [slots] tensor, one per page_table row");
  TORCH_CHECK(page_size >= 1, op, ": page_size must be >= 1");
  TORCH_CHECK(pool.device().is_cpu() && page_table.device().is_cpu() && lengths.device().is_cpu(), op,
              " (CPU): tensors must be on the CPU");
  return {static_cast<char*>(pool.data_ptr()), pool.size(0), pool.size(1) * static_cast<int64_t>(pool.element_size()),
          page_table.data_ptr<int64_t>(), page_table.size(0), page_table.size(1), lengths.data_ptr<int64_t>(),
          page_size};
}

// Calls copy(pool_byte_offset, position, count) for each page run of a slot's first `count` positions.
template <typename Copy>
void for_each_page_run(const PoolView& pool, int64_t slot, int64_t count, const char* op, Copy copy) {
  const int64_t* pages = pool.page_table + slot * pool.pages_per_slot;
  for (int64_t position = 0; position < count; position += pool.page_size) {
    const int64_t page = pages[position / pool.page_size];
    const int64_t run = std::min(pool.page_size, count - position);
    TORCH_CHECK(page >= 0 && (page + 1) * pool.page_size <= pool.tokens, op, ": page ", page, " of slot ", slot,
                " is outside the pool");
    copy(page * pool.page_size * pool.row_bytes, position, run);
  }
}

int64_t checked_slot(const PoolView& pool, int64_t slot, const char* op) {
  TORCH_CHECK(slot >= 0 && slot < pool.slots, op, ": slot ", slot, " is out of range for ", pool.slots, " slots");
  TORCH_CHECK(pool.lengths[slot] <= pool.pages_per_slot * pool.page_size, op, ": slot ", slot, " has length ",
              pool.lengths[slot], ", more than its pages hold");
  return slot;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pool_gather_cpu(const at::Tensor& pool, const at::Tensor& page_table,
                                                   const at::Tensor& lengths, int64_t page_size, at::IntArrayRef slots,
                                                   int64_t padded_length, const std::vector<at::Tensor>& residents,
                                                   at::IntArrayRef resident_of, at::IntArrayRef row_of) {
  constexpr const char* op = "cpp_pool_gather";
  const PoolView view = view_of(pool, page_table, lengths, page_size, op);
  TORCH_CHECK(padded_length >= 0, op, ": padded_length must be >= 0");
  const int64_t m = static_cast<int64_t>(slots.size()), S = padded_length;
  const bool from_residents = !resident_of.empty();
  TORCH_CHECK(!from_residents || (static_cast<int64_t>(resident_of.size()) == m && row_of.size() == resident_of.size()),
              op, ": resident_of and row_of must have one entry per slot (or be empty)");
  for (const at::Tensor& resident : residents) {
    TORCH_CHECK(resident.dim() == 3 && resident.is_contiguous() && resident.size(2) == pool.size(1) &&
                    resident.scalar_type() == pool.scalar_type() && resident.device().is_cpu(),
                op, ": residents must be contiguous CPU [r, S, H] tensors of the pool's H and dtype");
  }
  at::Tensor out = at::empty({m, S, pool.size(1)}, pool.options());
  at::Tensor mask = at::empty({m, S}, pool.options().dtype(at::kBool));
  char* out_data = static_cast<char*>(out.data_ptr());
  bool* mask_data = mask.data_ptr<bool>();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t slot = checked_slot(view, slots[i], op);
    const int64_t count = std::min(view.lengths[slot], S);
    char* row = out_data + i * S * view.row_bytes;
    const int64_t source = from_residents ? resident_of[i] : -1;
    if (source >= 0) {
      TORCH_CHECK(source < static_cast<int64_t>(residents.size()), op, ": resident_of[", i, "] = ", source,
                  " but ", residents.size(), " residents are given");
      const at::Tensor& resident = residents[source];
      const int64_t r = row_of[i];
      TORCH_CHECK(r >= 0 && r < resident.size(0) && count <= resident.size(1), op, ": row_of[", i, "] = ", r,
                  " is not a row of resident ", source, " holding ", count, " positions");
      std::memcpy(row, static_cast<const char*>(resident.data_ptr()) + r * resident.size(1) * view.row_bytes,
                  static_cast<size_t>(count * view.row_bytes));
    } else {
      for_each_page_run(view, slot, count, op, [&](int64_t offset, int64_t position, int64_t run) {
        std::memcpy(row + position * view.row_bytes, view.data + offset, static_cast<size_t>(run * view.row_bytes));
      });
    }
    std::memset(row + count * view.row_bytes, 0, static_cast<size_t>((S - count) * view.row_bytes));
    std::fill(mask_data + i * S, mask_data + i * S + count, true);
    std::fill(mask_data + i * S + count, mask_data + (i + 1) * S, false);
  }
  return {out, mask};
}

void pool_scatter_cpu(const at::Tensor& pool, const at::Tensor& page_table, const at::Tensor& lengths,
                      int64_t page_size, at::IntArrayRef slots, const at::Tensor& hidden) {
  constexpr const char* op = "cpp_pool_scatter";
  const PoolView view = view_of(pool, page_table, lengths, page_size, op);
  TORCH_CHECK(hidden.dim() == 3 && hidden.is_contiguous() && hidden.size(0) == static_cast<int64_t>(slots.size()) &&
                  hidden.size(2) == pool.size(1) && hidden.scalar_type() == pool.scalar_type() &&
                  hidden.device().is_cpu(),
              op, ": hidden must be a contiguous CPU [m, S, H] tensor of the pool's H and dtype, one row per slot");
  const int64_t m = static_cast<int64_t>(slots.size()), S = hidden.size(1);
  const char* in = static_cast<const char*>(hidden.data_ptr());
  for (int64_t i = 0; i < m; ++i) {
    if (slots[i] < 0) continue;
    const int64_t slot = checked_slot(view, slots[i], op);
    TORCH_CHECK(view.lengths[slot] <= S, op, ": slot ", slot, " has ", view.lengths[slot], " positions; hidden holds ",
                S);
    const char* row = in + i * S * view.row_bytes;
    for_each_page_run(view, slot, view.lengths[slot], op, [&](int64_t offset, int64_t position, int64_t run) {
      std::memcpy(view.data + offset, row + position * view.row_bytes, static_cast<size_t>(run * view.row_bytes));
    });
  }
}

}  // namespace eek
