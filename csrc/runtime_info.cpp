#include "runtime_info.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>

#include <cuda_runtime_api.h>

#include "common.h"

#ifndef ASVIT_COMPILED_ARCHS
#error "ASVIT_COMPILED_ARCHS must be defined by the build (CMakeLists.txt), e.g. \"80,90\""
#endif

namespace asvit {

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  const std::string csv = ASVIT_COMPILED_ARCHS;
  size_t start = 0;
  while (start <= csv.size()) {
    const size_t end = std::min(csv.find(',', start), csv.size());
    if (end > start) out.push_back(csv.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

namespace {
// A positive answer is cached (devices do not disappear); a negative one is re-queried so a
// process can still find a device later (e.g. after CUDA_VISIBLE_DEVICES fixes, driver load).
std::atomic<bool> g_device_seen{false};

cudaError_t query_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    (void)cudaGetLastError();  // do not leave the error for the next launch check
  }
  return err;
}
}  // namespace

int device_count() {
  int count = 0;
  query_device_count(&count);
  if (count > 0) g_device_seen.store(true, std::memory_order_relaxed);
  return count;
}

void require_device() {
  if (g_device_seen.load(std::memory_order_relaxed)) return;
  int count = 0;
  const cudaError_t err = query_device_count(&count);
  if (count > 0) {
    g_device_seen.store(true, std::memory_order_relaxed);
    return;
  }
  const std::string why = err != cudaSuccess ? cuda_error_text(err) : std::string("0 devices");
  throw std::runtime_error("asvit_kernels._C: no CUDA device is available (cudaGetDeviceCount returned " +
                           why + ")");
}

}  // namespace asvit
