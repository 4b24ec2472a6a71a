// pybind11 bindings of asvit_kernels._C and the argument checks of every entry point.
//
// The ABI is torch-free: tensors arrive as device pointers (Python ints, 0 = None), sizes and row
// strides in elements, dtype codes (0 float32, 1 float16, 2 bfloat16) and the cudaStream_t as an
// int. Order of checks in every kernel entry: arguments (ValueError naming the argument), then
// rows == 0 -> no-op, then "is there a CUDA device" (RuntimeError), then the launches, each
// followed by a cudaGetLastError check (RuntimeError with the CUDA error string).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "common.h"
#include "elastic_layer_norm.h"
#include "per_sample_grad_gram.h"
#include "runtime_info.h"
#include "varlen_attention.h"

namespace py = pybind11;

namespace asvit {
namespace {

constexpr int64_t kMaxC = std::numeric_limits<int32_t>::max();

[[noreturn]] void bad_arg(const std::string& fn, const std::string& message) {
  throw std::invalid_argument("asvit_kernels._C." + fn + ": " + message);
}

template <typename V>
std::string str(const V& v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

size_t element_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

DType check_dtype(const char* fn, int dtype) {
  if (!is_valid_dtype(dtype))
    bad_arg(fn, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + str(dtype));
  return static_cast<DType>(dtype);
}

// rows, C, width, offset: shared by forward and backward.
void check_sizes(const char* fn, int64_t rows, int64_t width, int64_t C, int64_t offset) {
  if (rows < 0) bad_arg(fn, "rows must be >= 0, got " + str(rows));
  if (C < 1 || C > kMaxC) bad_arg(fn, "C must be in [1, " + str(kMaxC) + "], got " + str(C));
  if (width < 1) bad_arg(fn, "width must be >= 1, got " + str(width));
  if (width > C) bad_arg(fn, "width must be <= C, got width=" + str(width) + " and C=" + str(C));
  if (offset < 0 || offset >= C)
    bad_arg(fn, "offset must be in [0, C) = [0, " + str(C) + "), got " + str(offset));
}

// Pointer `name` (0 allowed only when !required) is aligned to its element size.
void check_ptr(const char* fn, const char* name, uintptr_t p, size_t align, bool required) {
  if (p == 0) {
    if (required) bad_arg(fn, std::string(name) + " must be a non-null device pointer, got 0");
    return;
  }
  if (p % align != 0)
    bad_arg(fn, std::string(name) + " (" + str(p) + ") is not aligned to its element size (" +
                    str(align) + " bytes)");
}

// Inputs may use any stride >= 0; an output needs rows that do not overlap.
void check_stride(const char* fn, const char* name, int64_t stride, int64_t rows, int64_t width,
                  bool output) {
  if (stride < 0) bad_arg(fn, std::string(name) + " must be >= 0, got " + str(stride));
  if (output && rows > 1 && stride < width)
    bad_arg(fn, std::string(name) + " must be >= width (" + str(width) +
                    ") so output rows do not overlap, got " + str(stride));
}

template <typename P>
P* as_ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void elastic_layer_norm_fwd(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y,
                            uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t width,
                            int64_t x_row_stride, int64_t y_row_stride, int64_t C, int64_t offset,
                            double eps, int dtype, uintptr_t stream) {
  const char* fn = "elastic_layer_norm_fwd";
  const DType dt = check_dtype(fn, dtype);
  check_sizes(fn, rows, width, C, offset);
  const size_t es = element_size(dt);
  check_ptr(fn, "x", x, es, true);
  check_ptr(fn, "y", y, es, true);
  check_ptr(fn, "weight", weight, es, false);
  check_ptr(fn, "bias", bias, es, false);
  check_ptr(fn, "mean", mean, 4, false);
  check_ptr(fn, "rstd", rstd, 4, false);
  check_stride(fn, "x_row_stride", x_row_stride, rows, width, false);
  check_stride(fn, "y_row_stride", y_row_stride, rows, width, true);
  if (!std::isfinite(eps) || eps < 0) bad_arg(fn, "eps must be finite and >= 0, got " + str(eps));
  if (rows == 0) return;
  require_device();

  LayerNormFwdArgs a{};
  a.x = as_ptr<const void>(x);
  a.weight = as_ptr<const void>(weight);
  a.bias = as_ptr<const void>(bias);
  a.y = as_ptr<void>(y);
  a.mean = as_ptr<float>(mean);
  a.rstd = as_ptr<float>(rstd);
  a.rows = rows;
  a.width = width;
  a.x_row_stride = x_row_stride;
  a.y_row_stride = y_row_stride;
  a.C = C;
  a.offset = offset;
  a.eps = static_cast<float>(eps);
  a.dtype = dt;
  py::gil_scoped_release no_gil;
  launch_elastic_layer_norm_fwd(a, as_stream(stream));
}

int64_t bwd_workspace_numel(int64_t rows, int64_t width) {
  const char* fn = "elastic_layer_norm_bwd_workspace_numel";
  if (rows < 0) bad_arg(fn, "rows must be >= 0, got " + str(rows));
  if (width < 1 || width > kMaxC)
    bad_arg(fn, "width must be in [1, " + str(kMaxC) + "], got " + str(width));
  return elastic_layer_norm_bwd_workspace_numel(rows, width);
}

void elastic_layer_norm_bwd(uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t mean,
                            uintptr_t rstd, uintptr_t dx, uintptr_t dweight, uintptr_t dbias,
                            uintptr_t workspace, int64_t rows, int64_t width,
                            int64_t dy_row_stride, int64_t x_row_stride, int64_t dx_row_stride,
                            int64_t C, int64_t offset, int dtype, uintptr_t stream) {
  const char* fn = "elastic_layer_norm_bwd";
  const DType dt = check_dtype(fn, dtype);
  check_sizes(fn, rows, width, C, offset);
  const size_t es = element_size(dt);
  check_ptr(fn, "dy", dy, es, true);
  check_ptr(fn, "x", x, es, true);
  check_ptr(fn, "mean", mean, 4, true);
  check_ptr(fn, "rstd", rstd, 4, true);
  check_ptr(fn, "weight", weight, es, false);
  check_ptr(fn, "dx", dx, es, false);
  check_ptr(fn, "dweight", dweight, es, false);
  check_ptr(fn, "dbias", dbias, es, false);
  if (dweight != 0 && weight == 0)
    bad_arg(fn, "dweight must be 0 (None) when weight is 0 (None): there is no weight to differentiate");
  const bool param_grads = dweight != 0 || dbias != 0;
  check_ptr(fn, "workspace", workspace, 4, param_grads && rows > 0);
  check_stride(fn, "dy_row_stride", dy_row_stride, rows, width, false);
  check_stride(fn, "x_row_stride", x_row_stride, rows, width, false);
  if (dx != 0) check_stride(fn, "dx_row_stride", dx_row_stride, rows, width, true);
  if (rows == 0) return;
  require_device();

  LayerNormBwdArgs a{};
  a.dy = as_ptr<const void>(dy);
  a.x = as_ptr<const void>(x);
  a.weight = as_ptr<const void>(weight);
  a.mean = as_ptr<const float>(mean);
  a.rstd = as_ptr<const float>(rstd);
  a.dx = as_ptr<void>(dx);
  a.dweight = as_ptr<void>(dweight);
  a.dbias = as_ptr<void>(dbias);
  a.workspace = as_ptr<float>(workspace);
  a.rows = rows;
  a.width = width;
  a.dy_row_stride = dy_row_stride;
  a.x_row_stride = x_row_stride;
  a.dx_row_stride = dx_row_stride;
  a.C = C;
  a.offset = offset;
  a.dtype = dt;
  py::gil_scoped_release no_gil;
  launch_elastic_layer_norm_bwd(a, as_stream(stream));
}


// ---- variable-length attention ----------------------------------------------------------------
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// Sizes shared by the forward and the backward.
void check_varlen_sizes(const char* fn, int64_t batch, int64_t total_q, int64_t total_k, int64_t H,
                        int64_t H_kv, int64_t D, int64_t max_seqlen_q, int64_t max_seqlen_k,
                        double scale) {
  if (batch < 0 || batch >= kMaxInt32)
    bad_arg(fn, "batch must be in [0, " + str(kMaxInt32 - 1) + "], got " + str(batch));
  if (total_q < 0 || total_q > kMaxInt32)
    bad_arg(fn, "total_q must be in [0, " + str(kMaxInt32) + "], got " + str(total_q));
  if (total_k < 0 || total_k > kMaxInt32)
    bad_arg(fn, "total_k must be in [0, " + str(kMaxInt32) + "], got " + str(total_k));
  if (batch == 0 && (total_q != 0 || total_k != 0))
    bad_arg(fn, "batch is 0 but total_q=" + str(total_q) + " and total_k=" + str(total_k) +
                    " (both must be 0: no sequence owns those rows)");
  if (H < 1 || H > kMaxInt32) bad_arg(fn, "H must be in [1, " + str(kMaxInt32) + "], got " + str(H));
  if (H_kv < 1 || H_kv > H)
    bad_arg(fn, "H_kv must be in [1, H] = [1, " + str(H) + "], got " + str(H_kv));
  if (H % H_kv != 0)
    bad_arg(fn, "H_kv must divide H (grouped-query attention), got H=" + str(H) + " and H_kv=" +
                    str(H_kv));
  if (D < 1 || D > kVarlenMaxHeadDim)
    bad_arg(fn, "D must be in [1, " + str(kVarlenMaxHeadDim) + "], got " + str(D));
  if (max_seqlen_q < 0 || max_seqlen_q > kMaxInt32)
    bad_arg(fn, "max_seqlen_q must be in [0, " + str(kMaxInt32) + "], got " + str(max_seqlen_q));
  if (max_seqlen_k < 0 || max_seqlen_k > kMaxInt32)
    bad_arg(fn, "max_seqlen_k must be in [0, " + str(kMaxInt32) + "], got " + str(max_seqlen_k));
  if (!std::isfinite(scale)) bad_arg(fn, "scale must be finite, got " + str(scale));
}

// Strides of a (tokens, heads, D) operand with a contiguous last dimension. Inputs accept any
// stride >= 0; an output must not have two elements at the same address (checked with the usual
// sufficient rule: sorted by stride, each dimension of size > 1 starts past the previous extent).
void check_tensor_strides(const char* fn, const std::string& name, int64_t stride_t, int64_t stride_h,
                          int64_t tokens, int64_t heads, int64_t D, bool output) {
  if (stride_t < 0) bad_arg(fn, name + "_stride_t must be >= 0, got " + str(stride_t));
  if (stride_h < 0) bad_arg(fn, name + "_stride_h must be >= 0, got " + str(stride_h));
  if (!output) return;
  struct Dim { int64_t stride, size; const char* what; };
  std::array<Dim, 3> dims{{{1, D, "D"}, {stride_h, heads, "_stride_h"}, {stride_t, tokens, "_stride_t"}}};
  std::stable_sort(dims.begin(), dims.end(),
                   [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  __int128 extent = 0;  // end of the span covered by the dimensions checked so far
  for (const Dim& d : dims) {
    if (d.size <= 1) continue;
    if (d.stride == 0 || static_cast<__int128>(d.stride) < extent)
      bad_arg(fn, name + d.what + " (" + str(d.stride) + ") makes elements of " + name +
                      " overlap: a (" + str(tokens) + ", " + str(heads) + ", " + str(D) +
                      ") output with strides (" + str(stride_t) + ", " + str(stride_h) + ", 1)");
    extent = static_cast<__int128>(d.stride) * d.size;
  }
}

void varlen_attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                          uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k, int64_t batch,
                          int64_t total_q, int64_t total_k, int64_t H, int64_t H_kv, int64_t D,
                          int64_t q_stride_t, int64_t q_stride_h, int64_t k_stride_t,
                          int64_t k_stride_h, int64_t v_stride_t, int64_t v_stride_h,
                          int64_t out_stride_t, int64_t out_stride_h, int64_t max_seqlen_q,
                          int64_t max_seqlen_k, double scale, bool causal, int dtype,
                          uintptr_t stream, bool allow_tf32) {
  const char* fn = "varlen_attention_fwd";
  const DType dt = check_dtype(fn, dtype);
  check_varlen_sizes(fn, batch, total_q, total_k, H, H_kv, D, max_seqlen_q, max_seqlen_k, scale);
  const size_t es = element_size(dt);
  check_ptr(fn, "q", q, es, total_q > 0);
  check_ptr(fn, "k", k, es, total_k > 0);
  check_ptr(fn, "v", v, es, total_k > 0);
  check_ptr(fn, "out", out, es, total_q > 0);
  check_ptr(fn, "lse", lse, 4, total_q > 0);
  check_ptr(fn, "cu_seqlens_q", cu_seqlens_q, 4, batch > 0);
  check_ptr(fn, "cu_seqlens_k", cu_seqlens_k, 4, batch > 0);
  check_tensor_strides(fn, "q", q_stride_t, q_stride_h, total_q, H, D, false);
  check_tensor_strides(fn, "k", k_stride_t, k_stride_h, total_k, H_kv, D, false);
  check_tensor_strides(fn, "v", v_stride_t, v_stride_h, total_k, H_kv, D, false);
  check_tensor_strides(fn, "out", out_stride_t, out_stride_h, total_q, H, D, true);
  if (total_q == 0) return;
  require_device();

  VarlenAttnParams p{};
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.out = as_ptr<void>(out);
  p.lse = as_ptr<float>(lse);
  p.cu_seqlens_q = as_ptr<const int32_t>(cu_seqlens_q);
  p.cu_seqlens_k = as_ptr<const int32_t>(cu_seqlens_k);
  p.batch = static_cast<int>(batch);
  p.H = static_cast<int>(H);
  p.H_kv = static_cast<int>(H_kv);
  p.D = static_cast<int>(D);
  p.total_q = total_q;
  p.total_k = total_k;
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  p.q_st = q_stride_t;
  p.q_sh = q_stride_h;
  p.k_st = k_stride_t;
  p.k_sh = k_stride_h;
  p.v_st = v_stride_t;
  p.v_sh = v_stride_h;
  p.out_st = out_stride_t;
  p.out_sh = out_stride_h;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.allow_tf32 = allow_tf32;
  p.dtype = dt;
  py::gil_scoped_release no_gil;
  launch_varlen_attention_fwd(p, as_stream(stream));
}

int64_t varlen_bwd_workspace_numel(int64_t H, int64_t total_q) {
  const char* fn = "varlen_attention_bwd_workspace_numel";
  if (H < 1 || H > kMaxInt32) bad_arg(fn, "H must be in [1, " + str(kMaxInt32) + "], got " + str(H));
  if (total_q < 0 || total_q > kMaxInt32)
    bad_arg(fn, "total_q must be in [0, " + str(kMaxInt32) + "], got " + str(total_q));
  return varlen_attention_bwd_workspace_numel(H, total_q);
}

void varlen_attention_bwd(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                          uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv,
                          uintptr_t workspace, uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k,
                          int64_t batch, int64_t total_q, int64_t total_k, int64_t H, int64_t H_kv,
                          int64_t D, int64_t dout_stride_t, int64_t dout_stride_h,
                          int64_t q_stride_t, int64_t q_stride_h, int64_t k_stride_t,
                          int64_t k_stride_h, int64_t v_stride_t, int64_t v_stride_h,
                          int64_t out_stride_t, int64_t out_stride_h, int64_t dq_stride_t,
                          int64_t dq_stride_h, int64_t dk_stride_t, int64_t dk_stride_h,
                          int64_t dv_stride_t, int64_t dv_stride_h, int64_t max_seqlen_q,
                          int64_t max_seqlen_k, double scale, bool causal, int dtype,
                          uintptr_t stream, bool allow_tf32) {
  const char* fn = "varlen_attention_bwd";
  const DType dt = check_dtype(fn, dtype);
  check_varlen_sizes(fn, batch, total_q, total_k, H, H_kv, D, max_seqlen_q, max_seqlen_k, scale);
  const size_t es = element_size(dt);
  const bool has_q = total_q > 0, has_k = total_k > 0;
  check_ptr(fn, "dout", dout, es, has_q);
  check_ptr(fn, "q", q, es, has_q);
  check_ptr(fn, "k", k, es, has_k);
  check_ptr(fn, "v", v, es, has_k);
  check_ptr(fn, "out", out, es, has_q);
  check_ptr(fn, "lse", lse, 4, has_q);
  check_ptr(fn, "dq", dq, es, has_q);
  check_ptr(fn, "dk", dk, es, has_k);
  check_ptr(fn, "dv", dv, es, has_k);
  check_ptr(fn, "workspace", workspace, 4, has_q);
  check_ptr(fn, "cu_seqlens_q", cu_seqlens_q, 4, batch > 0);
  check_ptr(fn, "cu_seqlens_k", cu_seqlens_k, 4, batch > 0);
  check_tensor_strides(fn, "dout", dout_stride_t, dout_stride_h, total_q, H, D, false);
  check_tensor_strides(fn, "q", q_stride_t, q_stride_h, total_q, H, D, false);
  check_tensor_strides(fn, "k", k_stride_t, k_stride_h, total_k, H_kv, D, false);
  check_tensor_strides(fn, "v", v_stride_t, v_stride_h, total_k, H_kv, D, false);
  check_tensor_strides(fn, "out", out_stride_t, out_stride_h, total_q, H, D, false);
  check_tensor_strides(fn, "dq", dq_stride_t, dq_stride_h, total_q, H, D, true);
  check_tensor_strides(fn, "dk", dk_stride_t, dk_stride_h, total_k, H_kv, D, true);
  check_tensor_strides(fn, "dv", dv_stride_t, dv_stride_h, total_k, H_kv, D, true);
  if (total_q == 0 && total_k == 0) return;
  require_device();

  VarlenAttnParams p{};
  p.dout = as_ptr<const void>(dout);
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.out = as_ptr<void>(out);
  p.lse = as_ptr<float>(lse);
  p.dq = as_ptr<void>(dq);
  p.dk = as_ptr<void>(dk);
  p.dv = as_ptr<void>(dv);
  p.delta = as_ptr<float>(workspace);
  p.cu_seqlens_q = as_ptr<const int32_t>(cu_seqlens_q);
  p.cu_seqlens_k = as_ptr<const int32_t>(cu_seqlens_k);
  p.batch = static_cast<int>(batch);
  p.H = static_cast<int>(H);
  p.H_kv = static_cast<int>(H_kv);
  p.D = static_cast<int>(D);
  p.total_q = total_q;
  p.total_k = total_k;
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  p.q_st = q_stride_t;
  p.q_sh = q_stride_h;
  p.k_st = k_stride_t;
  p.k_sh = k_stride_h;
  p.v_st = v_stride_t;
  p.v_sh = v_stride_h;
  p.out_st = out_stride_t;
  p.out_sh = out_stride_h;
  p.dout_st = dout_stride_t;
  p.dout_sh = dout_stride_h;
  p.dq_st = dq_stride_t;
  p.dq_sh = dq_stride_h;
  p.dk_st = dk_stride_t;
  p.dk_sh = dk_stride_h;
  p.dv_st = dv_stride_t;
  p.dv_sh = dv_stride_h;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.allow_tf32 = allow_tf32;
  p.dtype = dt;
  py::gil_scoped_release no_gil;
  launch_varlen_attention_bwd(p, as_stream(stream));
}

// ---- per-sample-gradient Gram (one linear layer's empirical NTK) --------------------------------
constexpr int64_t kGramMaxB = 65536;

void check_gram_sizes(const char* fn, int64_t B, int64_t T, int64_t D_in, int64_t D_out) {
  if (B < 0 || B > kGramMaxB)
    bad_arg(fn, "B must be in [0, " + str(kGramMaxB) + "], got " + str(B));
  if (T < 0 || T > kMaxInt32)
    bad_arg(fn, "T must be in [0, " + str(kMaxInt32) + "], got " + str(T));
  if (D_in < 1 || D_in > kMaxInt32)
    bad_arg(fn, "D_in must be in [1, " + str(kMaxInt32) + "], got " + str(D_in));
  if (D_out < 1 || D_out > kMaxInt32)
    bad_arg(fn, "D_out must be in [1, " + str(kMaxInt32) + "], got " + str(D_out));
}

int64_t gram_workspace_numel(int64_t B, int64_t T, int64_t D_in, int64_t D_out) {
  const char* fn = "per_sample_grad_gram_workspace_numel";
  check_gram_sizes(fn, B, T, D_in, D_out);
  return per_sample_grad_gram_workspace_numel(B, T, D_in, D_out);
}

void per_sample_grad_gram(uintptr_t a, uintptr_t g, uintptr_t out, uintptr_t workspace, int64_t B,
                          int64_t T, int64_t D_in, int64_t D_out, int64_t a_stride_b,
                          int64_t a_stride_t, int64_t g_stride_b, int64_t g_stride_t, int dtype,
                          uintptr_t stream, bool allow_tf32) {
  const char* fn = "per_sample_grad_gram";
  const DType dt = check_dtype(fn, dtype);
  check_gram_sizes(fn, B, T, D_in, D_out);
  const size_t es = element_size(dt);
  const bool work = B > 0 && T > 0;
  check_ptr(fn, "a", a, es, work);
  check_ptr(fn, "g", g, es, work);
  check_ptr(fn, "out", out, 4, B > 0);
  check_ptr(fn, "workspace", workspace, 4,
            per_sample_grad_gram_workspace_numel(B, T, D_in, D_out) > 0);
  if (a_stride_b < 0) bad_arg(fn, "a_stride_b must be >= 0, got " + str(a_stride_b));
  if (a_stride_t < 0) bad_arg(fn, "a_stride_t must be >= 0, got " + str(a_stride_t));
  if (g_stride_b < 0) bad_arg(fn, "g_stride_b must be >= 0, got " + str(g_stride_b));
  if (g_stride_t < 0) bad_arg(fn, "g_stride_t must be >= 0, got " + str(g_stride_t));
  if (B == 0) return;
  require_device();

  PerSampleGradGramArgs p{};
  p.a = as_ptr<const void>(a);
  p.g = as_ptr<const void>(g);
  p.out = as_ptr<float>(out);
  p.workspace = as_ptr<float>(workspace);
  p.B = B;
  p.T = T;
  p.D_in = D_in;
  p.D_out = D_out;
  p.a_sb = a_stride_b;
  p.a_st = a_stride_t;
  p.g_sb = g_stride_b;
  p.g_st = g_stride_t;
  p.allow_tf32 = allow_tf32;
  p.dtype = dt;
  py::gil_scoped_release no_gil;
  launch_per_sample_grad_gram(p, as_stream(stream));
}

}  // namespace
}  // namespace asvit

PYBIND11_MODULE(_C, m) {
  using namespace asvit;
  m.doc() =
      "asvit_kernels CUDA kernels behind a torch-free ABI: device pointers, sizes and strides (in "
      "elements) and the cudaStream_t are passed as Python ints; pointer 0 means None. dtype codes: "
      "0 float32, 1 float16, 2 bfloat16. Bad arguments raise ValueError; a missing GPU or a CUDA "
      "launch error raises RuntimeError. The kernels run on the calling thread's current CUDA "
      "device (use `with torch.cuda.device(...)`).";

  m.def("cuda_version", &cuda_version,
        "CUDA runtime version the module was compiled against, e.g. '13.0'.");
  m.def("compiled_archs", &compiled_archs,
        "GPU architectures with SASS in the module, e.g. ['80', '90'] (PTX for the last one).");
  m.def("device_count", &device_count,
        "Number of visible CUDA devices (cudaGetDeviceCount); 0, never an error, without a "
        "driver or GPU.");

  m.def("elastic_layer_norm_fwd", &elastic_layer_norm_fwd, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("rows"),
        py::arg("width"), py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("C"),
        py::arg("offset"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
        "LayerNorm of each row of x (rows x width, row stride x_row_stride, unit column stride) "
        "with channel j using weight/bias[(offset + j) % C] (weight 0 -> 1, bias 0 -> 0). Writes "
        "y and, unless their pointer is 0, the fp32 per-row mean and rstd = 1/sqrt(var + eps).");
  m.def("elastic_layer_norm_bwd_workspace_numel", &bwd_workspace_numel, py::arg("rows"),
        py::arg("width"),
        "fp32 elements of workspace elastic_layer_norm_bwd needs when dweight or dbias is "
        "requested (0 when rows == 0).");
  m.def("elastic_layer_norm_bwd", &elastic_layer_norm_bwd, py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dweight"),
        py::arg("dbias"), py::arg("workspace"), py::arg("rows"), py::arg("width"),
        py::arg("dy_row_stride"), py::arg("x_row_stride"), py::arg("dx_row_stride"), py::arg("C"),
        py::arg("offset"), py::arg("dtype"), py::arg("stream"),
        "Backward of elastic_layer_norm_fwd from the saved fp32 mean/rstd. dx (skipped when 0); "
        "dweight/dbias are full (C,) vectors of which only the width used entries are written "
        "(skipped when 0; the caller zero-fills the rest). Deterministic: no atomics.");

  m.def("varlen_attention_fwd", &varlen_attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("batch"), py::arg("total_q"), py::arg("total_k"), py::arg("H"), py::arg("H_kv"),
        py::arg("D"), py::arg("q_stride_t"), py::arg("q_stride_h"), py::arg("k_stride_t"),
        py::arg("k_stride_h"), py::arg("v_stride_t"), py::arg("v_stride_h"),
        py::arg("out_stride_t"), py::arg("out_stride_h"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("scale"), py::arg("causal"), py::arg("dtype"),
        py::arg("stream"), py::arg("allow_tf32") = false,
        "Packed (flash-attn varlen) attention forward. q, out: (total_q, H, D); k, v: (total_k, "
        "H_kv, D), H a multiple of H_kv; strides in elements, last dim contiguous; cu_seqlens_*: "
        "int32 (batch + 1,). causal: query i sees keys j <= i + len_k - len_q. Writes out and the "
        "fp32 (H, total_q) contiguous lse (natural log; -inf and out = 0 for rows without keys). "
        "max_seqlen_* bound the lengths and only size the grid. Tile products: fp16 on tensor "
        "cores (sm_70+), bf16 on tensor cores from sm_80 (FMA before); fp32 in tf32 on tensor "
        "cores from sm_80 when allow_tf32 (not the backward at D > 128), else fp32 FMA.");
  m.def("varlen_attention_bwd_workspace_numel", &varlen_bwd_workspace_numel, py::arg("H"),
        py::arg("total_q"), "fp32 elements of workspace varlen_attention_bwd needs (H * total_q).");
  m.def("varlen_attention_bwd", &varlen_attention_bwd, py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("workspace"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("batch"),
        py::arg("total_q"), py::arg("total_k"), py::arg("H"), py::arg("H_kv"), py::arg("D"),
        py::arg("dout_stride_t"), py::arg("dout_stride_h"), py::arg("q_stride_t"),
        py::arg("q_stride_h"), py::arg("k_stride_t"), py::arg("k_stride_h"), py::arg("v_stride_t"),
        py::arg("v_stride_h"), py::arg("out_stride_t"), py::arg("out_stride_h"),
        py::arg("dq_stride_t"), py::arg("dq_stride_h"), py::arg("dk_stride_t"),
        py::arg("dk_stride_h"), py::arg("dv_stride_t"), py::arg("dv_stride_h"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("causal"),
        py::arg("dtype"), py::arg("stream"), py::arg("allow_tf32") = false,
        "Backward of varlen_attention_fwd from its out and lse: writes every element of dq "
        "(total_q, H, D), dk and dv (total_k, H_kv, D; summed over the query heads of each GQA "
        "group; 0 for keys no query attends). workspace: varlen_attention_bwd_workspace_numel(H, "
        "total_q) fp32. Deterministic: no atomics. allow_tf32: as for varlen_attention_fwd.");

  m.def("per_sample_grad_gram_workspace_numel", &gram_workspace_numel, py::arg("B"), py::arg("T"),
        py::arg("D_in"), py::arg("D_out"),
        "fp32 elements of workspace per_sample_grad_gram needs (0 when B == 0 or T == 0); depends "
        "on the sizes only.");
  m.def("per_sample_grad_gram", &per_sample_grad_gram, py::arg("a"), py::arg("g"), py::arg("out"),
        py::arg("workspace"), py::arg("B"), py::arg("T"), py::arg("D_in"), py::arg("D_out"),
        py::arg("a_stride_b"), py::arg("a_stride_t"), py::arg("g_stride_b"), py::arg("g_stride_t"),
        py::arg("dtype"), py::arg("stream"), py::arg("allow_tf32") = false,
        "One linear layer's empirical-NTK Gram: out[i, j] = <G_i, G_j>_F (float32 (B, B), "
        "contiguous) with G_i = g_i^T a_i = sum_t g[i, t, :] (x) a[i, t, :], for a (B, T, D_in) and "
        "g (B, T, D_out) (strides in elements, last dim contiguous), without storing any G_i. "
        "fp32 accumulation; tile products on tensor cores for fp16 (sm_70+), bf16 (sm_80+) and "
        "fp32 with allow_tf32 (tf32, sm_80+), else fp32 FMA. T == 0 writes zeros, B == 0 does "
        "nothing. workspace: "
        "per_sample_grad_gram_workspace_numel(B, T, D_in, D_out) fp32. Deterministic: no atomics; "
        "out is exactly symmetric.");
}
