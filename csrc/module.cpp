// pybind11 bindings of asvit_kernels._C and the argument checks of every entry point.
//
// The ABI is torch-free: tensors arrive as device pointers (Python ints, 0 = None), sizes and row
// strides in elements, dtype codes (0 float32, 1 float16, 2 bfloat16) and the cudaStream_t as an
// int. Order of checks in every kernel entry: arguments (ValueError naming the argument), then
// rows == 0 -> no-op, then "is there a CUDA device" (RuntimeError), then the launches, each
// followed by a cudaGetLastError check (RuntimeError with the CUDA error string).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "common.h"
#include "elastic_layer_norm.h"
#include "runtime_info.h"

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
}
