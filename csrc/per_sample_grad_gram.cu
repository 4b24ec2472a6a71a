// Per-sample-gradient Gram launchers: the work plan (sample blocks, tile chunks, workspace
// layout), dtype dispatch, and a cudaGetLastError check after every launch (failures are thrown
// as std::runtime_error).
#include <algorithm>

#include "per_sample_grad_gram.h"
#include "per_sample_grad_gram_kernels.cuh"

namespace asvit {
namespace {

using namespace psg;

// The tiles of G are split into chunks so that about kTargetBlocks partial blocks (upper-triangle
// pairs x chunks) run; each chunk writes its own kS x kS partial per pair. Fixed numbers, not the
// device's SM count: the workspace size must follow from the sizes alone.
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMaxChunks = 4096;  // <= 65535 (gridDim.z limit)

struct Plan {
  int64_t nb, pairs, tiles_in, tiles, tiles_per_chunk, chunks;
};

Plan make_plan(int64_t B, int64_t D_in, int64_t D_out) {
  Plan pl{};
  pl.nb = ceil_div<int64_t>(B, kS);
  pl.pairs = pl.nb * (pl.nb + 1) / 2;
  pl.tiles_in = ceil_div<int64_t>(D_in, kTile);
  pl.tiles = ceil_div<int64_t>(D_out, kTile) * pl.tiles_in;
  const int64_t want = std::max<int64_t>(
      1, std::min({ceil_div<int64_t>(kTargetBlocks, std::max<int64_t>(pl.pairs, 1)), pl.tiles,
                   kMaxChunks}));
  pl.tiles_per_chunk = ceil_div<int64_t>(pl.tiles, want);
  pl.chunks = ceil_div<int64_t>(pl.tiles, pl.tiles_per_chunk);  // no empty chunk
  return pl;
}

// kTc: tensor cores allowed (16-bit inputs always, fp32 with allow_tf32); the arch decides too.
template <typename T, bool kTc>
void gram_typed(const GramParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.nb), static_cast<unsigned>(p.nb),
                  static_cast<unsigned>(p.chunks));
  psg_partial_kernel<T, kTc><<<grid, kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "per_sample_grad_gram partial kernel launch");
  const dim3 rgrid(static_cast<unsigned>(ceil_div<int64_t>(p.B, kReduceX)),
                   static_cast<unsigned>(ceil_div<int64_t>(p.B, kReduceY)));
  psg_reduce_kernel<<<rgrid, dim3(kReduceX, kReduceY), 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "per_sample_grad_gram reduction kernel launch");
}

}  // namespace

// ---- public entry points -----------------------------------------------------------------------
int64_t per_sample_grad_gram_workspace_numel(int64_t B, int64_t T, int64_t D_in, int64_t D_out) {
  if (B <= 0 || T <= 0 || D_in <= 0 || D_out <= 0) return 0;
  const Plan pl = make_plan(B, D_in, D_out);
  return pl.chunks * pl.pairs * kS * kS;
}

void launch_per_sample_grad_gram(const PerSampleGradGramArgs& args, cudaStream_t stream) {
  if (args.B == 0) return;
  if (args.T == 0) {  // every G_i is 0
    check_cuda(cudaMemsetAsync(args.out, 0, static_cast<size_t>(args.B * args.B) * sizeof(float),
                               stream),
               "per_sample_grad_gram zero fill");
    return;
  }
  const Plan pl = make_plan(args.B, args.D_in, args.D_out);
  GramParams p{};
  p.a = args.a;
  p.g = args.g;
  p.out = args.out;
  p.ws = args.workspace;
  p.B = args.B;
  p.T = args.T;
  p.D_in = args.D_in;
  p.D_out = args.D_out;
  p.a_sb = args.a_sb;
  p.a_st = args.a_st;
  p.g_sb = args.g_sb;
  p.g_st = args.g_st;
  p.nb = pl.nb;
  p.pairs = pl.pairs;
  p.tiles_in = pl.tiles_in;
  p.tiles = pl.tiles;
  p.tiles_per_chunk = pl.tiles_per_chunk;
  p.chunks = pl.chunks;
  switch (args.dtype) {
    case DType::kFloat32:
      return args.allow_tf32 ? gram_typed<float, true>(p, stream) : gram_typed<float, false>(p, stream);
    case DType::kFloat16: return gram_typed<__half, true>(p, stream);
    case DType::kBFloat16: return gram_typed<__nv_bfloat16, true>(p, stream);
  }
  throw std::invalid_argument("asvit_kernels._C: dtype must be 0, 1 or 2");
}

}  // namespace asvit
