"""The compiled per-sample-gradient Gram kernel (``_C.per_sample_grad_gram``, one linear layer's
empirical NTK): argument checks and the no-device error without a GPU; with a GPU (``-m gpu``)
K against a float64 computation that materialises every G_i = g_i^T a_i, through
``asvit_kernels.cuda_backend.ntk``."""
from __future__ import annotations

import zlib

import pytest

from _ext_util import HAS_DEVICE, C, gpu, needs_ext, needs_no_device  # noqa: F401
from test_extension_attention import tf32  # noqa: F401  (the allow_tf32 fixture)


# ------------------------------------------------------------------------------------------------
# Argument checks and the no-device error (no GPU needed: arguments are checked first)
# ------------------------------------------------------------------------------------------------
# Fake, well-aligned "device pointers": never dereferenced, since every call below either fails
# validation, is a no-op, or (without a GPU) stops at the device check.
def gram_args(**overrides):
    B, T, D_in, D_out = 6, 10, 48, 40
    args = dict(a=1 << 20, g=2 << 20, out=3 << 20, workspace=4 << 20, B=B, T=T, D_in=D_in,
                D_out=D_out, a_stride_b=T * D_in, a_stride_t=D_in, g_stride_b=T * D_out,
                g_stride_t=D_out, dtype=1, stream=0)
    args.update(overrides)
    return args


GRAM_BAD = [
    (dict(dtype=3), r"dtype must be"),
    (dict(dtype=-1), r"dtype must be"),
    (dict(B=-1), r"\bB must be in \[0, 65536\]"),
    (dict(B=65537), r"\bB must be in \[0, 65536\]"),
    (dict(T=-1), r"\bT must be in \[0, 2147483647\]"),
    (dict(T=2 ** 31), r"\bT must be in \[0, 2147483647\]"),
    (dict(D_in=0), r"D_in must be in \[1, 2147483647\]"),
    (dict(D_out=0), r"D_out must be in \[1, 2147483647\]"),
    (dict(D_out=2 ** 31), r"D_out must be in"),
    (dict(a=0), r"\ba must be a non-null"),
    (dict(g=0), r"\bg must be a non-null"),
    (dict(out=0), r"\bout must be a non-null"),
    (dict(workspace=0), r"workspace must be a non-null"),
    (dict(a=(1 << 20) + 1), r"\ba \(\d+\) is not aligned to its element size \(2 bytes\)"),
    (dict(dtype=0, g=(2 << 20) + 2), r"\bg \(\d+\) is not aligned to its element size \(4 bytes\)"),
    (dict(out=(3 << 20) + 2), r"\bout \(\d+\) is not aligned"),
    (dict(workspace=(4 << 20) + 1), r"workspace \(\d+\) is not aligned"),
    (dict(a_stride_b=-1), r"a_stride_b must be >= 0"),
    (dict(a_stride_t=-48), r"a_stride_t must be >= 0"),
    (dict(g_stride_b=-1), r"g_stride_b must be >= 0"),
    (dict(g_stride_t=-2), r"g_stride_t must be >= 0"),
]


@needs_ext
@pytest.mark.parametrize("overrides,match", GRAM_BAD, ids=[m for _, m in GRAM_BAD])
def test_bad_arguments_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=r"asvit_kernels\._C\.per_sample_grad_gram: .*" + match):
        C.per_sample_grad_gram(**gram_args(**overrides))


@needs_ext
def test_workspace_numel():
    numel = C.per_sample_grad_gram_workspace_numel
    assert numel(0, 10, 8, 8) == 0
    assert numel(5, 0, 8, 8) == 0
    for B, T, D_in, D_out in [(1, 1, 1, 1), (64, 197, 768, 768), (200, 3, 40, 33), (1024, 50, 384, 1536),
                              (3, 1, 65536, 65536), (65536, 1, 1, 1)]:
        n = numel(B, T, D_in, D_out)
        nb = -(-B // 8)
        per_chunk = nb * (nb + 1) // 2 * 64          # one 8 x 8 partial per upper-triangle block pair
        assert n >= per_chunk and n % per_chunk == 0, (B, T, D_in, D_out, n)
        assert n // per_chunk <= 4096
        assert numel(B, T + 7, D_in, D_out) == n     # the plan does not depend on T
    with pytest.raises(ValueError, match=r"per_sample_grad_gram_workspace_numel: B must be in"):
        numel(-1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"T must be in"):
        numel(1, -1, 1, 1)
    with pytest.raises(ValueError, match=r"D_in must be in"):
        numel(1, 1, 0, 1)
    with pytest.raises(ValueError, match=r"D_out must be in"):
        numel(1, 1, 1, -5)


@needs_ext
def test_empty_batch_is_a_no_op():
    # Nothing to write, nothing launched: holds with or without a GPU (pointers 0 are fine then).
    C.per_sample_grad_gram(**gram_args(B=0, a=0, g=0, out=0, workspace=0))
    C.per_sample_grad_gram(**gram_args(B=0, T=0, a=0, g=0, out=0, workspace=0))


@needs_ext
@needs_no_device
def test_no_device_raises_runtime_error():
    with pytest.raises(RuntimeError, match=r"asvit_kernels\._C: no CUDA device is available "
                                           r"\(cudaGetDeviceCount returned .+\)"):
        C.per_sample_grad_gram(**gram_args())
    # T == 0: out must still be written (zeros), so this needs a device too; a, g, workspace unused
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.per_sample_grad_gram(**gram_args(T=0, a=0, g=0, workspace=0))
    # broadcast inputs (stride 0) and a token-major g are valid layouts
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.per_sample_grad_gram(**gram_args(a_stride_b=0, g_stride_b=40, g_stride_t=6 * 40, dtype=2))
    assert C.device_count() == 0


# ------------------------------------------------------------------------------------------------
# GPU: numerics against a float64 computation that materialises every G_i
# ------------------------------------------------------------------------------------------------
def _reference(a, g):
    import torch
    G = torch.einsum("bto,btc->boc", g.double(), a.double())     # (B, D_out, D_in)
    return torch.einsum("ioc,joc->ij", G, G)


def _make(B, T, D_in, D_out, dtype, layout, seed):
    """a (B, T, D_in), g (B, T, D_out) in one of several memory layouts (last dim contiguous)."""
    import torch
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen)

    if layout == "contiguous":
        return randn(B, T, D_in), randn(B, T, D_out)
    if layout == "padded":       # padded token rows and batch gaps
        a = randn(B, T + 1, D_in + 3)[:, 1:, 2:D_in + 2]
        g = randn(B, T, D_out + 5)[..., :D_out]
        return a, g
    if layout == "token_major":  # (T, B, D) storage, e.g. a sequence-first activation
        return randn(T, B, D_in).transpose(0, 1), randn(T, B, D_out).transpose(0, 1)
    if layout == "broadcast":    # one input shared by every sample (batch stride 0)
        return randn(1, T, D_in).expand(B, T, D_in), randn(B, T, D_out)
    raise AssertionError(layout)


SHAPES = [  # B, T, D_in, D_out
    (1, 1, 1, 1),
    (1, 7, 5, 3),
    (3, 1, 33, 1),
    (5, 13, 1, 70),
    (9, 9, 31, 65),
    (16, 1, 64, 10),
    (17, 70, 45, 33),
    (64, 197, 96, 72),
    (64, 3, 100, 700),   # several tiles per chunk
    (200, 5, 40, 33),
    (200, 2, 130, 100),
]
LAYOUTS = ["contiguous", "padded", "token_major", "broadcast"]


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _rel(got, ref):
    import torch
    got = got.double()
    assert torch.isfinite(got).all(), "non-finite values (an element left unwritten?)"
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


@gpu
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("B,T,D_in,D_out", SHAPES)
def test_gpu_matches_float64(B, T, D_in, D_out, dtype_name, poison):
    # `poison` (conftest.py) NaN-fills torch.empty outputs and workspaces: an element the kernels
    # skip fails. The reference sees the same (rounded) inputs, so only the fp32 accumulation
    # differs, whatever the input dtype.
    import torch
    from asvit_kernels.cuda_backend import ntk
    dtype = getattr(torch, dtype_name)
    for n, layout in enumerate(LAYOUTS):
        a, g = _make(B, T, D_in, D_out, dtype, layout, _seed(B, T, D_in, D_out, dtype_name, n))
        K = ntk.per_sample_grad_gram(a, g)
        assert K.shape == (B, B) and K.dtype == torch.float32 and K.is_contiguous()
        err = _rel(K, _reference(a, g))
        assert err <= 2e-5, f"{layout}: max error {err:.3g} (relative to max |K|) > 2e-5"
        assert torch.equal(K, K.T), "K is not exactly symmetric"


@gpu
def test_gpu_deterministic_and_large_batch(poison):
    import torch
    from asvit_kernels.cuda_backend import ntk
    a, g = _make(1024, 4, 64, 48, torch.bfloat16, "padded", seed=7)
    K = ntk.per_sample_grad_gram(a, g)
    assert _rel(K, _reference(a, g)) <= 2e-5
    for _ in range(2):
        assert torch.equal(ntk.per_sample_grad_gram(a, g), K)


@gpu
def test_gpu_empty_sizes(poison):
    import torch
    from asvit_kernels.cuda_backend import ntk
    dev = torch.device("cuda")
    # T == 0: every G_i is 0
    K = ntk.per_sample_grad_gram(torch.empty(5, 0, 8, device=dev), torch.empty(5, 0, 3, device=dev))
    assert torch.equal(K, torch.zeros(5, 5, device=dev))
    # B == 0
    K = ntk.per_sample_grad_gram(torch.empty(0, 4, 8, device=dev), torch.empty(0, 4, 3, device=dev))
    assert K.shape == (0, 0)
    # no features
    K = ntk.per_sample_grad_gram(torch.randn(3, 4, 0, device=dev), torch.randn(3, 4, 2, device=dev))
    assert torch.equal(K, torch.zeros(3, 3, device=dev))


@gpu
def test_gpu_wrapper_rejects_bad_layouts():
    import torch
    from asvit_kernels.cuda_backend import ntk
    dev = torch.device("cuda")
    a = torch.randn(4, 5, 6, device=dev)
    g = torch.randn(4, 5, 7, device=dev)
    with pytest.raises(ValueError, match="a must have a contiguous last dimension"):
        ntk.per_sample_grad_gram(torch.randn(4, 6, 5, device=dev).transpose(1, 2), g)
    with pytest.raises(ValueError, match=r"g must have a's \(B, T\)"):
        ntk.per_sample_grad_gram(a, g[:, :4])
    with pytest.raises(TypeError, match="g must have a's dtype"):
        ntk.per_sample_grad_gram(a, g.half())
    with pytest.raises(ValueError, match="a must be 3-D"):
        ntk.per_sample_grad_gram(a[0], g)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        ntk.per_sample_grad_gram(a.cpu(), g.cpu())


# ------------------------------------------------------------------------------------------------
# GPU: the tensor-core paths (fp16 WMMA from sm_70, bf16 and tf32 from sm_80) and the fp32 FMA path
# ------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["fp32-fma", "tf32"], indirect=True)
@pytest.mark.parametrize("B,T,D_in,D_out", [(9, 9, 31, 65), (17, 70, 45, 33), (64, 197, 96, 72)])
def test_gpu_fp32_with_and_without_tf32(B, T, D_in, D_out, tf32, poison):
    # off: fp32 FMA, fp32 accuracy. On (sm_80+): inputs rounded to tf32 (10 mantissa bits) in the
    # tile products, whose errors are uncorrelated with G, so K's stay well below one rounding unit.
    import torch
    from asvit_kernels.cuda_backend import ntk
    if tf32 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tf32 needs sm_80")
    a, g = _make(B, T, D_in, D_out, torch.float32, "padded", _seed(B, T, D_in, D_out, tf32))
    K = ntk.per_sample_grad_gram(a, g)
    err = _rel(K, _reference(a, g))
    tol = 5e-4 if tf32 else 2e-5
    assert err <= tol, f"max error {err:.3g} (relative to max |K|) > {tol}"
    assert torch.equal(K, K.T)


@gpu
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_gpu_nonfinite_sample_reaches_only_its_row_and_column(dtype_name, poison):
    # samples share staging tiles and tensor-core passes; a NaN of sample 3 must stay in K[3, :]
    # and K[:, 3]
    import torch
    from asvit_kernels.cuda_backend import ntk
    a, g = _make(12, 20, 40, 36, getattr(torch, dtype_name), "contiguous", seed=3)
    a = a.clone()
    a[3, 7, 11] = float("nan")
    K = ntk.per_sample_grad_gram(a, g)
    bad = torch.zeros(12, 12, dtype=torch.bool, device=K.device)
    bad[3, :] = bad[:, 3] = True
    assert torch.isnan(K[bad]).all() and torch.isfinite(K[~bad]).all()
