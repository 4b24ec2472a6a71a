// Small helpers shared by host code and kernels: the dtype codes of the Python ABI and CUDA
// error checking. Deliberately free of pybind11 and torch: errors are reported with standard
// exceptions, which pybind11 translates (std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

namespace asvit {

// Element dtype codes used by every `dtype` argument of the Python module.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool is_valid_dtype(int code) { return code >= 0 && code <= 2; }

template <typename T>
constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// "cudaErrorInvalidValue: invalid argument"
inline std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

// Throws RuntimeError naming `what` (e.g. the kernel) when `err` is not cudaSuccess.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("asvit_kernels._C: ") + what + " failed: " +
                             cuda_error_text(err));
  }
}

}  // namespace asvit
