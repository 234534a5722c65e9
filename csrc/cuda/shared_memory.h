// Dynamic shared memory past the 48 KiB any launch may take: the kernel must opt in, up to the
// device's limit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eek {
namespace cuda {

// Let `kernel` launch with `bytes` of dynamic shared memory on the current device;
// cudaErrorInvalidValue where the device cannot give that much.
template <typename... P>
cudaError_t allow_dynamic_shared(void (*kernel)(P...), int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (bytes > optin) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace cuda
}  // namespace eek
