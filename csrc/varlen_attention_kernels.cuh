// Variable-length (packed) attention device code (the launchers are in varlen_attention.cu).
//
// Flash-attention style: tiles of queries and keys are staged in shared memory in the input dtype,
// the score tile lives in registers, and the softmax is computed online, so no (len_q x len_k)
// matrix ever touches global memory. Softmax, masks, lse and every accumulator are fp32.
//
// Tile products (S = Q K^T, O += P V, dP = dO V^T, dQ += dS K, dV += P^T dO, dK += dS^T Q):
//   fp16                          tensor cores (WMMA m16n16k16, fp32 accumulation), sm_70+
//   bf16                          tensor cores from sm_80; fp32 FMA on sm_70/75
//   fp32 with allow_tf32          tensor cores (tf32 WMMA m16n16k8) from sm_80, where the tiles
//                                 are multiples of 16 (not the backward at head dim > 128)
//   fp32 otherwise                fp32 FMA (register-blocked, on the shared-memory tiles)
// A tensor-core product writes its 16 x 16 tiles to an fp32 scratch tile in shared memory, from
// which every thread takes its entries of the register tile (same layout as the FMA path), so the
// softmax and the masks are one code for both. P and dS are rounded to the input dtype (tf32 for
// fp32) before their products, as in FlashAttention.
// TODO(perf): cp.async double buffering, and mma.sync fragments kept in registers (no scratch).
//
// Kernels (one block = 128 threads, grid = (tiles of a sequence, heads, batch); every grid
// dimension is walked with a block-uniform grid-stride loop, so the result never depends on the
// grid size, only the speed does):
//   fwd   : a block owns kBM query rows of one (sequence, head) and streams the key/value tiles of
//           kBN rows: S = Q K^T, online softmax, O += P V. Writes out and lse.
//   delta : one warp per (row, head): delta = sum_d dout * out, into the workspace.
//   dq    : a block owns kBM query rows and streams the key tiles: recomputes P from lse,
//           dS = P * (dO V^T - delta), dQ += dS K.
//   dkdv  : a block owns kBN key rows of one kv head and streams the query tiles of every query
//           head of its GQA group: dV += P^T dO, dK += dS^T Q. The group sum happens inside the
//           block, so there are no atomics and the backward is run-to-run deterministic.
//
// Head dimension: kernels are instantiated for a padded width kD in {32, 64, 128, 256}; the real
// D (1..kD) bounds every global load and store, and the padding columns of the shared tiles are
// zero, so memory never needs padding (and the tensor-core K loop may run to D rounded up to 16).
#pragma once

#include <cstdint>
#include <type_traits>

#include "device_utils.cuh"
#include "tile_mma.cuh"
#include "varlen_attention.h"

namespace asvit {
namespace va {

// Threads per block of every kernel. The tile kernels declare __launch_bounds__(kThreads, 1):
// with the thread count alone ptxas capped them at 128 or 168 registers and spilled (seen with
// scripts/check_sass.sh); with a minimum of one block they use up to 255, spill nothing, and
// still fit two blocks per SM.
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// Tile shapes per padded head dim and element size. fwd: kBM queries x kBN keys; dq: kBM queries
// x kBN keys; dkdv: kBN keys x kBM queries. Chosen so that every kernel needs at most 64 KiB of
// shared memory (the opt-in limit of sm_75; more than 48 KiB is requested with
// cudaFuncSetAttribute), at most 64 fp32 accumulators per thread, and tiles of 16 (tensor cores)
// except fp32's backward at kD = 256, which only fits with 8-row tiles (FMA there).
template <int kD, int kBytes> struct TileCfg;
template <> struct TileCfg<32, 2> {
  static constexpr int kFwdBM = 64, kFwdBN = 64, kDqBM = 64, kDqBN = 32, kKvBN = 64, kKvBM = 32;
};
template <> struct TileCfg<64, 2> {
  static constexpr int kFwdBM = 64, kFwdBN = 64, kDqBM = 64, kDqBN = 32, kKvBN = 64, kKvBM = 32;
};
template <> struct TileCfg<128, 2> {
  static constexpr int kFwdBM = 32, kFwdBN = 32, kDqBM = 32, kDqBN = 32, kKvBN = 32, kKvBM = 32;
};
template <> struct TileCfg<256, 2> {
  static constexpr int kFwdBM = 32, kFwdBN = 16, kDqBM = 16, kDqBN = 16, kKvBN = 16, kKvBM = 16;
};
template <> struct TileCfg<32, 4> {
  static constexpr int kFwdBM = 64, kFwdBN = 64, kDqBM = 64, kDqBN = 32, kKvBN = 64, kKvBM = 32;
};
template <> struct TileCfg<64, 4> {
  static constexpr int kFwdBM = 64, kFwdBN = 32, kDqBM = 32, kDqBN = 32, kKvBN = 32, kKvBM = 32;
};
template <> struct TileCfg<128, 4> {
  static constexpr int kFwdBM = 32, kFwdBN = 32, kDqBM = 16, kDqBN = 16, kKvBN = 16, kKvBM = 16;
};
template <> struct TileCfg<256, 4> {
  static constexpr int kFwdBM = 16, kFwdBN = 16, kDqBM = 8, kDqBN = 16, kKvBN = 16, kKvBM = 8;
};

// Row stride (elements) of a shared tile of T with `cols` columns: 16 bytes of padding keeps
// rows 16-byte aligned (WMMA needs the leading dimension a multiple of 16 bytes) and shifts
// consecutive rows by 4 banks.
template <typename T> __host__ __device__ constexpr int tile_ld(int cols) { return cols + 16 / static_cast<int>(sizeof(T)); }
__host__ __device__ constexpr int scratch_ld(int cols) { return cols + 4; }  // fp32 scratch tiles

// Shared-memory layout of one kernel: its tiles of T one after the other (each a multiple of 32
// bytes, as WMMA pointers must be), then the fp32 scratch of the tensor-core products when the
// tiles allow them, then `tail` fp32 values (lse and delta rows).
struct Layout {
  int bytes = 0;
  template <typename T> __host__ __device__ constexpr int add(int rows, int ld) {
    const int at = bytes;
    bytes += (rows * ld * static_cast<int>(sizeof(T)) + 31) / 32 * 32;
    return at;
  }
};

template <typename T> __device__ __forceinline__ T* at(unsigned char* smem, int offset) {
  return reinterpret_cast<T*>(smem + offset);
}

// Whether a kernel with tiles `a` x `b` runs its products on tensor cores for T (kTc: the caller
// allows it, i.e. always for 16-bit inputs, allow_tf32 for fp32). False in the host pass.
template <typename T, bool kTc, int a, int b>
constexpr bool kUseMma = kTc && a % 16 == 0 && b % 16 == 0 && tc::tc_available<T>;
// The tiles allow tensor cores on some arch (decides whether the layout has the scratch tile).
template <int a, int b> constexpr bool kMmaTiles = a % 16 == 0 && b % 16 == 0;

template <typename T, int kD> struct FwdLayout {
  using C = TileCfg<kD, sizeof(T)>;
  static constexpr int kBM = C::kFwdBM, kBN = C::kFwdBN, kLd = tile_ld<T>(kD), kLdP = tile_ld<T>(kBN);
  static constexpr int kScratchFloats = kBM * scratch_ld(kD > kBN ? kD : kBN);
  Layout l;
  int q, kv, p, scratch;
  __host__ __device__ constexpr FwdLayout()
      : q(l.add<T>(kBM, kLd)), kv(l.add<T>(kBN, kLd)), p(l.add<T>(kBM, kLdP)),
        scratch(l.add<float>(kMmaTiles<kBM, kBN> ? kScratchFloats : 0, 1)) {}
};
template <typename T, int kD> struct DqLayout {
  using C = TileCfg<kD, sizeof(T)>;
  static constexpr int kBM = C::kDqBM, kBN = C::kDqBN, kLd = tile_ld<T>(kD), kLdS = tile_ld<T>(kBN);
  static constexpr int kScratchFloats = kBM * scratch_ld(kD > kBN ? kD : kBN);
  Layout l;
  int q, dout, k, v, ds, scratch, lse, delta;
  __host__ __device__ constexpr DqLayout()
      : q(l.add<T>(kBM, kLd)), dout(l.add<T>(kBM, kLd)), k(l.add<T>(kBN, kLd)), v(l.add<T>(kBN, kLd)),
        ds(l.add<T>(kBM, kLdS)), scratch(l.add<float>(kMmaTiles<kBM, kBN> ? kScratchFloats : 0, 1)),
        lse(l.add<float>(kBM, 1)), delta(l.add<float>(kBM, 1)) {}
};
template <typename T, int kD> struct DkdvLayout {
  using C = TileCfg<kD, sizeof(T)>;
  static constexpr int kBN = C::kKvBN, kBM = C::kKvBM, kLd = tile_ld<T>(kD), kLdS = tile_ld<T>(kBM);
  static constexpr int kScratchFloats = kBN * scratch_ld(kD > kBM ? kD : kBM);
  Layout l;
  int k, v, q, dout, pt, dst, scratch, lse, delta;
  __host__ __device__ constexpr DkdvLayout()
      : k(l.add<T>(kBN, kLd)), v(l.add<T>(kBN, kLd)), q(l.add<T>(kBM, kLd)), dout(l.add<T>(kBM, kLd)),
        pt(l.add<T>(kBN, kLdS)), dst(l.add<T>(kBN, kLdS)),
        scratch(l.add<float>(kMmaTiles<kBN, kBM> ? kScratchFloats : 0, 1)),
        lse(l.add<float>(kBM, 1)), delta(l.add<float>(kBM, 1)) {}
};
template <typename T, int kD> constexpr int fwd_smem_bytes() { return FwdLayout<T, kD>().l.bytes; }
template <typename T, int kD> constexpr int dq_smem_bytes() { return DqLayout<T, kD>().l.bytes; }
template <typename T, int kD> constexpr int dkdv_smem_bytes() { return DkdvLayout<T, kD>().l.bytes; }

// ---- sequences -----------------------------------------------------------------------------------
struct SeqBounds {
  int64_t q0, k0;        // first row of the sequence in the packed tensors
  int64_t len_q, len_k;
  int64_t diag;          // len_k - len_q: with causal, query i sees keys j <= i + diag
};

__device__ __forceinline__ SeqBounds seq_bounds(const VarlenAttnParams& p, int b) {
  SeqBounds s;
  s.q0 = p.cu_seqlens_q[b];
  s.k0 = p.cu_seqlens_k[b];
  s.len_q = p.cu_seqlens_q[b + 1] - s.q0;
  s.len_k = p.cu_seqlens_k[b + 1] - s.k0;
  s.diag = s.len_k - s.len_q;
  return s;
}

// Whether query row `i` may attend key `j` (both 0-based within the sequence).
__device__ __forceinline__ bool allowed(const SeqBounds& s, bool causal, int64_t i, int64_t j) {
  return i < s.len_q && j < s.len_k && (!causal || j <= i + s.diag);
}

// Exclusive end of the keys that query rows [m0, m0 + rows) may attend.
__device__ __forceinline__ int64_t key_end(const SeqBounds& s, bool causal, int64_t m0, int64_t rows) {
  if (!causal) return s.len_k;
  const int64_t last_row = (m0 + rows < s.len_q ? m0 + rows : s.len_q) - 1;
  const int64_t end = last_row + s.diag + 1;
  return end < s.len_k ? end : s.len_k;
}

// ---- shared-memory tiles -------------------------------------------------------------------------
// dst[r][c] (row stride ld) = src[r * stride_t + c] for r < rows_valid and c < D, else 0, for
// c < kD. Returns whether this thread loaded a non-finite value (see Frag::add_ab_seen).
template <int kRows, int kD, typename T>
__device__ __forceinline__ bool load_tile(T* dst, int ld, const T* src, int64_t stride_t,
                                          int64_t rows_valid, int D) {
  bool bad = false;
  for (int idx = threadIdx.x; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD;
    const int c = idx % kD;
    T v = from_float<T>(0.f);
    if (r < rows_valid && c < D) v = src[r * stride_t + c];
    bad |= !isfinite(to_float(v));
    dst[r * ld + c] = v;
  }
  return bad;
}

// dst[r] = scale * src[r] for r < rows_valid, else 0 (per-row lse / delta of a query tile).
template <int kRows>
__device__ __forceinline__ void load_rows(float* dst, const float* src, int64_t rows_valid, float scale) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) dst[r] = r < rows_valid ? src[r] * scale : 0.f;
}

// ---- register tiles ------------------------------------------------------------------------------
// A ROWS x COLS fp32 tile spread over the kThreads threads of a block: kTX threads across the
// columns, kThreads / kTX down the rows. Thread t owns rows t / kTX + i * kTY and columns
// t % kTX + j * kTX, so the kTX threads sharing a row are consecutive lanes of one warp. The
// FMA products read shared tiles of any element type S (converted to fp32).
template <int ROWS_, int COLS_, int kTX>
struct Frag {
  static constexpr int ROWS = ROWS_, COLS = COLS_;
  static constexpr int kTY = kThreads / kTX;
  static constexpr int RM = ROWS / kTY;
  static constexpr int RN = COLS / kTX;
  static_assert(kThreads % kTX == 0 && kTX <= kWarpSize, "kTX must divide the block, within a warp");
  static_assert(ROWS % kTY == 0 && COLS % kTX == 0, "tile must be a multiple of the thread grid");

  float v[RM][RN];

  __device__ __forceinline__ static int row(int i) { return static_cast<int>(threadIdx.x) / kTX + i * kTY; }
  __device__ __forceinline__ static int col(int j) { return static_cast<int>(threadIdx.x) % kTX + j * kTX; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) v[i][j] = 0.f;
  }

  // v += A B^T over k < kdim. A: ROWS x kdim (row stride lda), B: COLS x kdim (row stride ldb).
  template <typename S>
  __device__ __forceinline__ void add_abt(const S* A, int lda, const S* B, int ldb, int kdim) {
#pragma unroll 2
    for (int k = 0; k < kdim; ++k) {
      float a[RM], b[RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = to_float(A[row(i) * lda + k]);
#pragma unroll
      for (int j = 0; j < RN; ++j) b[j] = to_float(B[col(j) * ldb + k]);
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) v[i][j] = fmaf(a[i], b[j], v[i][j]);
    }
  }

  // v += A B over k < KDIM. A: ROWS x KDIM (row stride lda), B: KDIM x COLS (row stride ldb).
  template <int KDIM, typename S>
  __device__ __forceinline__ void add_ab(const S* A, int lda, const S* B, int ldb) {
#pragma unroll 4
    for (int k = 0; k < KDIM; ++k) {
      float a[RM], b[RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = to_float(A[row(i) * lda + k]);
#pragma unroll
      for (int j = 0; j < RN; ++j) b[j] = to_float(B[k * ldb + col(j)]);
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) v[i][j] = fmaf(a[i], b[j], v[i][j]);
    }
  }

  // add_ab over the pairs (row, k) that seen(row, k) allows only. A is 0 at the other pairs, but
  // B may hold NaN/inf there (a key under the causal frontier, a query row that does not see this
  // key), and 0 * inf = NaN would reach rows that never see it (on tensor cores as in FMA). Run
  // only for tiles whose B holds a non-finite value (block-uniform branch), so clean inputs pay
  // nothing; always FMA.
  template <int KDIM, typename S, typename Seen>
  __device__ __forceinline__ void add_ab_seen(const S* A, int lda, const S* B, int ldb, Seen seen) {
#pragma unroll 1  // the rare path: keep its registers and code small
    for (int k = 0; k < KDIM; ++k) {
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        if (!seen(row(i), k)) continue;
        const float a = to_float(A[row(i) * lda + k]);
#pragma unroll
        for (int j = 0; j < RN; ++j) v[i][j] = fmaf(a, to_float(B[k * ldb + col(j)]), v[i][j]);
      }
    }
  }

  // v = src (kAcc: v += src) from an fp32 shared tile of row stride ld.
  template <bool kAcc>
  __device__ __forceinline__ void take_shared(const float* src, int ld) {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) v[i][j] = (kAcc ? v[i][j] : 0.f) + src[row(i) * ld + col(j)];
  }

  // Tile to shared memory as S, row stride ld.
  template <typename S>
  __device__ __forceinline__ void store_shared(S* dst, int ld) const {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) dst[row(i) * ld + col(j)] = from_float<S>(v[i][j]);
  }

  // scale * tile to global rows dst[r * stride_t + c] for r < rows_valid and c < D.
  template <typename T>
  __device__ __forceinline__ void store_global(T* dst, int64_t stride_t, int64_t rows_valid, int D,
                                               float scale) const {
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      if (row(i) >= rows_valid) continue;
#pragma unroll
      for (int j = 0; j < RN; ++j)
        if (col(j) < D) dst[row(i) * stride_t + col(j)] = from_float<T>(v[i][j] * scale);
    }
  }
};

// f = A B^T over k < kdim (kBT), or f += A B over k < KDIM (!kBT), for shared tiles of S; every
// thread of the block calls it. kMma: on tensor cores into the fp32 scratch, then each thread takes
// its entries (two barriers: A and B must be complete before, and the scratch is free after).
// Otherwise register-blocked FMA straight into f (no barrier).
template <bool kMma, bool kBT, int KDIM, class F, typename S>
__device__ __forceinline__ void product(F& f, const S* A, int lda, const S* B, int ldb, int kdim,
                                        float* scratch) {
  if constexpr (kMma) {
    constexpr int ld = scratch_ld(F::COLS);
    tc::block_mma<kWarps, F::ROWS, F::COLS, kBT>(scratch, ld, A, lda, B, ldb, kBT ? kdim : KDIM);
    __syncthreads();
    f.template take_shared<!kBT>(scratch, ld);
    __syncthreads();
  } else if constexpr (kBT) {
    f.zero();
    f.add_abt(A, lda, B, ldb, kdim);
  } else {
    f.template add_ab<KDIM>(A, lda, B, ldb);
  }
}

// Max / sum over the 16 consecutive lanes that share a row of a kTX = 16 tile. Every lane of the
// warp must call them; each half-warp gets its own result.
__device__ __forceinline__ float row16_max(float x) {
#pragma unroll
  for (int m = 8; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}
__device__ __forceinline__ float row16_sum(float x) {
#pragma unroll
  for (int m = 8; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// ---- forward ---------------------------------------------------------------------------------------
// One tile of kBM query rows [m0, m0 + kBM) of head h. Every thread of the block calls it.
template <typename T, int kD, bool kTc>
__device__ __forceinline__ void fwd_tile(const VarlenAttnParams& p, const SeqBounds& s, int h,
                                         int64_t m0, unsigned char* smem) {
  using L = FwdLayout<T, kD>;
  constexpr L lay{};
  constexpr int kBM = L::kBM, kBN = L::kBN, kLd = L::kLd, kLdP = L::kLdP;
  constexpr bool kMma = kUseMma<T, kTc, kBM, kBN>;
  using SFrag = Frag<kBM, kBN, 16>;  // scores / probabilities
  using OFrag = Frag<kBM, kD, 16>;   // output accumulator: same rows per thread as SFrag
  T* Qs = at<T>(smem, lay.q);        // kBM x kD
  T* KVs = at<T>(smem, lay.kv);      // kBN x kD: the K tile, then the V tile
  T* Ps = at<T>(smem, lay.p);        // kBM x kBN
  float* scratch = at<float>(smem, lay.scratch);

  const int kvh = h / (p.H / p.H_kv);
  const T* q = static_cast<const T*>(p.q) + (s.q0 + m0) * p.q_st + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + s.k0 * p.k_st + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + s.k0 * p.v_st + kvh * p.v_sh;
  const int64_t rows = s.len_q - m0 < kBM ? s.len_q - m0 : kBM;
  const float scale_log2 = p.scale * kLog2e;  // softmax in base 2: exp(x) = exp2(x * log2 e)

  __syncthreads();  // the previous tile is done reading Qs
  load_tile<kBM, kD>(Qs, kLd, q, p.q_st, rows, p.D);

  float m_run[SFrag::RM], l_run[SFrag::RM];  // running max (base-2 units), per-thread partial sum
#pragma unroll
  for (int i = 0; i < SFrag::RM; ++i) {
    m_run[i] = kNegInf;
    l_run[i] = 0.f;
  }
  OFrag o;
  o.zero();

  const int64_t n_end = key_end(s, p.causal, m0, rows);
  for (int64_t n0 = 0; n0 < n_end; n0 += kBN) {
    __syncthreads();  // Qs is written; the previous iteration is done reading KVs and Ps
    load_tile<kBN, kD>(KVs, kLd, k + n0 * p.k_st, p.k_st, s.len_k - n0, p.D);
    __syncthreads();

    SFrag sc;
    product<kMma, true, kD>(sc, Qs, kLd, KVs, kLd, p.D, scratch);

#pragma unroll
    for (int i = 0; i < SFrag::RM; ++i) {
      const int64_t qi = m0 + SFrag::row(i);
      float mx = kNegInf;
#pragma unroll
      for (int j = 0; j < SFrag::RN; ++j) {
        const float x = allowed(s, p.causal, qi, n0 + SFrag::col(j)) ? sc.v[i][j] * scale_log2 : kNegInf;
        sc.v[i][j] = x;
        mx = fmaxf(mx, x);
      }
      const float m_new = fmaxf(m_run[i], row16_max(mx));
      const float m_use = m_new == kNegInf ? 0.f : m_new;  // no allowed key yet: keep p = 0, no NaN
      const float alpha = exp2f(m_run[i] - m_use);
      m_run[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < SFrag::RN; ++j) {
        sc.v[i][j] = exp2f(sc.v[i][j] - m_use);
        sum += sc.v[i][j];
      }
      l_run[i] = l_run[i] * alpha + sum;
#pragma unroll
      for (int j = 0; j < OFrag::RN; ++j) o.v[i][j] *= alpha;
    }

    __syncthreads();  // everyone is done reading the K tile
    const bool v_bad = load_tile<kBN, kD>(KVs, kLd, v + n0 * p.v_st, p.v_st, s.len_k - n0, p.D);
    sc.store_shared(Ps, kLdP);
    if (__syncthreads_or(v_bad))
      o.template add_ab_seen<kBN>(Ps, kLdP, KVs, kLd,
                                  [&](int r, int c) { return allowed(s, p.causal, m0 + r, n0 + c); });
    else
      product<kMma, false, kBN>(o, Ps, kLdP, KVs, kLd, kBN, scratch);
  }

  // out = O / l; lse = ln(sum exp S) = (m + log2 l) * ln 2. l = 0: the row sees no key (out 0,
  // lse -inf) or every score it sees is -inf, a 0/0 softmax (NaN). l NaN stays NaN, in lse too.
  T* out = static_cast<T*>(p.out) + (s.q0 + m0) * p.out_st + h * p.out_sh;
  float* lse = p.lse + h * p.total_q + s.q0 + m0;
#pragma unroll
  for (int i = 0; i < SFrag::RM; ++i) {
    const float l = row16_sum(l_run[i]);
    const int r = SFrag::row(i);
    if (r >= rows) continue;
    const bool sees = allowed(s, p.causal, m0 + r, 0);  // key 0 is the first any row can see
    const float none = sees ? __int_as_float(0x7fc00000) : 0.f;  // NaN, or the documented 0
#pragma unroll
    for (int j = 0; j < OFrag::RN; ++j)
      if (OFrag::col(j) < p.D)
        out[r * p.out_st + OFrag::col(j)] = from_float<T>(l != 0.f ? o.v[i][j] / l : none);
    if (threadIdx.x % 16 == 0)
      lse[r] = l != 0.f ? (m_run[i] + log2f(l)) * kLn2 : sees ? __int_as_float(0x7fc00000) : kNegInf;
  }
}

// Dynamic shared memory of every kernel (32-byte alignment for the WMMA pointers).
#define ASVIT_VA_SMEM()                                  \
  extern __shared__ __align__(128) unsigned char va_smem[]; \
  unsigned char* smem = va_smem

template <typename T, int kD, bool kTc>
__global__ void __launch_bounds__(kThreads, 1) varlen_fwd_kernel(const VarlenAttnParams p) {
  ASVIT_VA_SMEM();
  constexpr int kBM = FwdLayout<T, kD>::kBM;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const SeqBounds s = seq_bounds(p, b);
    for (int h = blockIdx.y; h < p.H; h += gridDim.y)
      for (int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM; m0 < s.len_q;
           m0 += static_cast<int64_t>(gridDim.x) * kBM)
        fwd_tile<T, kD, kTc>(p, s, h, m0, smem);
  }
}

// ---- backward: delta = rowsum(dout * out) ----------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) varlen_bwd_delta_kernel(const VarlenAttnParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n = p.total_q * p.H;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; w < n;
       w += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t row = w / p.H;
    const int h = static_cast<int>(w % p.H);
    const T* dout = static_cast<const T*>(p.dout) + row * p.dout_st + h * p.dout_sh;
    const T* out = static_cast<const T*>(p.out) + row * p.out_st + h * p.out_sh;
    float acc = 0.f;
    for (int d = lane; d < p.D; d += kWarpSize) acc += to_float(dout[d]) * to_float(out[d]);
    acc = warp_sum(acc);
    if (lane == 0) p.delta[h * p.total_q + row] = acc;
  }
}

// ---- backward: dq ------------------------------------------------------------------------------------
template <typename T, int kD, bool kTc>
__device__ __forceinline__ void dq_tile(const VarlenAttnParams& p, const SeqBounds& s, int h,
                                        int64_t m0, unsigned char* smem) {
  using L = DqLayout<T, kD>;
  constexpr L lay{};
  constexpr int kBM = L::kBM, kBN = L::kBN, kLd = L::kLd, kLdS = L::kLdS;
  constexpr bool kMma = kUseMma<T, kTc, kBM, kBN>;
  using SFrag = Frag<kBM, kBN, (kBN < 16 ? kBN : 16)>;
  using QFrag = Frag<kBM, kD, 16>;
  T* Qs = at<T>(smem, lay.q);       // kBM x kD
  T* dOs = at<T>(smem, lay.dout);   // kBM x kD
  T* Ks = at<T>(smem, lay.k);       // kBN x kD
  T* Vs = at<T>(smem, lay.v);       // kBN x kD
  T* dSs = at<T>(smem, lay.ds);     // kBM x kBN
  float* scratch = at<float>(smem, lay.scratch);
  float* lse2 = at<float>(smem, lay.lse);    // kBM: lse in base-2 units
  float* dlt = at<float>(smem, lay.delta);   // kBM: delta

  const int kvh = h / (p.H / p.H_kv);
  const int64_t row0 = s.q0 + m0;
  const T* k = static_cast<const T*>(p.k) + s.k0 * p.k_st + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + s.k0 * p.v_st + kvh * p.v_sh;
  const int64_t rows = s.len_q - m0 < kBM ? s.len_q - m0 : kBM;
  const float scale_log2 = p.scale * kLog2e;

  __syncthreads();  // the previous tile is done with the shared tiles
  load_tile<kBM, kD>(Qs, kLd, static_cast<const T*>(p.q) + row0 * p.q_st + h * p.q_sh, p.q_st, rows, p.D);
  load_tile<kBM, kD>(dOs, kLd, static_cast<const T*>(p.dout) + row0 * p.dout_st + h * p.dout_sh,
                     p.dout_st, rows, p.D);
  load_rows<kBM>(lse2, p.lse + h * p.total_q + row0, rows, kLog2e);
  load_rows<kBM>(dlt, p.delta + h * p.total_q + row0, rows, 1.f);

  QFrag dq;
  dq.zero();
  const int64_t n_end = key_end(s, p.causal, m0, rows);
  for (int64_t n0 = 0; n0 < n_end; n0 += kBN) {
    __syncthreads();  // the previous iteration is done reading Ks and dSs
    const bool k_bad = load_tile<kBN, kD>(Ks, kLd, k + n0 * p.k_st, p.k_st, s.len_k - n0, p.D);
    load_tile<kBN, kD>(Vs, kLd, v + n0 * p.v_st, p.v_st, s.len_k - n0, p.D);
    const bool any_k_bad = __syncthreads_or(k_bad);

    SFrag sc, dp;
    product<kMma, true, kD>(sc, Qs, kLd, Ks, kLd, p.D, scratch);
    product<kMma, true, kD>(dp, dOs, kLd, Vs, kLd, p.D, scratch);
#pragma unroll
    for (int i = 0; i < SFrag::RM; ++i) {
      const int r = SFrag::row(i);
#pragma unroll
      for (int j = 0; j < SFrag::RN; ++j) {
        float ds = 0.f;
        if (allowed(s, p.causal, m0 + r, n0 + SFrag::col(j))) {
          const float pr = exp2f(sc.v[i][j] * scale_log2 - lse2[r]);
          ds = pr * (dp.v[i][j] - dlt[r]);
        }
        sc.v[i][j] = ds;
      }
    }
    sc.store_shared(dSs, kLdS);
    __syncthreads();
    if (any_k_bad)
      dq.template add_ab_seen<kBN>(dSs, kLdS, Ks, kLd,
                                   [&](int r, int c) { return allowed(s, p.causal, m0 + r, n0 + c); });
    else
      product<kMma, false, kBN>(dq, dSs, kLdS, Ks, kLd, kBN, scratch);
  }
  dq.store_global(static_cast<T*>(p.dq) + row0 * p.dq_st + h * p.dq_sh, p.dq_st, rows, p.D, p.scale);
}

template <typename T, int kD, bool kTc>
__global__ void __launch_bounds__(kThreads, 1) varlen_bwd_dq_kernel(const VarlenAttnParams p) {
  ASVIT_VA_SMEM();
  constexpr int kBM = DqLayout<T, kD>::kBM;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const SeqBounds s = seq_bounds(p, b);
    for (int h = blockIdx.y; h < p.H; h += gridDim.y)
      for (int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM; m0 < s.len_q;
           m0 += static_cast<int64_t>(gridDim.x) * kBM)
        dq_tile<T, kD, kTc>(p, s, h, m0, smem);
  }
}

// ---- backward: dk, dv ----------------------------------------------------------------------------------
// One tile of kBN key rows [n0, n0 + kBN) of kv head kvh; loops over the query heads of its group.
template <typename T, int kD, bool kTc>
__device__ __forceinline__ void dkdv_tile(const VarlenAttnParams& p, const SeqBounds& s, int kvh,
                                          int64_t n0, unsigned char* smem) {
  using L = DkdvLayout<T, kD>;
  constexpr L lay{};
  constexpr int kBN = L::kBN, kBM = L::kBM, kLd = L::kLd, kLdS = L::kLdS;
  constexpr bool kMma = kUseMma<T, kTc, kBN, kBM>;
  using STFrag = Frag<kBN, kBM, (kBM < 16 ? kBM : 16)>;  // transposed scores: keys x queries
  using KFrag = Frag<kBN, kD, 16>;
  T* Ks = at<T>(smem, lay.k);       // kBN x kD
  T* Vs = at<T>(smem, lay.v);       // kBN x kD
  T* Qs = at<T>(smem, lay.q);       // kBM x kD
  T* dOs = at<T>(smem, lay.dout);   // kBM x kD
  T* Pt = at<T>(smem, lay.pt);      // kBN x kBM: P^T
  T* dSt = at<T>(smem, lay.dst);    // kBN x kBM: dS^T
  float* scratch = at<float>(smem, lay.scratch);
  float* lse2 = at<float>(smem, lay.lse);    // kBM
  float* dlt = at<float>(smem, lay.delta);   // kBM

  const int group = p.H / p.H_kv;
  const int64_t keys = s.len_k - n0 < kBN ? s.len_k - n0 : kBN;
  const float scale_log2 = p.scale * kLog2e;

  __syncthreads();  // the previous tile is done with the shared tiles
  load_tile<kBN, kD>(Ks, kLd, static_cast<const T*>(p.k) + (s.k0 + n0) * p.k_st + kvh * p.k_sh, p.k_st,
                     keys, p.D);
  load_tile<kBN, kD>(Vs, kLd, static_cast<const T*>(p.v) + (s.k0 + n0) * p.v_st + kvh * p.v_sh, p.v_st,
                     keys, p.D);

  KFrag dk, dv;
  dk.zero();
  dv.zero();
  // With causal, key j is seen by queries i >= j - diag only.
  int64_t m_begin = p.causal ? n0 - s.diag : 0;
  if (m_begin < 0) m_begin = 0;
  for (int g = 0; g < group; ++g) {
    const int h = kvh * group + g;
    for (int64_t m0 = m_begin; m0 < s.len_q; m0 += kBM) {
      const int64_t row0 = s.q0 + m0;
      const int64_t rows = s.len_q - m0 < kBM ? s.len_q - m0 : kBM;
      __syncthreads();  // Ks/Vs are written; the previous iteration is done reading Qs, dOs, Pt, dSt
      bool bad = load_tile<kBM, kD>(Qs, kLd, static_cast<const T*>(p.q) + row0 * p.q_st + h * p.q_sh,
                                    p.q_st, rows, p.D);
      bad |= load_tile<kBM, kD>(dOs, kLd,
                                static_cast<const T*>(p.dout) + row0 * p.dout_st + h * p.dout_sh,
                                p.dout_st, rows, p.D);
      load_rows<kBM>(lse2, p.lse + h * p.total_q + row0, rows, kLog2e);
      load_rows<kBM>(dlt, p.delta + h * p.total_q + row0, rows, 1.f);
      const bool any_bad = __syncthreads_or(bad);

      STFrag st, dpt;
      product<kMma, true, kD>(st, Ks, kLd, Qs, kLd, p.D, scratch);    // S^T = K Q^T
      product<kMma, true, kD>(dpt, Vs, kLd, dOs, kLd, p.D, scratch);  // dP^T = V dO^T
#pragma unroll
      for (int i = 0; i < STFrag::RM; ++i) {
#pragma unroll
        for (int j = 0; j < STFrag::RN; ++j) {
          const int c = STFrag::col(j);  // query row within the tile
          float pr = 0.f, ds = 0.f;
          if (allowed(s, p.causal, m0 + c, n0 + STFrag::row(i))) {
            pr = exp2f(st.v[i][j] * scale_log2 - lse2[c]);
            ds = pr * (dpt.v[i][j] - dlt[c]);
          }
          st.v[i][j] = pr;
          dpt.v[i][j] = ds;
        }
      }
      st.store_shared(Pt, kLdS);
      dpt.store_shared(dSt, kLdS);
      __syncthreads();
      if (any_bad) {
        const auto seen = [&](int r, int c) { return allowed(s, p.causal, m0 + c, n0 + r); };
        dv.template add_ab_seen<kBM>(Pt, kLdS, dOs, kLd, seen);
        dk.template add_ab_seen<kBM>(dSt, kLdS, Qs, kLd, seen);
      } else {
        product<kMma, false, kBM>(dv, Pt, kLdS, dOs, kLd, kBM, scratch);   // dV += P^T dO
        product<kMma, false, kBM>(dk, dSt, kLdS, Qs, kLd, kBM, scratch);   // dK += dS^T Q
      }
    }
  }
  dk.store_global(static_cast<T*>(p.dk) + (s.k0 + n0) * p.dk_st + kvh * p.dk_sh, p.dk_st, keys, p.D,
                  p.scale);
  dv.store_global(static_cast<T*>(p.dv) + (s.k0 + n0) * p.dv_st + kvh * p.dv_sh, p.dv_st, keys, p.D,
                  1.f);
}

template <typename T, int kD, bool kTc>
__global__ void __launch_bounds__(kThreads, 1) varlen_bwd_dkdv_kernel(const VarlenAttnParams p) {
  ASVIT_VA_SMEM();
  constexpr int kBN = DkdvLayout<T, kD>::kBN;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const SeqBounds s = seq_bounds(p, b);
    for (int kvh = blockIdx.y; kvh < p.H_kv; kvh += gridDim.y)
      for (int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN; n0 < s.len_k;
           n0 += static_cast<int64_t>(gridDim.x) * kBN)
        dkdv_tile<T, kD, kTc>(p, s, kvh, n0, smem);
  }
}

#undef ASVIT_VA_SMEM

}  // namespace va
}  // namespace asvit
