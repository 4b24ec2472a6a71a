// Host interface of the per-sample-gradient Gram kernels (per_sample_grad_gram.cu).
//
// One linear layer's contribution to the empirical NTK: for inputs a (B, T, D_in) and the
// gradients g (B, T, D_out) at the layer's outputs, sample i's weight gradient is
// G_i = g_i^T a_i = sum_t g[i, t, :] (x) a[i, t, :] (D_out x D_in), and
//   K[i, j] = <G_i, G_j>_F = sum_{o, c} G_i[o, c] G_j[o, c]        (float32 (B, B), contiguous).
// The G_i are never stored in global memory: only 32 x 32 tiles of them exist, in registers.
//
// Element strides: the feature dimension is contiguous; the batch (`*_sb`) and token (`*_st`)
// strides are arbitrary (>= 0). Accumulation is fp32 whatever the element type; the tile products
// run on tensor cores for fp16 (sm_70+), bf16 (sm_80+) and fp32 with allow_tf32 (tf32, sm_80+),
// else as fp32 FMA (see per_sample_grad_gram_kernels.cuh).
// Arguments are validated by the caller (module.cpp); these functions only launch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace asvit {

struct PerSampleGradGramArgs {
  const void* a;     // (B, T, D_in), element strides (a_sb, a_st, 1)
  const void* g;     // (B, T, D_out), element strides (g_sb, g_st, 1)
  float* out;        // (B, B) float32, contiguous; every element is written
  float* workspace;  // per_sample_grad_gram_workspace_numel(B, T, D_in, D_out) floats
  int64_t B;
  int64_t T;
  int64_t D_in;
  int64_t D_out;
  int64_t a_sb, a_st;
  int64_t g_sb, g_st;
  bool allow_tf32;  // fp32 inputs: tile products in tf32 on tensor cores (sm_80+), else fp32 FMA
  DType dtype;
};

// fp32 elements of workspace per_sample_grad_gram needs (0 when B == 0 or T == 0). Depends on the
// sizes only (never on the device), so it can be allocated before the launch.
int64_t per_sample_grad_gram_workspace_numel(int64_t B, int64_t T, int64_t D_in, int64_t D_out);

// Launch on `stream`. B == 0: nothing; T == 0: out is zero-filled (cudaMemsetAsync). Deterministic
// (no atomics: per-tile-chunk partial Grams go to the workspace and are summed in a fixed order),
// and out is exactly symmetric. cudaGetLastError() is checked after every launch and a failure is
// thrown as std::runtime_error.
void launch_per_sample_grad_gram(const PerSampleGradGramArgs& args, cudaStream_t stream);

}  // namespace asvit
