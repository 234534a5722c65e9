// Float conversions of the CUDA kernels' element types (float, __half, __nv_bfloat16): to and
// from float32 (round to nearest even), and the float32 values of one 16-byte word.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace eek {
namespace cuda {

template <typename T>
struct Cvt;
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
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) {
    out[0] = bits(v.x, 0);
    out[1] = bits(v.x, 1);
    out[2] = bits(v.y, 0);
    out[3] = bits(v.y, 1);
    out[4] = bits(v.z, 0);
    out[5] = bits(v.z, 1);
    out[6] = bits(v.w, 0);
    out[7] = bits(v.w, 1);
  }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float bits(unsigned int word, int hi) {
    return __uint_as_float(hi ? (word & 0xffff0000u) : (word << 16));
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) {
    out[0] = bits(v.x, 0);
    out[1] = bits(v.x, 1);
    out[2] = bits(v.y, 0);
    out[3] = bits(v.y, 1);
    out[4] = bits(v.z, 0);
    out[5] = bits(v.z, 1);
    out[6] = bits(v.w, 0);
    out[7] = bits(v.w, 1);
  }
};

}  // namespace cuda
}  // namespace eek
