// Tensor-core tile products (WMMA, nvcuda::wmma) shared by the attention and Gram kernels.
//
// One 16 x 16 fp32 accumulator per warp-level product, operands in shared memory:
//   __half          m16n16k16, sm_70+
//   __nv_bfloat16   m16n16k16, sm_80+
//   float           m16n16k8 with precision::tf32 (inputs rounded to tf32), sm_80+
// tc_available<S> says whether the arch being compiled has the product for S; callers keep an
// fp32 FMA path for the other cases. The bf16 and tf32 fragments exist in <mma.h> only when
// __CUDA_AMPERE_MMA__ is defined (host pass and sm_80+), so their traits are guarded the same way
// and are only named from branches that tc_available discards.
//
// WMMA rules the callers satisfy: every pointer handed to load/store is 32-byte aligned, and
// the leading dimension is a multiple of 8 elements (16-bit) or 4 (float).
#pragma once

#include <type_traits>

#include <mma.h>

#include "device_utils.cuh"

namespace asvit {
namespace tc {

namespace wmma = nvcuda::wmma;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
constexpr bool kSm70 = true;
#else
constexpr bool kSm70 = false;
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kSm80 = true;
#else
constexpr bool kSm80 = false;
#endif

// Whether the device code being compiled runs WMMA on tiles of S (false in the host pass).
template <typename S>
constexpr bool tc_available = std::is_same<S, __half>::value ? kSm70 : kSm80;

// Fragment types of one 16 x 16 x kK product on S tiles.
template <typename S> struct Traits;
template <> struct Traits<__half> {
  static constexpr int kK = 16;
  using Elem = __half;
  template <class F> __device__ __forceinline__ static void round(F&) {}
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // <mma.h>'s __CUDA_AMPERE_MMA__
template <> struct Traits<__nv_bfloat16> {
  static constexpr int kK = 16;
  using Elem = __nv_bfloat16;
  template <class F> __device__ __forceinline__ static void round(F&) {}
};
template <> struct Traits<float> {
  static constexpr int kK = 8;
  using Elem = wmma::precision::tf32;
  // load_matrix_sync keeps fp32 bits; the product expects values rounded to tf32
  template <class F> __device__ __forceinline__ static void round(F& f) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
  }
};
#endif

// K of one product step for S tiles: 16 for 16-bit, 8 for tf32 (valid in every pass).
template <typename S> __host__ __device__ constexpr int k_step() { return std::is_same<S, float>::value ? 8 : 16; }

// Named through k_step (not Traits) so that it can be spelled where Traits<S> does not exist.
template <typename S>
using Acc = wmma::fragment<wmma::accumulator, 16, 16, k_step<S>(), float>;

// acc += A (16 x kK) B (kK x 16); LA / LB are wmma::row_major or wmma::col_major.
template <typename S, class LA, class LB>
__device__ __forceinline__ void mma_step(Acc<S>& acc, const S* a, int lda, const S* b, int ldb) {
  using Tr = Traits<S>;
  wmma::fragment<wmma::matrix_a, 16, 16, Tr::kK, typename Tr::Elem, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, Tr::kK, typename Tr::Elem, LB> fb;
  wmma::load_matrix_sync(fa, a, lda);
  wmma::load_matrix_sync(fb, b, ldb);
  Tr::round(fa);
  Tr::round(fb);
  wmma::mma_sync(acc, fa, fb, acc);
}

// C (M x N fp32, row stride ldc) = A (M x kdim, row-major) times B^T (kBT: B is N x kdim,
// row-major) or B (B is kdim x N, row-major), for the kWarps warps of a block (warp w owns the
// 16 x 16 output tiles w, w + kWarps, ...). kdim is rounded up to the step: the caller's tiles
// are zero there. Synchronises nothing: the caller puts barriers around it.
template <int kWarps, int M, int N, bool kBT, typename S>
__device__ __forceinline__ void block_mma(float* C, int ldc, const S* A, int lda, const S* B, int ldb,
                                          int kdim) {
  static_assert(M % 16 == 0 && N % 16 == 0, "tensor-core tiles are multiples of 16");
  using LB = typename std::conditional<kBT, wmma::col_major, wmma::row_major>::type;
  constexpr int kStep = Traits<S>::kK;
  constexpr int kTilesN = N / 16;
  const int kend = (kdim + kStep - 1) / kStep * kStep;
  for (int t = static_cast<int>(threadIdx.x) / kWarpSize; t < (M / 16) * kTilesN; t += kWarps) {
    const int tm = t / kTilesN * 16;
    const int tn = t % kTilesN * 16;
    Acc<S> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k = 0; k < kend; k += kStep)
      mma_step<S, wmma::row_major, LB>(acc, A + tm * lda + k, lda,
                                       kBT ? B + tn * ldb + k : B + k * ldb + tn, ldb);
    wmma::store_matrix_sync(C + tm * ldc + tn, acc, ldc, wmma::mem_row_major);
  }
}

}  // namespace tc
}  // namespace asvit
