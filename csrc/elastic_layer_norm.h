// Host interface of the elastic LayerNorm kernels (implemented in elastic_layer_norm.cu).
//
// "Elastic" LayerNorm normalises each row of a rows x width matrix and applies a slice of a
// shared (C,) affine: channel j uses weight[(offset + j) % C] and bias[(offset + j) % C].
// Pointers are raw device pointers; a null weight means 1, a null bias means 0.
// Arguments are validated by the caller (module.cpp); these functions only launch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace asvit {

struct LayerNormFwdArgs {
  const void* x;
  const void* weight;  // may be null
  const void* bias;    // may be null
  void* y;
  float* mean;         // may be null (not stored)
  float* rstd;         // may be null (not stored)
  int64_t rows;
  int64_t width;
  int64_t x_row_stride;  // elements
  int64_t y_row_stride;  // elements
  int64_t C;
  int64_t offset;
  float eps;
  DType dtype;
};

struct LayerNormBwdArgs {
  const void* dy;
  const void* x;
  const void* weight;  // may be null (then dweight must be null)
  const float* mean;
  const float* rstd;
  void* dx;            // may be null (dx not computed)
  void* dweight;       // may be null; full (C,) vector, only the used entries are written
  void* dbias;         // may be null; full (C,) vector, only the used entries are written
  float* workspace;    // elastic_layer_norm_bwd_workspace_numel(rows, width) floats
  int64_t rows;
  int64_t width;
  int64_t dy_row_stride;
  int64_t x_row_stride;
  int64_t dx_row_stride;
  int64_t C;
  int64_t offset;
  DType dtype;
};

// fp32 elements of workspace the backward needs for dweight/dbias (0 when rows == 0).
int64_t elastic_layer_norm_bwd_workspace_numel(int64_t rows, int64_t width);

// Launch on `stream` (rows == 0: nothing). cudaGetLastError() is checked after every launch and a
// failure is thrown as std::runtime_error carrying the CUDA error name and string.
void launch_elastic_layer_norm_fwd(const LayerNormFwdArgs& args, cudaStream_t stream);
void launch_elastic_layer_norm_bwd(const LayerNormBwdArgs& args, cudaStream_t stream);

}  // namespace asvit
