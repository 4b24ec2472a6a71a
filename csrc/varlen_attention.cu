// Variable-length attention launchers: head-dim and dtype dispatch, grids, shared-memory opt-in,
// and a cudaGetLastError check after every launch (failures are thrown as std::runtime_error).
#include <algorithm>

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
void launch(Kernel kernel, dim3 grid, int smem_floats, const VarlenAttnParams& p,
            cudaStream_t stream, const char* what) {
  const int smem = smem_floats * static_cast<int>(sizeof(float));
  if (smem > kDefaultSmemBytes)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), what);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), what);
}

template <typename T, int kD>
void fwd_typed(const VarlenAttnParams& p, cudaStream_t stream) {
  static_assert(fwd_smem_floats<kD>() * 4 <= kMaxSmemBytes, "forward tiles exceed 64 KiB");
  launch(varlen_fwd_kernel<T, kD>, tile_grid(p.max_seqlen_q, TileCfg<kD>::kFwdBM, p.H, p.batch),
         fwd_smem_floats<kD>(), p, stream, "varlen_attention_fwd kernel launch");
}

template <typename T, int kD>
void bwd_typed(const VarlenAttnParams& p, cudaStream_t stream) {
  static_assert(dq_smem_floats<kD>() * 4 <= kMaxSmemBytes, "dq tiles exceed 64 KiB");
  static_assert(dkdv_smem_floats<kD>() * 4 <= kMaxSmemBytes, "dk/dv tiles exceed 64 KiB");
  if (p.total_q > 0) {
    const int64_t warps = p.total_q * p.H;
    const int64_t blocks = std::min(ceil_div<int64_t>(warps, kThreads / kWarpSize), kDeltaMaxBlocks);
    varlen_bwd_delta_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "varlen_attention_bwd delta kernel launch");
    launch(varlen_bwd_dq_kernel<T, kD>, tile_grid(p.max_seqlen_q, TileCfg<kD>::kDqBM, p.H, p.batch),
           dq_smem_floats<kD>(), p, stream, "varlen_attention_bwd dq kernel launch");
  }
  if (p.total_k > 0)
    launch(varlen_bwd_dkdv_kernel<T, kD>,
           tile_grid(p.max_seqlen_k, TileCfg<kD>::kKvBN, p.H_kv, p.batch), dkdv_smem_floats<kD>(), p,
           stream, "varlen_attention_bwd dk/dv kernel launch");
}

// Calls F<T, kD>(p, stream) for the dtype and the padded head dim of p.
template <template <typename, int> class F>
void dispatch(const VarlenAttnParams& p, cudaStream_t stream) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    if (p.D <= 32) return F<T, 32>::run(p, stream);
    if (p.D <= 64) return F<T, 64>::run(p, stream);
    if (p.D <= 128) return F<T, 128>::run(p, stream);
    return F<T, 256>::run(p, stream);
  };
  switch (p.dtype) {
    case DType::kFloat32: return by_dim(float{});
    case DType::kFloat16: return by_dim(__half{});
    case DType::kBFloat16: return by_dim(__nv_bfloat16{});
  }
  throw std::invalid_argument("asvit_kernels._C: dtype must be 0, 1 or 2");
}

template <typename T, int kD> struct Fwd {
  static void run(const VarlenAttnParams& p, cudaStream_t s) { fwd_typed<T, kD>(p, s); }
};
template <typename T, int kD> struct Bwd {
  static void run(const VarlenAttnParams& p, cudaStream_t s) { bwd_typed<T, kD>(p, s); }
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
