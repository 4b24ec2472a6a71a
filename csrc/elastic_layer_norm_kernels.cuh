// Elastic LayerNorm device code (the launchers are in elastic_layer_norm.cu).
//
// Forward : blockDim.x threads share a row; short rows pack blockDim.y rows into one block.
//           Corrected two-pass mean / variance in fp32 (accurate for |mean| >> std), then the
//           affine.
// Backward: (1) dx, same row layout, one fused reduction of sum(g) and sum(g * xhat);
//           (2) dweight/dbias partial sums: blocks of 32 columns x a chunk of rows write fp32
//               partials to the workspace; (3) a second kernel sums the partials of each column
//               in a fixed order and writes dweight/dbias at the wrapped channel index.
//           No atomics anywhere, so every result is run-to-run deterministic.
// Every kernel loops over rows with a block-uniform loop, and every thread of a block reaches
// every __syncthreads (rows past the end only skip loads and stores).
#pragma once

#include <cstdint>

#include "device_utils.cuh"

namespace asvit {
namespace ln {

constexpr int kMaxRowThreads = 512;      // threads sharing one row (blockDim.x upper bound)
constexpr int kColTile = 32;             // columns per block in the dweight/dbias kernels
constexpr int kPartialRowThreads = 8;    // blockDim.y of the partial-sum kernel
constexpr int kReduceThreads = 16;       // blockDim.y of the final reduction kernel

// Channel of column j in the shared (C,) affine. offset < C and j < width <= C, so one
// subtraction suffices; computed in 64 bits because offset + j can exceed INT32_MAX.
__device__ __forceinline__ int64_t channel(int j, int offset, int C) {
  const int64_t c = static_cast<int64_t>(offset) + j;
  return c >= C ? c - C : c;
}

// ---- forward -----------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
ln_fwd_kernel(const T* x, const T* weight, const T* bias, T* y, float* mean_out, float* rstd_out,
              int64_t rows, int width, int64_t x_stride, int64_t y_stride, int C, int offset,
              float eps) {
  __shared__ float smem[2 * kMaxWarpsPerBlock];
  const float n = static_cast<float>(width);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;  // all threads stay in the loop: row_sum synchronises
    const T* xr = x + (valid ? row : 0) * x_stride;

    float acc[1] = {0.f};
    if (valid)
      for (int j = threadIdx.x; j < width; j += blockDim.x) acc[0] += to_float(xr[j]);
    row_sum<1>(acc, smem);
    const float mu = acc[0] / n;

    // Second pass over d = x - mu (exact-ish in fp32 even when |mean| >> std). sum(d) corrects
    // the rounding of mu: mean = mu + delta, var = mean(d^2) - delta^2 (corrected two-pass).
    float acc2[2] = {0.f, 0.f};
    if (valid)
      for (int j = threadIdx.x; j < width; j += blockDim.x) {
        const float d = to_float(xr[j]) - mu;
        acc2[0] += d;
        acc2[1] += d * d;
      }
    row_sum<2>(acc2, smem);
    const float delta = acc2[0] / n;
    const float var = fmaxf(acc2[1] / n - delta * delta, 0.f);
    const float rs = 1.f / sqrtf(var + eps);

    if (valid) {
      if (threadIdx.x == 0) {
        if (mean_out != nullptr) mean_out[row] = mu + delta;
        if (rstd_out != nullptr) rstd_out[row] = rs;
      }
      T* yr = y + row * y_stride;
      for (int j = threadIdx.x; j < width; j += blockDim.x) {
        const int64_t c = channel(j, offset, C);
        const float w = weight != nullptr ? to_float(weight[c]) : 1.f;
        const float b = bias != nullptr ? to_float(bias[c]) : 0.f;
        yr[j] = from_float<T>(((to_float(xr[j]) - mu) - delta) * rs * w + b);
      }
    }
  }
}

// ---- backward: dx --------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
ln_bwd_dx_kernel(const T* dy, const T* x, const T* weight, const float* mean, const float* rstd,
                 T* dx, int64_t rows, int width, int64_t dy_stride, int64_t x_stride,
                 int64_t dx_stride, int C, int offset) {
  __shared__ float smem[2 * kMaxWarpsPerBlock];
  const float n = static_cast<float>(width);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const int64_t r = valid ? row : 0;
    const T* xr = x + r * x_stride;
    const T* dyr = dy + r * dy_stride;
    const float mu = valid ? mean[r] : 0.f;
    const float rs = valid ? rstd[r] : 0.f;

    // sum_j g and sum_j g * xhat, with g = dy * w
    float acc[2] = {0.f, 0.f};
    if (valid)
      for (int j = threadIdx.x; j < width; j += blockDim.x) {
        const float xh = (to_float(xr[j]) - mu) * rs;
        const float w = weight != nullptr ? to_float(weight[channel(j, offset, C)]) : 1.f;
        const float g = to_float(dyr[j]) * w;
        acc[0] += g;
        acc[1] += g * xh;
      }
    row_sum<2>(acc, smem);
    const float mean_g = acc[0] / n;
    const float mean_gx = acc[1] / n;

    if (valid) {
      T* dxr = dx + row * dx_stride;
      for (int j = threadIdx.x; j < width; j += blockDim.x) {
        const float xh = (to_float(xr[j]) - mu) * rs;
        const float w = weight != nullptr ? to_float(weight[channel(j, offset, C)]) : 1.f;
        const float g = to_float(dyr[j]) * w;
        dxr[j] = from_float<T>(rs * (g - mean_g - xh * mean_gx));
      }
    }
  }
}

// ---- backward: dweight / dbias -------------------------------------------------------------------
// Sums (aw, ab) over threadIdx.y for each column threadIdx.x, in a fixed order; thread row 0 ends up
// holding the column totals. Every thread of the block must call it (it synchronises).
template <int ROWS>
__device__ __forceinline__ void sum_over_threads_y(float (&sw)[ROWS][kColTile + 1],
                                                   float (&sb)[ROWS][kColTile + 1], float& aw,
                                                   float& ab) {
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0) {
    aw = ab = 0.f;
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      aw += sw[k][threadIdx.x];
      ab += sb[k][threadIdx.x];
    }
  }
}

// Block (kColTile, kPartialRowThreads) sums dy * xhat and dy over the rows of chunk blockIdx.y for
// 32 columns, and writes ws_w[chunk, j], ws_b[chunk, j].
template <typename T>
__global__ void __launch_bounds__(kColTile * kPartialRowThreads)
ln_bwd_partial_kernel(const T* dy, const T* x, const float* mean, const float* rstd, float* ws_w,
                      float* ws_b, int64_t rows, int width, int64_t dy_stride, int64_t x_stride,
                      int64_t rows_per_chunk) {
  __shared__ float sw[kPartialRowThreads][kColTile + 1];
  __shared__ float sb[kPartialRowThreads][kColTile + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;

  float aw = 0.f, ab = 0.f;
  if (j < width) {
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kPartialRowThreads) {
      const float d = to_float(dy[r * dy_stride + j]);
      const float xh = (to_float(x[r * x_stride + j]) - mean[r]) * rstd[r];
      aw += d * xh;
      ab += d;
    }
  }
  sum_over_threads_y<kPartialRowThreads>(sw, sb, aw, ab);
  if (threadIdx.y == 0 && j < width) {
    ws_w[chunk * width + j] = aw;
    ws_b[chunk * width + j] = ab;
  }
}

// Block (kColTile, kReduceThreads) sums the partials of 32 columns over all chunks, in a fixed
// order, and writes the result at the wrapped channel index.
template <typename T>
__global__ void __launch_bounds__(kColTile * kReduceThreads)
ln_bwd_reduce_kernel(const float* ws_w, const float* ws_b, T* dweight, T* dbias, int width,
                     int64_t chunks, int C, int offset) {
  __shared__ float sw[kReduceThreads][kColTile + 1];
  __shared__ float sb[kReduceThreads][kColTile + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  float aw = 0.f, ab = 0.f;
  if (j < width) {
    for (int64_t c = threadIdx.y; c < chunks; c += kReduceThreads) {
      aw += ws_w[c * width + j];
      ab += ws_b[c * width + j];
    }
  }
  sum_over_threads_y<kReduceThreads>(sw, sb, aw, ab);
  if (threadIdx.y == 0 && j < width) {
    const int64_t c = channel(static_cast<int>(j), offset, C);
    if (dweight != nullptr) dweight[c] = from_float<T>(aw);
    if (dbias != nullptr) dbias[c] = from_float<T>(ab);
  }
}

}  // namespace ln
}  // namespace asvit
