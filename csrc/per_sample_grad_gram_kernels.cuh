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
// Staging: a pass copies kRows (sample, token) rows of the tile's 32 g columns and 32 a columns
// to shared memory in the input dtype (zero outside B, T, D_out, D_in, so no tile needs padding
// in memory): 16 KiB, i.e. 64 rows of fp32 or 128 of fp16/bf16.
// Tile products P_s = g_s[:, o-tile]^T a_s[:, c-tile]:
//   tensor cores (fp16 sm_70+, bf16 sm_80+, fp32 with allow_tf32 as tf32 sm_80+): each of the 8
//     warps owns 16 x 16 quarters of the samples' 32 x 32 P tiles as WMMA accumulators (fp32)
//     over every token pass, reading each sample's staged rows in place (row stride NS * 32);
//     at the end they go through shared memory to the 2 x 2 patch layout below.
//   fp32 FMA otherwise: each thread owns a 2 x 2 patch of the 32 x 32 tile: per token and
//     sample, two pairs of shared loads and four FMAs.
// TODO(perf): the kS-sample blocking recomputes every P_i about B / kS times when B > kS; larger
// sample blocks with P tiles in shared memory and cp.async double buffering are the next steps.
//
// Every loop that contains a __syncthreads is block-uniform (its bounds depend on blockIdx and the
// parameters only), and every thread of a working block reaches every barrier.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device_utils.cuh"
#include "tile_mma.cuh"

namespace asvit {
namespace psg {

constexpr int kThreads = 256;               // threads per block of the partial kernel
constexpr int kTile = 32;                   // G tile: kTile output x kTile input features
constexpr int kS = 8;                       // samples per block side
constexpr int kJS = 2;                      // block-bj samples streamed together
constexpr int kStageBytes = 16 * 1024;       // g and a staging of one pass
constexpr int kPatch = 2;                   // each thread: kPatch x kPatch entries of a tile
constexpr int kPatchesPerRow = kTile / kPatch;  // 16
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowStep = kThreads / kTile;     // staged rows copied per sweep of the block
constexpr int kReduceX = 32, kReduceY = 8;  // block of the reduction kernel
static_assert(kPatchesPerRow * kPatchesPerRow == kThreads, "one 2 x 2 patch per thread");
// (sample, token) rows staged per pass: 64 for fp32, 128 for 16-bit
template <typename T> constexpr int kRows = kStageBytes / (2 * kTile * static_cast<int>(sizeof(T)));
static_assert(kWarps * kS * kS * 4 <= kStageBytes / 2, "the block reduction reuses a staging buffer");

// Whether the partial kernel's tile products run on tensor cores (kTc: 16-bit inputs always,
// fp32 with allow_tf32). False in the host pass.
template <typename T, bool kTc> constexpr bool kUseMma = kTc && tc::tc_available<T>;
// Shared memory of the partial kernel: the staging, and with tensor cores the kS P tiles (fp32)
// that the accumulators pass through, in the same buffer.
template <bool kMma> constexpr int kPartialSmemBytes =
    kMma && kS * kTile * kTile * 4 > kStageBytes ? kS * kTile * kTile * 4 : kStageBytes;

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
// token t0 + t). gs and as are the two halves of the staging buffer `buf`; with kMma, buf also
// holds the P tiles at the end.
// Every thread of the block must call it with the same arguments (it synchronises).
template <typename T, int NS, bool kMma>
__device__ __forceinline__ void tile_products(float (&P)[NS][kPatch * kPatch], const GramParams& p,
                                              const T* a, const T* g, int64_t s0, int64_t o0,
                                              int64_t c0, unsigned char* buf) {
  constexpr int kR = kRows<T>;
  constexpr int kTok = kR / NS;
  static_assert(kTok * NS == kR, "NS must divide kRows");
  T* gs = reinterpret_cast<T*>(buf);
  T* as = gs + kR * kTile;
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int k = 0; k < kPatch * kPatch; ++k) P[s][k] = 0.f;

  // Tensor cores: warp w owns the 16 x 16 quarters w, w + kWarps, ... (quarter q of sample
  // q / 4: o rows 16 * (q % 4 / 2), c columns 16 * (q % 2)).
  constexpr int kQuarters = NS * 4 / kWarps;
  static_assert(!kMma || kQuarters * kWarps == NS * 4, "the warps share the quarters evenly");
  static_assert(!kMma || kTok % tc::k_step<T>() == 0, "a pass holds whole product steps");
  using Acc = typename std::conditional<kMma, tc::Acc<T>, int>::type;
  Acc acc[kMma ? kQuarters : 1];
  const int warp = threadIdx.x / kWarpSize;
  if constexpr (kMma) {
#pragma unroll
    for (int i = 0; i < kQuarters; ++i) tc::wmma::fill_fragment(acc[i], 0.f);
  }

  const int tx = threadIdx.x % kPatchesPerRow;
  const int ty = threadIdx.x / kPatchesPerRow;
  // Staging: thread (row0, col) copies rows row0, row0 + kRowStep, ... of column col.
  const int col = threadIdx.x % kTile;
  const int row0 = threadIdx.x / kTile;
  const bool g_col = o0 + col < p.D_out;
  const bool a_col = c0 + col < p.D_in;
  const T zero = from_float<T>(0.f);
  for (int64_t t0 = 0; t0 < p.T; t0 += kTok) {
    const int tt = static_cast<int>(p.T - t0 < kTok ? p.T - t0 : kTok);
    __syncthreads();  // the previous pass (or the caller's last use of buf) is done reading
#pragma unroll
    for (int r = 0; r < kR / kRowStep; ++r) {
      const int row = row0 + kRowStep * r;  // = t * NS + s
      const int64_t smp = s0 + row % NS;
      const int64_t tok = t0 + row / NS;
      const bool ok = row / NS < tt && smp < p.B;
      gs[row * kTile + col] = ok && g_col ? g[smp * p.g_sb + tok * p.g_st + o0 + col] : zero;
      as[row * kTile + col] = ok && a_col ? a[smp * p.a_sb + tok * p.a_st + c0 + col] : zero;
    }
    __syncthreads();
    if constexpr (kMma) {
      // rows past tt are zero, so whole steps are exact
      constexpr int ld = NS * kTile;
#pragma unroll
      for (int i = 0; i < kQuarters; ++i) {
        const int q = warp + i * kWarps;
        const int s = q / 4;
        const T* gq = gs + s * kTile + 16 * (q % 4 / 2);
        const T* aq = as + s * kTile + 16 * (q % 2);
        for (int k = 0; k < tt; k += tc::k_step<T>())  // g^T is column-major in the staging
          tc::mma_step<T, tc::wmma::col_major, tc::wmma::row_major>(acc[i], gq + k * ld, ld,
                                                                   aq + k * ld, ld);
      }
    } else {
      for (int t = 0; t < tt; ++t) {
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          const int row = t * NS + s;
          const T* gr = gs + row * kTile + kPatch * ty;
          const T* ar = as + row * kTile + kPatch * tx;
          const float g0 = to_float(gr[0]), g1 = to_float(gr[1]);
          const float a0 = to_float(ar[0]), a1 = to_float(ar[1]);
          P[s][0] = fmaf(g0, a0, P[s][0]);
          P[s][1] = fmaf(g0, a1, P[s][1]);
          P[s][2] = fmaf(g1, a0, P[s][2]);
          P[s][3] = fmaf(g1, a1, P[s][3]);
        }
      }
    }
  }
  if constexpr (kMma) {  // accumulators -> P tiles in buf (over the staging) -> patches
    float* pt = reinterpret_cast<float*>(buf);  // NS x 32 x 32
    __syncthreads();  // every warp is done reading the staging
#pragma unroll
    for (int i = 0; i < kQuarters; ++i) {
      const int q = warp + i * kWarps;
      float* dst = pt + (q / 4) * kTile * kTile + 16 * (q % 4 / 2) * kTile + 16 * (q % 2);
      tc::wmma::store_matrix_sync(dst, acc[i], kTile, tc::wmma::mem_row_major);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int r = 0; r < kPatch; ++r)
#pragma unroll
        for (int c = 0; c < kPatch; ++c)
          P[s][r * kPatch + c] = pt[s * kTile * kTile + (kPatch * ty + r) * kTile + kPatch * tx + c];
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
template <typename T, bool kTc>
__global__ void __launch_bounds__(kThreads)
psg_partial_kernel(const GramParams p) {
  constexpr bool kMma = kUseMma<T, kTc>;
  const int64_t bj = blockIdx.x;
  const int64_t bi = blockIdx.y;
  if (bi > bj) return;  // lower triangle: the whole block leaves before any barrier
  __shared__ __align__(128) unsigned char buf[kPartialSmemBytes<kMma>];
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
    tile_products<T, kS, kMma>(pi, p, a, g, i0, o0, c0, buf);
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
        tile_products<T, kJS, kMma>(pj, p, a, g, j0 + j, o0, c0, buf);
#pragma unroll
        for (int jj = 0; jj < kJS; ++jj)
#pragma unroll
          for (int i = 0; i < kS; ++i) acc[i][j + jj] = dot4(pi[i], pj[jj], acc[i][j + jj]);
      }
    }
  }

  // Sum the per-thread partials over the block in a fixed order: butterfly within each warp, then
  // warp 0 .. kWarps-1 in order. buf is free again after the barrier.
  float* red = reinterpret_cast<float*>(buf);
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
