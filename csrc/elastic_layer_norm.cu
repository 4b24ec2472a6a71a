// Elastic LayerNorm launchers: launch geometry, dtype dispatch, workspace layout, and a
// cudaGetLastError check after every launch (failures are thrown as std::runtime_error).
#include <algorithm>

#include "elastic_layer_norm.h"
#include "elastic_layer_norm_kernels.cuh"

namespace asvit {
namespace {

using namespace ln;

// ---- launch geometry ---------------------------------------------------------------------------
constexpr int kElemsPerThread = 4;       // target elements of a row per thread
constexpr int kMinBlockThreads = 128;    // short rows: pack rows until a block has this many
constexpr int64_t kMaxGrid = 0x7fffffff; // gridDim.x limit; kernels loop over the remaining rows

// dweight/dbias: rows are split into chunks so that about kTargetPartialBlocks blocks run.
constexpr int64_t kTargetPartialBlocks = 2048;
constexpr int64_t kMinRowsPerChunk = 32;
constexpr int64_t kMaxChunks = 1024;     // <= 65535 (gridDim.y limit)

struct RowLayout {
  int tx;  // threads per row (multiple of 32, <= kMaxRowThreads)
  int ty;  // rows per block
};

RowLayout row_layout(int64_t width) {
  int64_t tx = ceil_div<int64_t>(ceil_div<int64_t>(width, kElemsPerThread), kWarpSize) * kWarpSize;
  tx = std::min<int64_t>(std::max<int64_t>(tx, kWarpSize), kMaxRowThreads);
  const int ty = std::max<int>(1, kMinBlockThreads / static_cast<int>(tx));
  return {static_cast<int>(tx), ty};
}

unsigned grid_for_rows(int64_t rows, int rows_per_block) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(rows, rows_per_block), kMaxGrid));
}

int64_t bwd_row_chunks(int64_t rows, int64_t width) {
  if (rows <= 0 || width <= 0) return 0;
  const int64_t col_tiles = ceil_div<int64_t>(width, kColTile);
  const int64_t want = ceil_div<int64_t>(kTargetPartialBlocks, col_tiles);
  const int64_t by_rows = ceil_div<int64_t>(rows, kMinRowsPerChunk);
  return std::max<int64_t>(1, std::min({want, by_rows, kMaxChunks}));
}

// ---- typed launchers -----------------------------------------------------------------------------
template <typename T>
void fwd_typed(const LayerNormFwdArgs& a, cudaStream_t stream) {
  const RowLayout L = row_layout(a.width);
  const dim3 block(L.tx, L.ty);
  const dim3 grid(grid_for_rows(a.rows, L.ty));
  ln_fwd_kernel<T><<<grid, block, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.weight), static_cast<const T*>(a.bias),
      static_cast<T*>(a.y), a.mean, a.rstd, a.rows, static_cast<int>(a.width), a.x_row_stride,
      a.y_row_stride, static_cast<int>(a.C), static_cast<int>(a.offset), a.eps);
  check_cuda(cudaGetLastError(), "elastic_layer_norm_fwd kernel launch");
}

template <typename T>
void bwd_typed(const LayerNormBwdArgs& a, cudaStream_t stream) {
  const int width = static_cast<int>(a.width);
  const int C = static_cast<int>(a.C);
  const int offset = static_cast<int>(a.offset);
  if (a.dx != nullptr) {
    const RowLayout L = row_layout(a.width);
    const dim3 block(L.tx, L.ty);
    const dim3 grid(grid_for_rows(a.rows, L.ty));
    ln_bwd_dx_kernel<T><<<grid, block, 0, stream>>>(
        static_cast<const T*>(a.dy), static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
        a.mean, a.rstd, static_cast<T*>(a.dx), a.rows, width, a.dy_row_stride, a.x_row_stride,
        a.dx_row_stride, C, offset);
    check_cuda(cudaGetLastError(), "elastic_layer_norm_bwd dx kernel launch");
  }
  if (a.dweight != nullptr || a.dbias != nullptr) {
    const int64_t chunks = bwd_row_chunks(a.rows, a.width);
    const int64_t rows_per_chunk = ceil_div<int64_t>(a.rows, chunks);
    const unsigned col_tiles = static_cast<unsigned>(ceil_div<int64_t>(a.width, kColTile));
    float* ws_w = a.workspace;
    float* ws_b = a.workspace + chunks * a.width;

    ln_bwd_partial_kernel<T><<<dim3(col_tiles, static_cast<unsigned>(chunks)),
                               dim3(kColTile, kPartialRowThreads), 0, stream>>>(
        static_cast<const T*>(a.dy), static_cast<const T*>(a.x), a.mean, a.rstd, ws_w, ws_b, a.rows,
        width, a.dy_row_stride, a.x_row_stride, rows_per_chunk);
    check_cuda(cudaGetLastError(), "elastic_layer_norm_bwd partial-sum kernel launch");

    ln_bwd_reduce_kernel<T><<<dim3(col_tiles), dim3(kColTile, kReduceThreads), 0, stream>>>(
        ws_w, ws_b, static_cast<T*>(a.dweight), static_cast<T*>(a.dbias), width, chunks, C, offset);
    check_cuda(cudaGetLastError(), "elastic_layer_norm_bwd reduction kernel launch");
  }
}

}  // namespace

// ---- public entry points ---------------------------------------------------------------------------
int64_t elastic_layer_norm_bwd_workspace_numel(int64_t rows, int64_t width) {
  return 2 * bwd_row_chunks(rows, width) * width;
}

void launch_elastic_layer_norm_fwd(const LayerNormFwdArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return;
  switch (args.dtype) {
    case DType::kFloat32: return fwd_typed<float>(args, stream);
    case DType::kFloat16: return fwd_typed<__half>(args, stream);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(args, stream);
  }
  throw std::invalid_argument("asvit_kernels._C: dtype must be 0, 1 or 2");
}

void launch_elastic_layer_norm_bwd(const LayerNormBwdArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return;
  switch (args.dtype) {
    case DType::kFloat32: return bwd_typed<float>(args, stream);
    case DType::kFloat16: return bwd_typed<__half>(args, stream);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(args, stream);
  }
  throw std::invalid_argument("asvit_kernels._C: dtype must be 0, 1 or 2");
}

}  // namespace asvit
