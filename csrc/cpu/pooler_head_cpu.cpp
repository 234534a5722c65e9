// The default exit head on the CPU in float32, for a few [CLS] rows at a time:
// pooled = tanh(x W_p^T + b_p), logits = pooled W^T + b.
//
// Why not torch's GEMM: right after an encoder layer every ATen op runs on cold caches
// (its dispatch code and its BLAS path), several times slower than warm
// (benchmarks/results/intel_xeon/exit_head_in_situ_cpu.md). This kernel is one short code path: the
// pooler reads W_p transposed ([H_in, H_out], packed once per weight by the caller), so
// four rows share each weight load and the products run as register-blocked
// multiply-adds without horizontal sums; tanh is a vectorisable polynomial.
//
// Each row's result depends on that row only (rows of a block never mix and a short block
// repeats its last row), so a sequence gets the same logits whatever batch it runs in.
// x86-64 builds carry AVX-512 and AVX2/FMA versions, chosen at run time, beside the portable one.
#include "pooler_head_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace eek {
namespace {

constexpr int kBlockRows = 4;  // rows sharing each weight load

#if defined(__GNUC__)
#define EEK_INLINE inline __attribute__((always_inline))
#else
#define EEK_INLINE inline
#endif

// GCC/Clang vector extensions: a compiler lowers a vector wider than the target's registers to
// several registers, so the portable version is plain C++ on any architecture.
namespace portable {
constexpr int kLanes = 8;
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
EEK_INLINE Floats mul_add(Floats a, Floats b, Floats c) { return a * b + c; }
EEK_INLINE float mul_add(float a, float b, float c) { return a * b + c; }
#include "pooler_head_kernel.inc"
}  // namespace portable

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kLanes = 8;
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
EEK_INLINE Floats mul_add(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
EEK_INLINE float mul_add(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#include "pooler_head_kernel.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
EEK_INLINE Floats mul_add(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
EEK_INLINE float mul_add(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#include "pooler_head_kernel.inc"
}  // namespace avx512
#pragma GCC pop_options

#endif

// The widest version this CPU runs, or the one EARLYEXIT_CPU_ISA names where the CPU runs it.
const char* chosen_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* forced = std::getenv("EARLYEXIT_CPU_ISA");
  if (forced != nullptr) {
    if (std::strcmp(forced, "portable") == 0) return "portable";
    if (std::strcmp(forced, "avx2_fma") == 0 && avx2) return "avx2_fma";
    if (std::strcmp(forced, "avx512") == 0 && avx512) return "avx512";
  }
  if (avx512) return "avx512";
  if (avx2) return "avx2_fma";
#endif
  return "portable";
}

#if defined(__GNUC__) && defined(__x86_64__)
// The version of a kernel that chosen_isa() names.
template <typename Fn>
Fn for_this_cpu(Fn avx512_version, Fn avx2_version, Fn portable_version) {
  const char* isa = chosen_isa();
  if (std::strcmp(isa, "avx512") == 0) return avx512_version;
  if (std::strcmp(isa, "avx2_fma") == 0) return avx2_version;
  return portable_version;
}
#define EEK_FOR_THIS_CPU(name) for_this_cpu(&avx512::name, &avx2::name, &portable::name)
#else
#define EEK_FOR_THIS_CPU(name) (&portable::name)
#endif

}  // namespace

// Each picks its version once, on its first call.
void pooler_head_rows(const PoolerHeadArgs& args, const float* x, int rows, float* pooled, float* logits) {
  static const auto version = EEK_FOR_THIS_CPU(pooler_head_rows);
  version(args, x, rows, pooled, logits);
}

void pooler_head_all_rows(const PoolerHeadArgs& args, const float* x, int64_t rows, float* pooled, float* logits) {
  static const auto version = EEK_FOR_THIS_CPU(pooler_head_all_rows);
  version(args, x, rows, pooled, logits);
}

void pool_row(const float* x, int64_t stride, int64_t S, const uint8_t* valid, int64_t H, bool mean, float* out) {
  static const auto version = EEK_FOR_THIS_CPU(pool_row);
  version(x, stride, S, valid, H, mean, out);
}

const char* pooler_head_isa() { return chosen_isa(); }

}  // namespace eek
