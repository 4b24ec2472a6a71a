"""Checks of the compiled extension ``asvit_kernels._C``: build, ABI, linkage, argument checks.

CI builds the extension once (``pip install .`` in .ci/run); these tests reuse that install
instead of building again. When nvcc is available the extension must have been built (a missing
``_C`` then fails with the reason); without nvcc the extension tests are skipped.
GPU-only tests (``-m gpu``) compare the kernels with a float64 torch computation.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from asvit_kernels import _ext

from _ext_util import HAS_DEVICE, C, gpu, needs_ext, needs_no_device  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _find_nvcc():
    # Same lookup as setup.py: $CUDA_HOME/bin, $CUDA_PATH/bin, then PATH.
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()



# ------------------------------------------------------------------------------------------------
# Loading (no extension needed)
# ------------------------------------------------------------------------------------------------
def test_ext_module_contract():
    assert (C is None) == (_ext.MISSING_REASON is not None)
    if C is None:
        assert isinstance(_ext.MISSING_REASON, str) and _ext.MISSING_REASON
    cfg = _ext.BUILD_CONFIG
    assert set(cfg) == {"cuda_extension_built", "cuda_archs", "cuda_version", "build_reason"}
    assert isinstance(cfg["cuda_extension_built"], bool)
    assert isinstance(cfg["cuda_archs"], list) and all(isinstance(a, str) for a in cfg["cuda_archs"])
    assert cfg["cuda_version"] is None or re.fullmatch(r"\d+\.\d+", cfg["cuda_version"])
    assert isinstance(cfg["build_reason"], str) and cfg["build_reason"]
    assert isinstance(_ext.cuda_device_available(), bool)


def test_extension_built_when_nvcc_available():
    if NVCC is None:
        pytest.skip("nvcc not found ($CUDA_HOME/bin, $CUDA_PATH/bin, PATH): the CUDA extension is "
                    "optional without it")
    if C is None and _ext.BUILD_CONFIG["build_reason"].startswith("ASVIT_BUILD_CUDA=0"):
        pytest.skip(f"installed with the CUDA extension disabled: {_ext.MISSING_REASON}")
    assert C is not None, (
        f"nvcc is available ({NVCC}) but asvit_kernels._C did not load: {_ext.MISSING_REASON}. "
        "Build it with `pip install .` (or `pip install -e . --no-build-isolation`).")


# ------------------------------------------------------------------------------------------------
# Build metadata and linkage
# ------------------------------------------------------------------------------------------------
@needs_ext
def test_cuda_version():
    version = C.cuda_version()
    assert re.fullmatch(r"\d+\.\d+", version), version
    assert int(version.split(".")[0]) >= 11
    if _ext.BUILD_CONFIG["cuda_extension_built"]:
        assert version == _ext.BUILD_CONFIG["cuda_version"]


@needs_ext
def test_compiled_archs():
    archs = C.compiled_archs()
    assert isinstance(archs, list) and archs
    assert all(re.fullmatch(r"\d+[a-z]?", a) for a in archs), archs
    if _ext.BUILD_CONFIG["cuda_extension_built"]:
        assert archs == _ext.BUILD_CONFIG["cuda_archs"]


def _needed_libraries(path):
    """DT_NEEDED entries of a shared object, from readelf (or ldd as a fallback)."""
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", path], check=True, capture_output=True, text=True).stdout
        return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    if shutil.which("ldd"):
        out = subprocess.run(["ldd", path], check=True, capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]
    pytest.skip("neither readelf nor ldd is available")


@needs_ext
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF check (Linux only)")
def test_linkage_is_static_cudart_and_torch_free():
    needed = _needed_libraries(C.__file__)
    assert needed, f"no dynamic dependencies found for {C.__file__}?"
    offending = [lib for lib in needed
                 if re.match(r"lib(cudart|cuda|torch|c10|torch_cpu|torch_cuda|torch_python)\b", lib)]
    assert not offending, f"{C.__file__} links {offending} dynamically (needs: {needed})"


@needs_ext
def test_device_count_never_raises():
    n = C.device_count()
    assert isinstance(n, int) and n >= 0
    assert _ext.cuda_device_available() == (n > 0)


# ------------------------------------------------------------------------------------------------
# Argument checks and the no-device error (no GPU needed: arguments are checked first)
# ------------------------------------------------------------------------------------------------
# Fake but well-aligned "device pointers": never dereferenced, since every call below either fails
# validation or (without a GPU) stops at the device check.
def fwd_args(**overrides):
    args = dict(x=1 << 20, weight=2 << 20, bias=3 << 20, y=4 << 20, mean=5 << 20, rstd=6 << 20,
                rows=4, width=8, x_row_stride=8, y_row_stride=8, C=16, offset=3, eps=1e-5, dtype=0,
                stream=0)
    args.update(overrides)
    return args


def bwd_args(**overrides):
    args = dict(dy=1 << 20, x=2 << 20, weight=3 << 20, mean=4 << 20, rstd=5 << 20, dx=6 << 20,
                dweight=7 << 20, dbias=8 << 20, workspace=9 << 20, rows=4, width=8, dy_row_stride=8,
                x_row_stride=8, dx_row_stride=8, C=16, offset=3, dtype=0, stream=0)
    args.update(overrides)
    return args


FWD_BAD = [
    (dict(width=0), r"width must be >= 1"),
    (dict(width=17), r"width must be <= C"),
    (dict(offset=-1), r"offset must be in"),
    (dict(offset=16), r"offset must be in"),
    (dict(rows=-1), r"rows must be >= 0"),
    (dict(C=0, width=1, offset=0), r"C must be in"),
    (dict(dtype=3), r"dtype must be"),
    (dict(dtype=-1), r"dtype must be"),
    (dict(x=0), r"\bx must be a non-null"),
    (dict(y=0), r"\by must be a non-null"),
    (dict(x=(1 << 20) + 2), r"\bx \(\d+\) is not aligned"),
    (dict(y_row_stride=4), r"y_row_stride must be >= width"),
    (dict(x_row_stride=-8), r"x_row_stride must be >= 0"),
    (dict(eps=-1.0), r"eps must be"),
    (dict(eps=float("nan")), r"eps must be"),
]


@needs_ext
@pytest.mark.parametrize("overrides,match", FWD_BAD, ids=[m for _, m in FWD_BAD])
def test_fwd_bad_arguments_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        C.elastic_layer_norm_fwd(**fwd_args(**overrides))


BWD_BAD = [
    (dict(width=0), r"width must be >= 1"),
    (dict(width=17), r"width must be <= C"),
    (dict(offset=16), r"offset must be in"),
    (dict(rows=-2), r"rows must be >= 0"),
    (dict(dtype=7), r"dtype must be"),
    (dict(dy=0), r"\bdy must be a non-null"),
    (dict(x=0), r"\bx must be a non-null"),
    (dict(mean=0), r"\bmean must be a non-null"),
    (dict(rstd=0), r"\brstd must be a non-null"),
    (dict(weight=0), r"dweight must be 0 \(None\) when weight is 0"),
    (dict(workspace=0), r"workspace must be a non-null"),
    (dict(dx_row_stride=1), r"dx_row_stride must be >= width"),
    (dict(dtype=1, dbias=(8 << 20) + 1), r"dbias \(\d+\) is not aligned"),
]


@needs_ext
@pytest.mark.parametrize("overrides,match", BWD_BAD, ids=[m for _, m in BWD_BAD])
def test_bwd_bad_arguments_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        C.elastic_layer_norm_bwd(**bwd_args(**overrides))


@needs_ext
def test_workspace_numel():
    assert C.elastic_layer_norm_bwd_workspace_numel(0, 768) == 0
    for rows, width in [(1, 1), (197, 384), (100000, 32), (3, 65536), (50000, 768)]:
        n = C.elastic_layer_norm_bwd_workspace_numel(rows, width)
        assert n >= 2 * width and n % (2 * width) == 0, (rows, width, n)
        assert n <= 2 * 1024 * width
    with pytest.raises(ValueError, match="rows"):
        C.elastic_layer_norm_bwd_workspace_numel(-1, 8)
    with pytest.raises(ValueError, match="width"):
        C.elastic_layer_norm_bwd_workspace_numel(8, 0)


@needs_ext
def test_rows_zero_is_a_no_op():
    # Nothing is launched, so this holds with or without a GPU (the pointers are fake).
    C.elastic_layer_norm_fwd(**fwd_args(rows=0))
    C.elastic_layer_norm_bwd(**bwd_args(rows=0, workspace=0))


@needs_ext
@needs_no_device
def test_no_device_raises_runtime_error():
    with pytest.raises(RuntimeError, match=r"asvit_kernels\._C: no CUDA device is available "
                                           r"\(cudaGetDeviceCount returned .+\)"):
        C.elastic_layer_norm_fwd(**fwd_args())
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.elastic_layer_norm_bwd(**bwd_args())
    # still usable afterwards, and still reports no device
    assert C.device_count() == 0


# ------------------------------------------------------------------------------------------------
# Packaging (opt-in: builds a wheel from this checkout; ASVIT_TEST_PACKAGING=1)
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("ASVIT_TEST_PACKAGING") != "1",
                    reason="set ASVIT_TEST_PACKAGING=1 to build a wheel from the checkout")
def test_wheel_without_cuda_is_pure_python(tmp_path):
    env = dict(os.environ, ASVIT_BUILD_CUDA="0")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path)], check=True, env=env)
    (wheel,) = tmp_path.glob("asvit_kernels-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if re.search(r"asvit_kernels/_C[.].*(so|pyd)$", n)]
    config = zipfile.ZipFile(wheel).read("asvit_kernels/_build_config.py").decode()
    assert "CUDA_EXTENSION_BUILT = False" in config and "ASVIT_BUILD_CUDA=0" in config


# ------------------------------------------------------------------------------------------------
# GPU: numerics against a float64 torch computation, through data_ptr()
# ------------------------------------------------------------------------------------------------
def _code(dtype):
    import torch
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stream():
    import torch
    return torch.cuda.current_stream().cuda_stream


def _reference(x, dy, weight, bias, offset, eps):
    """float64 forward and gradients (weight/bias grads are full (C,) vectors)."""
    import torch
    rows, width = x.shape
    xd = x.double().requires_grad_(True)
    C_ = weight.shape[0] if weight is not None else bias.shape[0] if bias is not None else width
    idx = (offset + torch.arange(width, device=x.device)) % C_
    wd = weight.double().requires_grad_(True) if weight is not None else None
    bd = bias.double().requires_grad_(True) if bias is not None else None
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    rstd = (var + eps).rsqrt()
    y = (xd - mean) * rstd
    if wd is not None:
        y = y * wd[idx]
    if bd is not None:
        y = y + bd[idx]
    y.backward(dy.double())
    grads = (xd.grad, wd.grad if wd is not None else None, bd.grad if bd is not None else None)
    return y.detach(), mean.squeeze(-1).detach(), rstd.squeeze(-1).detach(), grads


def _close(got, ref, tol, what):
    got = got.double()
    scale = max(ref.abs().max().item(), 1.0)
    err = (got - ref).abs().max().item() / scale
    assert err <= tol, f"{what}: max error {err:.3g} (relative to {scale:.3g}) > {tol}"


TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
SHAPES = [  # rows, width, C, offset
    (1, 1, 1, 0),
    (7, 1, 5, 4),
    (33, 40, 64, 50),       # wraps past C
    (130, 384, 768, 600),   # wraps
    (5, 1000, 1000, 999),   # width == C, wraps at once
    (300, 192, 192, 0),
    (2, 65536, 65536, 123),
    (4099, 96, 128, 7),     # many rows, several row chunks in the weight-gradient kernel
]


@gpu
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rows,width,C_,offset", SHAPES)
def test_gpu_matches_float64(dtype_name, rows, width, C_, offset, poison):
    # `poison` (conftest.py) NaN-fills torch.empty outputs: an element the kernels skip fails.
    import torch
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cuda").manual_seed(rows * 7919 + width)
    dev = torch.device("cuda")
    # padded rows: the row stride differs from the width
    x_store = torch.randn(rows, width + 3, device=dev, dtype=dtype, generator=g) * 2 + 0.5
    x = x_store[:, :width]
    dy = torch.randn(rows, width, device=dev, dtype=dtype, generator=g)
    weight = torch.randn(C_, device=dev, dtype=dtype, generator=g)
    bias = torch.randn(C_, device=dev, dtype=dtype, generator=g)
    eps = 1e-5
    y = torch.empty(rows, width, device=dev, dtype=dtype)
    mean = torch.empty(rows, device=dev, dtype=torch.float32)
    rstd = torch.empty(rows, device=dev, dtype=torch.float32)
    C.elastic_layer_norm_fwd(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                             mean.data_ptr(), rstd.data_ptr(), rows, width, x.stride(0), y.stride(0),
                             C_, offset, eps, _code(dtype), _stream())
    y_ref, mean_ref, rstd_ref, (dx_ref, dw_ref, db_ref) = _reference(x, dy, weight, bias, offset, eps)
    tol = TOL[dtype_name]
    _close(y, y_ref, tol, "y")
    _close(mean, mean_ref, 1e-5, "mean")
    _close(rstd, rstd_ref, 1e-4, "rstd")

    sentinel = 7.0
    dx = torch.empty(rows, width, device=dev, dtype=dtype)
    dw = torch.full((C_,), sentinel, device=dev, dtype=dtype)
    db = torch.full((C_,), sentinel, device=dev, dtype=dtype)
    ws = torch.empty(C.elastic_layer_norm_bwd_workspace_numel(rows, width), device=dev,
                     dtype=torch.float32)
    C.elastic_layer_norm_bwd(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(),
                             rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr(), ws.data_ptr(),
                             rows, width, dy.stride(0), x.stride(0), dx.stride(0), C_, offset,
                             _code(dtype), _stream())
    _close(dx, dx_ref, tol * 4, "dx")
    used = (offset + torch.arange(width, device=dev)) % C_
    unused = torch.ones(C_, dtype=torch.bool, device=dev)
    unused[used] = False
    _close(dw[used], dw_ref[used], tol * 4, "dweight")
    _close(db[used], db_ref[used], tol * 4, "dbias")
    assert torch.all(dw[unused] == sentinel) and torch.all(db[unused] == sentinel), \
        "entries outside the used channel range were written"

    # deterministic: a second run gives bit-identical gradients
    dx2, dw2, db2 = torch.empty_like(dx), torch.full_like(dw, sentinel), torch.full_like(db, sentinel)
    C.elastic_layer_norm_bwd(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(),
                             rstd.data_ptr(), dx2.data_ptr(), dw2.data_ptr(), db2.data_ptr(),
                             ws.data_ptr(), rows, width, dy.stride(0), x.stride(0), dx2.stride(0), C_,
                             offset, _code(dtype), _stream())
    torch.cuda.synchronize()
    assert torch.equal(dx, dx2) and torch.equal(dw, dw2) and torch.equal(db, db2)


@gpu
def test_gpu_no_affine_and_large_mean(poison):
    import torch
    dev = torch.device("cuda")
    rows, width, C_, offset = 64, 768, 1024, 900
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, width, device=dev, generator=g) + 1.0e4  # |mean| >> std
    dy = torch.randn(rows, width, device=dev, generator=g)
    y = torch.empty_like(x)
    mean = torch.empty(rows, device=dev)
    rstd = torch.empty(rows, device=dev)
    C.elastic_layer_norm_fwd(x.data_ptr(), 0, 0, y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), rows,
                             width, width, width, C_, offset, 1e-6, 0, _stream())
    y_ref, mean_ref, rstd_ref, (dx_ref, _, _) = _reference(x, dy, None, None, offset, 1e-6)
    _close(rstd, rstd_ref, 1e-3, "rstd (large mean)")
    _close(y, y_ref, 1e-3, "y (large mean)")

    # weight None: g = dy; only dbias requested (dweight must be 0 then)
    bias = torch.zeros(C_, device=dev)
    dx = torch.empty_like(x)
    db = torch.zeros(C_, device=dev)
    ws = torch.empty(C.elastic_layer_norm_bwd_workspace_numel(rows, width), device=dev)
    C.elastic_layer_norm_bwd(dy.data_ptr(), x.data_ptr(), 0, mean.data_ptr(), rstd.data_ptr(),
                             dx.data_ptr(), 0, db.data_ptr(), ws.data_ptr(), rows, width, width, width,
                             width, C_, offset, 0, _stream())
    _, _, _, (dx_ref, _, db_ref) = _reference(x, dy, None, bias, offset, 1e-6)
    _close(dx, dx_ref, 1e-3, "dx (no weight)")
    _close(db, db_ref, 1e-4, "dbias (no weight)")
