// Per-sample-gradient Gram device code (the launchers are in per_sample_grad_gram.cu).
//
// K[i, j] = <G_i, G_j>_F with G_i = g_i^T a_i, computed tile by tile of G without storing any G_i:
//
//   partial: grid (sample block bj, sample block bi, tile chunk). The samples are split into
//            blocks of kS = 8; only the upper triangle of block pairs (bi <= bj) works, the others
//            return at once (K is symmetric). A block walks the 32 x 32 tiles of G of its chunk
//            (tiles numbered row-major over (D_out / 32, D_in / 32)); for each tile it forms the
//            tile products P_i = g_i[:, o-tile]^T a_i[:, c-tile] (a loop over T) of the kS samples
//            of block bi (kept in registers: 4 entries per thread), then streams the kS samples j
//            of block bj kJS = 2 at a time (P_j, 4 registers each) and accumulates P_i . P_j into a
//            per-thread kS x kS partial Gram. Diagonal pairs (bi == bj) reuse P_i for P_j. After
//            the chunk, the 256 per-thread partials are summed in a fixed order (warp butterflies,
//            then the 8 warps in order) and written to workspace[chunk][pair][kS][kS].
//   reduce : one thread per K[i, j]: sums the chunk partials of its pair in chunk order. (i, j)
//            and (j, i) read the same upper-triangle partial, so K is exactly symmetric.
// No atomics anywhere: the result is run-to-run deterministic.
//
// Staging: a pass copies 64 (sample, token) rows of the tile's 32 g columns and 32 a columns to
// shared memory as fp32 (zero outside B, T, D_out, D_in, so no tile needs padding in memory):
// 8 samples x 8 tokens for the block-bi samples, 2 samples x 32 tokens for streamed samples j.
// Each thread owns a 2 x 2 patch of the 32 x 32 tile: per token and sample, two float2 shared
// loads and four FMAs.
// TODO(perf): the kS-sample blocking recomputes every P_i about B / kS times when B > kS; larger
// sample blocks with P tiles in shared memory, tensor cores (mma.sync on fp16/bf16 staging) and
// cp.async double buffering are the next steps.
//
// Every loop that contains a __syncthreads is block-uniform (its bounds depend on blockIdx and the
// parameters only), and every thread of a working block reaches every barrier.
#pragma once

#include <cstdint>

#include "device_utils.cuh"

namespace asvit {
namespace psg {

constexpr int kThreads = 256;               // threads per block of the partial kernel
constexpr int kTile = 32;                   // G tile: kTile output x kTile input features
constexpr int kS = 8;                       // samples per block side
constexpr int kJS = 2;                      // block-bj samples streamed together
constexpr int kRows = 64;                   // (sample, token) rows staged per pass
constexpr int kPatch = 2;                   // each thread: kPatch x kPatch entries of a tile
constexpr int kPatchesPerRow = kTile / kPatch;  // 16
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowStep = kThreads / kTile;     // staged rows copied per sweep of the block
constexpr int kReduceX = 32, kReduceY = 8;  // block of the reduction kernel
static_assert(kPatchesPerRow * kPatchesPerRow == kThreads, "one 2 x 2 patch per thread");
static_assert(kWarps * kS * kS <= kRows * kTile, "the block reduction reuses a staging buffer");

struct GramParams {
  const void* a;
  const void* g;
  float* out;
  float* ws;
  int64_t B, T, D_in, D_out;
  int64_t a_sb, a_st, g_sb, g_st;
  int64_t nb;               // sample blocks: ceil(B / kS)
  int64_t pairs;            // nb (nb + 1) / 2 block pairs bi <= bj
  int64_t tiles_in;         // tiles along D_in: ceil(D_in / kTile)
  int64_t tiles;            // tiles of G: ceil(D_out / kTile) * tiles_in
  int64_t tiles_per_chunk;  // consecutive tiles one partial block walks
  int64_t chunks;           // ceil(tiles / tiles_per_chunk) (every chunk holds >= 1 tile)
};

// Row-major index of the pair (bi, bj), bi <= bj, in the upper triangle of nb x nb.
__host__ __device__ __forceinline__ int64_t pair_index(int64_t bi, int64_t bj, int64_t nb) {
  return bi * (2 * nb - bi + 1) / 2 + (bj - bi);
}

// P[s][r * 2 + q] = sum_t g[s0 + s, t, o0 + 2 ty + r] * a[s0 + s, t, c0 + 2 tx + q] for the NS
// samples s0 .. s0 + NS - 1 (0 for samples >= B and features past D_out / D_in), with tx, ty the
// thread's patch. Passes of kRows / NS tokens; staged row t * NS + s holds (sample s0 + s,
// token t0 + t).
// Every thread of the block must call it with the same arguments (it synchronises).
template <typename T, int NS>
__device__ __forceinline__ void tile_products(float (&P)[NS][kPatch * kPatch], const GramParams& p,
                                              const T* a, const T* g, int64_t s0, int64_t o0,
                                              int64_t c0, float* gs, float* as) {
  constexpr int kTok = kRows / NS;
  static_assert(kTok * NS == kRows, "NS must divide kRows");
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int k = 0; k < kPatch * kPatch; ++k) P[s][k] = 0.f;

  const int tx = threadIdx.x % kPatchesPerRow;
  const int ty = threadIdx.x / kPatchesPerRow;
  // Staging: thread (row0, col) copies rows row0, row0 + kRowStep, ... of column col.
  const int col = threadIdx.x % kTile;
  const int row0 = threadIdx.x / kTile;
  const bool g_col = o0 + col < p.D_out;
  const bool a_col = c0 + col < p.D_in;
  for (int64_t t0 = 0; t0 < p.T; t0 += kTok) {
    const int tt = static_cast<int>(p.T - t0 < kTok ? p.T - t0 : kTok);
    __syncthreads();  // the previous pass (or the caller's last use of gs / as) is done reading
#pragma unroll
    for (int r = 0; r < kRows / kRowStep; ++r) {
      const int row = row0 + kRowStep * r;  // = t * NS + s
      const int64_t smp = s0 + row % NS;
      const int64_t tok = t0 + row / NS;
      const bool ok = row / NS < tt && smp < p.B;
      float gv = 0.f, av = 0.f;
      if (ok && g_col) gv = to_float(g[smp * p.g_sb + tok * p.g_st + o0 + col]);
      if (ok && a_col) av = to_float(a[smp * p.a_sb + tok * p.a_st + c0 + col]);
      gs[row * kTile + col] = gv;
      as[row * kTile + col] = av;
    }
    __syncthreads();
    for (int t = 0; t < tt; ++t) {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const int row = t * NS + s;
        const float2 gv = *reinterpret_cast<const float2*>(gs + row * kTile + kPatch * ty);
        const float2 av = *reinterpret_cast<const float2*>(as + row * kTile + kPatch * tx);
        P[s][0] = fmaf(gv.x, av.x, P[s][0]);
        P[s][1] = fmaf(gv.x, av.y, P[s][1]);
        P[s][2] = fmaf(gv.y, av.x, P[s][2]);
        P[s][3] = fmaf(gv.y, av.y, P[s][3]);
      }
    }
  }
}

__device__ __forceinline__ float dot4(const float (&x)[4], const float (&y)[4], float acc) {
  acc = fmaf(x[0], y[0], acc);
  acc = fmaf(x[1], y[1], acc);
  acc = fmaf(x[2], y[2], acc);
  return fmaf(x[3], y[3], acc);
}

// Block (kThreads): the partial Gram of sample blocks (blockIdx.y, blockIdx.x) over the tiles of
// chunk blockIdx.z, into ws[(chunk * pairs + pair) * kS * kS + ii * kS + jj] (all kS x kS entries,
// 0 for samples >= B).
template <typename T>
__global__ void __launch_bounds__(kThreads)
psg_partial_kernel(const GramParams p) {
  const int64_t bj = blockIdx.x;
  const int64_t bi = blockIdx.y;
  if (bi > bj) return;  // lower triangle: the whole block leaves before any barrier
  __shared__ __align__(16) float gs[kRows * kTile];
  __shared__ __align__(16) float as[kRows * kTile];
  const T* a = static_cast<const T*>(p.a);
  const T* g = static_cast<const T*>(p.g);
  const int64_t i0 = bi * kS;
  const int64_t j0 = bj * kS;
  const bool diag = bi == bj;

  float acc[kS][kS];
#pragma unroll
  for (int i = 0; i < kS; ++i)
#pragma unroll
    for (int j = 0; j < kS; ++j) acc[i][j] = 0.f;

  const int64_t tile_begin = static_cast<int64_t>(blockIdx.z) * p.tiles_per_chunk;
  const int64_t tile_end =
      tile_begin + p.tiles_per_chunk < p.tiles ? tile_begin + p.tiles_per_chunk : p.tiles;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t o0 = (tile / p.tiles_in) * kTile;
    const int64_t c0 = (tile % p.tiles_in) * kTile;
    float pi[kS][kPatch * kPatch];
    tile_products<T, kS>(pi, p, a, g, i0, o0, c0, gs, as);
    if (diag) {
#pragma unroll
      for (int i = 0; i < kS; ++i)
#pragma unroll
        for (int j = 0; j < kS; ++j) acc[i][j] = dot4(pi[i], pi[j], acc[i][j]);
    } else {
#pragma unroll
      for (int j = 0; j < kS; j += kJS) {
        if (j0 + j >= p.B) break;  // block-uniform; the entries of missing samples stay 0
        float pj[kJS][kPatch * kPatch];
        tile_products<T, kJS>(pj, p, a, g, j0 + j, o0, c0, gs, as);
#pragma unroll
        for (int jj = 0; jj < kJS; ++jj)
#pragma unroll
          for (int i = 0; i < kS; ++i) acc[i][j + jj] = dot4(pi[i], pj[jj], acc[i][j + jj]);
      }
    }
  }

  // Sum the per-thread partials over the block in a fixed order: butterfly within each warp, then
  // warp 0 .. kWarps-1 in order. gs is free again after the barrier.
  float* red = gs;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kS; ++i)
#pragma unroll
    for (int j = 0; j < kS; ++j) {
      const float v = warp_sum(acc[i][j]);
      if (lane == 0) red[warp * kS * kS + i * kS + j] = v;
    }
  __syncthreads();
  if (threadIdx.x < kS * kS) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w * kS * kS + threadIdx.x];
    const int64_t pair = pair_index(bi, bj, p.nb);
    p.ws[(static_cast<int64_t>(blockIdx.z) * p.pairs + pair) * (kS * kS) + threadIdx.x] = s;
  }
}

// Block (kReduceX, kReduceY): K[i, j] for j = blockIdx.x * kReduceX + threadIdx.x and
// i = blockIdx.y * kReduceY + threadIdx.y, the sum over chunks (in order) of the partial of the
// upper-triangle entry (min(i, j), max(i, j)).
__global__ void __launch_bounds__(kReduceX * kReduceY)
psg_reduce_kernel(const GramParams p) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kReduceX + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kReduceY + threadIdx.y;
  if (i >= p.B || j >= p.B) return;
  const int64_t lo = i < j ? i : j;
  const int64_t hi = i < j ? j : i;
  const int64_t pair = pair_index(lo / kS, hi / kS, p.nb);
  const float* w = p.ws + pair * (kS * kS) + (lo % kS) * kS + hi % kS;
  const int64_t chunk_stride = p.pairs * (kS * kS);
  float s = 0.f;
  for (int64_t c = 0; c < p.chunks; ++c) s += w[c * chunk_stride];
  p.out[i * p.B + j] = s;
}

}  // namespace psg
}  // namespace asvit
