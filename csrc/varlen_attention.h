// Host interface of the variable-length (packed) attention kernels (varlen_attention.cu).
//
// Semantics (flash-attn varlen): q is (total_q, H, D), k and v are (total_k, H_kv, D), H a multiple
// of H_kv (query head h reads kv head h / (H / H_kv)). Sequence b owns query rows
// cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1 and key rows cu_seqlens_k[b] .. cu_seqlens_k[b+1]-1
// (int32 device arrays of batch + 1 entries). S = scale * q.k^T over the allowed keys; with
// causal, query i (0-based in its sequence) may attend key j iff j <= i + (len_k - len_q)
// (bottom-right aligned). out = softmax(S) v, lse[h, row] = log(sum exp S) (fp32, natural log).
// A row with no allowed key gets out = 0 and lse = -inf, and contributes nothing to the backward.
//
// Element strides: the last dimension is contiguous; token (`*_st`) and head (`*_sh`) strides are
// arbitrary. lse and the backward workspace are fp32 (H, total_q), contiguous.
// Arguments are validated by the caller (module.cpp); these functions only launch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace asvit {

constexpr int kVarlenMaxHeadDim = 256;

// Shared by the forward and backward launches; the pointers not used by a pass are null.
struct VarlenAttnParams {
  // forward inputs (q, k, v), forward outputs / backward inputs (out, lse)
  const void* q;
  const void* k;
  const void* v;
  void* out;    // forward: written; backward: read
  float* lse;   // forward: written; backward: read
  // backward only
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* delta;  // workspace: (H, total_q) fp32, delta = rowsum(dout * out)

  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch;
  int H;
  int H_kv;
  int D;
  int64_t total_q;
  int64_t total_k;
  int max_seqlen_q;  // upper bounds of the sequence lengths, used only to size the grids
  int max_seqlen_k;

  // element strides (token, head)
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, out_st, out_sh;
  int64_t dout_st, dout_sh, dq_st, dq_sh, dk_st, dk_sh, dv_st, dv_sh;

  float scale;
  bool causal;
  bool allow_tf32;  // fp32 inputs: tile products in tf32 on tensor cores (sm_80+), else fp32 FMA
  DType dtype;
};

// fp32 elements of workspace varlen_attention_bwd needs: H * total_q.
int64_t varlen_attention_bwd_workspace_numel(int64_t H, int64_t total_q);

// Launch on `stream`. The forward writes every element of out and lse; the backward every element
// of dq, dk and dv (rows that receive no gradient are written as 0). Deterministic: no atomics.
// cudaGetLastError() is checked after every launch and a failure is thrown as std::runtime_error.
void launch_varlen_attention_fwd(const VarlenAttnParams& p, cudaStream_t stream);
void launch_varlen_attention_bwd(const VarlenAttnParams& p, cudaStream_t stream);

}  // namespace asvit
