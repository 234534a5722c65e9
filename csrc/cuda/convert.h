// Float conversions of the CUDA kernels' element types (float, __half, __nv_bfloat16): to and
// from float32 (round to nearest even), and the float32 values of one 16-byte word.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace eek {
namespace cuda {

template <typename T>
struct Cvt;

// The 8 floats of a 16-byte word of 16-bit values (C::bits: half `hi` of a 32-bit word), in memory order.
template <typename C>
__device__ __forceinline__ void unpack_16bit(const uint4& v, float* out) {
  const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = C::bits(words[i], 0);
    out[2 * i + 1] = C::bits(words[i], 1);
  }
}
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  // The 4 floats of a 16-byte word.
  static constexpr int kVec = 4;
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float bits(unsigned int word, int hi) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(hi ? word >> 16 : word & 0xffffu)));
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) { unpack_16bit<Cvt>(v, out); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float bits(unsigned int word, int hi) {
    return __uint_as_float(hi ? (word & 0xffff0000u) : (word << 16));
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) { unpack_16bit<Cvt>(v, out); }
};

}  // namespace cuda
}  // namespace eek
