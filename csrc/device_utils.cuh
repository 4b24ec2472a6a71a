// Device-side helpers: fp32 <-> element-type conversion and deterministic block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace asvit {

// ---- conversions (all arithmetic is done in fp32) --------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- reductions --------------------------------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 32;  // 1024 threads

// Butterfly sum: every lane ends with the same (bitwise identical) value, because each step adds
// the same two operands in every lane of a pair.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Sums N values across threadIdx.x, separately for every threadIdx.y (one row per y).
// Requirements: blockDim.x is a multiple of 32; every thread of the block calls it (it may
// __syncthreads); `smem` holds at least kMaxWarpsPerBlock * N floats.
// The summation order is fixed by the block shape, so results are deterministic, and every
// thread of a row receives the same totals.
template <int N>
__device__ __forceinline__ void row_sum(float (&v)[N], float* smem) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  const int warps = blockDim.x / kWarpSize;
  if (warps == 1) return;  // uniform across the block
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  float* s = smem + threadIdx.y * warps * N;
  __syncthreads();  // a previous call may still be reading smem
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) s[warp * N + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float t = 0.f;
    for (int w = 0; w < warps; ++w) t += s[w * N + i];
    v[i] = t;
  }
}

}  // namespace asvit
