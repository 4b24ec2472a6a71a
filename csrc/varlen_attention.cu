// Variable-length attention launchers: head-dim and dtype dispatch, grids, shared-memory opt-in,
// and a cudaGetLastError check after every launch (failures are thrown as std::runtime_error).
#include <algorithm>
#include <type_traits>

#include "varlen_attention.h"
#include "varlen_attention_kernels.cuh"

namespace asvit {
namespace {

using namespace va;

constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kMaxSmemBytes = 64 * 1024;      // opt-in limit of the smallest supported arch (sm_75)
constexpr int kDefaultSmemBytes = 48 * 1024;  // usable without cudaFuncSetAttribute
constexpr int64_t kDeltaMaxBlocks = 65536;

// (tiles of the longest sequence, heads, batch); the kernels grid-stride over every dimension, so
// capping is always safe. At least one tile even when max_seqlen is 0.
dim3 tile_grid(int64_t max_seqlen, int tile, int64_t heads, int64_t batch) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div<int64_t>(max_seqlen, tile));
  return dim3(static_cast<unsigned>(std::min(tiles, kMaxGridX)),
              static_cast<unsigned>(std::min(heads, kMaxGridYZ)),
              static_cast<unsigned>(std::min(batch, kMaxGridYZ)));
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int smem, const VarlenAttnParams& p, cudaStream_t stream,
            const char* what) {
  if (smem > kDefaultSmemBytes)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), what);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), what);
}

// kTc: tensor cores allowed (16-bit inputs always; fp32 only with allow_tf32, as tf32). Whether
// they are used also depends on the arch and the tiles: see varlen_attention_kernels.cuh.
template <typename T, int kD, bool kTc>
void fwd_typed(const VarlenAttnParams& p, cudaStream_t stream) {
  static_assert(fwd_smem_bytes<T, kD>() <= kMaxSmemBytes, "forward tiles exceed 64 KiB");
  launch(varlen_fwd_kernel<T, kD, kTc>, tile_grid(p.max_seqlen_q, FwdLayout<T, kD>::kBM, p.H, p.batch),
         fwd_smem_bytes<T, kD>(), p, stream, "varlen_attention_fwd kernel launch");
}

template <typename T, int kD, bool kTc>
void bwd_typed(const VarlenAttnParams& p, cudaStream_t stream) {
  static_assert(dq_smem_bytes<T, kD>() <= kMaxSmemBytes, "dq tiles exceed 64 KiB");
  static_assert(dkdv_smem_bytes<T, kD>() <= kMaxSmemBytes, "dk/dv tiles exceed 64 KiB");
  if (p.total_q > 0) {
    const int64_t warps = p.total_q * p.H;
    const int64_t blocks = std::min(ceil_div<int64_t>(warps, kWarps), kDeltaMaxBlocks);
    varlen_bwd_delta_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "varlen_attention_bwd delta kernel launch");
    launch(varlen_bwd_dq_kernel<T, kD, kTc>,
           tile_grid(p.max_seqlen_q, DqLayout<T, kD>::kBM, p.H, p.batch), dq_smem_bytes<T, kD>(), p,
           stream, "varlen_attention_bwd dq kernel launch");
  }
  if (p.total_k > 0)
    launch(varlen_bwd_dkdv_kernel<T, kD, kTc>,
           tile_grid(p.max_seqlen_k, DkdvLayout<T, kD>::kBN, p.H_kv, p.batch),
           dkdv_smem_bytes<T, kD>(), p, stream, "varlen_attention_bwd dk/dv kernel launch");
}

// Calls F<T, kD, kTc>(p, stream) for the dtype, the padded head dim and allow_tf32 of p.
template <template <typename, int, bool> class F>
void dispatch(const VarlenAttnParams& p, cudaStream_t stream) {
  auto by_dim = [&](auto tag, auto tc) {
    using T = decltype(tag);
    constexpr bool kTc = decltype(tc)::value;
    if (p.D <= 32) return F<T, 32, kTc>::run(p, stream);
    if (p.D <= 64) return F<T, 64, kTc>::run(p, stream);
    if (p.D <= 128) return F<T, 128, kTc>::run(p, stream);
    return F<T, 256, kTc>::run(p, stream);
  };
  switch (p.dtype) {
    case DType::kFloat32:
      return p.allow_tf32 ? by_dim(float{}, std::true_type{}) : by_dim(float{}, std::false_type{});
    case DType::kFloat16: return by_dim(__half{}, std::true_type{});
    case DType::kBFloat16: return by_dim(__nv_bfloat16{}, std::true_type{});
  }
  throw std::invalid_argument("asvit_kernels._C: dtype must be 0, 1 or 2");
}

template <typename T, int kD, bool kTc> struct Fwd {
  static void run(const VarlenAttnParams& p, cudaStream_t s) { fwd_typed<T, kD, kTc>(p, s); }
};
template <typename T, int kD, bool kTc> struct Bwd {
  static void run(const VarlenAttnParams& p, cudaStream_t s) { bwd_typed<T, kD, kTc>(p, s); }
};

}  // namespace

int64_t varlen_attention_bwd_workspace_numel(int64_t H, int64_t total_q) { return H * total_q; }

void launch_varlen_attention_fwd(const VarlenAttnParams& p, cudaStream_t stream) {
  if (p.total_q == 0 || p.batch == 0) return;
  dispatch<Fwd>(p, stream);
}

void launch_varlen_attention_bwd(const VarlenAttnParams& p, cudaStream_t stream) {
  if ((p.total_q == 0 && p.total_k == 0) || p.batch == 0) return;
  dispatch<Bwd>(p, stream);
}

}  // namespace asvit
