// What the module was built with and whether a CUDA device can be used (host code only).
#pragma once

#include <string>
#include <vector>

namespace asvit {

// CUDART_VERSION the module was compiled against, as "major.minor" (13000 -> "13.0").
std::string cuda_version();

// SASS architectures compiled into the module (from the ASVIT_COMPILED_ARCHS definition set by
// CMake), e.g. {"80", "90"}; PTX is embedded for the last one.
std::vector<std::string> compiled_archs();

// cudaGetDeviceCount; 0 (never an exception) when there is no driver or no GPU.
int device_count();

// Throws std::runtime_error ("asvit_kernels._C: no CUDA device is available (...)") unless at
// least one device is visible. Called by every kernel entry before launching anything.
void require_device();

}  // namespace asvit
