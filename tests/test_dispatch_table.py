"""The capability table behind auto-dispatch (issue 14 items 1, 9, 11): which backend a CUDA call
gets on hypothetical archs (no GPU needed: ``check_available=False``), why each other one was not
chosen, and the torch_flash backend's glue to PyTorch's FlashAttention-2 ops."""
import pytest
import torch

import asvit_kernels as ak
from asvit_kernels import backends, capabilities, reference
from asvit_kernels.torch_backend import flash_varlen

from _util import TOL, rel_err

CUDA = torch.device("cuda")


def _explain(dtype, arch, head_dim=64, features=(), op="varlen_attention"):
    return backends.explain(op, CUDA, dtype, arch=arch, head_dim=head_dim, features=features,
                            check_available=False)


def _chosen(verdicts):
    (first,) = [v for v in verdicts if v.chosen]
    assert verdicts[0] is first, "the chosen backend comes first"
    return first


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", [80, 86, 90])
def test_half_on_ampere_and_hopper_takes_a_tensor_core_path(dtype, arch):
    v = _chosen(_explain(dtype, arch, head_dim=45))
    assert v.backend == "triton" and v.tensor_cores
    reasons = {x.backend: x.reason for x in _explain(dtype, arch, head_dim=45)}
    assert "multiple of 8" in reasons["torch_flash"]      # As-ViT's head dim 45: not FlashAttention-2's
    assert reasons["cuda"] == "triton comes first in the preference order"
    assert "last resort" in reasons["torch"]


def test_v100_fp16_takes_the_wmma_kernels_and_says_why_not_triton():
    verdicts = _explain(torch.float16, 70)
    assert _chosen(verdicts).backend == "cuda" and _chosen(verdicts).tensor_cores
    reasons = {x.backend: x.reason for x in verdicts}
    assert reasons["triton"] == "not tensor-core for float16 on sm_70; cuda is"
    assert reasons["torch_flash"] == "it needs sm_80 or newer, this is sm_70"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_v100_has_no_tensor_core_path_for_bf16_or_fp32_and_says_so(dtype):
    verdicts = _explain(dtype, 70)
    assert not any(v.tensor_cores for v in verdicts)
    assert _chosen(verdicts).backend == "triton"          # the first fused kernel that runs at all


def test_fp32_follows_allow_tf32():
    before = torch.backends.cuda.matmul.allow_tf32   # a property of torch's, not an attribute
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _chosen(_explain(torch.float32, 80)).tensor_cores
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not _chosen(_explain(torch.float32, 80)).tensor_cores
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_features_steer_away_from_backends_without_them(monkeypatch):
    monkeypatch.setitem(capabilities.TABLE["varlen_attention"], "triton",
                        capabilities.TABLE["varlen_attention"]["triton"].__class__(
                            ("cuda", "cpu"), capabilities.KERNEL_DTYPES, features=frozenset({"window"}),
                            tensor_cores=capabilities.triton_tensor_cores))
    verdicts = {v.backend: v for v in _explain(torch.bfloat16, 90, features=("window", "softcap"))}
    assert verdicts["triton"].reason == "it does not implement softcap"
    assert verdicts["cuda"].reason == "it does not implement softcap, window"
    assert _chosen(list(verdicts.values())).backend == "torch"


def test_layer_norm_keeps_the_extension_first_and_elastic_linear_triton():
    assert _chosen(_explain(torch.float16, 80, None, op="elastic_layer_norm")).backend == "cuda"
    assert _chosen(_explain(torch.float16, 80, None, op="elastic_linear")).backend == "triton"
    assert _chosen(_explain(torch.float16, 70, None, op="per_sample_grad_gram")).backend == "cuda"


def test_the_table_covers_every_op_and_backend():
    for op, caps in capabilities.TABLE.items():
        assert "torch" in caps and set(capabilities.PREFERENCE[op]) <= set(caps) - {"torch"}
        assert set(caps) <= set(backends.BACKENDS)
        for cap in caps.values():
            assert cap.how and cap.dtypes and cap.devices


def test_explicit_torch_flash_is_refused_with_the_reason():
    q = torch.randn(6, 2, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="torch_flash.*CUDA"):
        ak.varlen_attention(q, q, q, cu, backend="torch_flash")
    with pytest.raises(ValueError, match="op must be one of"):
        backends.explain("matmul", CUDA)


def test_cpu_explain_names_why_nothing_but_torch():
    verdicts = backends.explain("varlen_attention", torch.device("cpu"), torch.float32)
    assert verdicts[0].backend == "torch" and verdicts[0].chosen
    assert all(v.reason for v in verdicts[1:])


# ------------------------------------------------ torch_flash: our glue, against the aten contract

def _aten_like(lse_shape=None):
    """Stand-ins for aten::_flash_attention_forward/_backward with their call contract (the same
    positional and keyword arguments, (H, total_q) float32 lse), computed by the float64 reference,
    so the glue's argument order, return unpacking and empty cases are tested without a GPU."""
    calls = []

    def fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, return_debug_mask, *, scale):
        calls.append(("fwd", max_q, max_k, dropout_p, causal, return_debug_mask, scale))
        out = reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, scale, causal)
        lse = torch.zeros(lse_shape or (q.shape[1], q.shape[0]))
        return out.to(q.dtype), lse, torch.zeros(2), torch.empty(0), torch.empty(0)

    def bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, rng, unused, *, scale):
        calls.append(("bwd", max_q, max_k, dropout_p, causal, rng.dtype, scale))
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        o = reference.varlen_attention(*leaves, cu_q, cu_k, scale, causal)
        return torch.autograd.grad(o, leaves, dout.double())

    return fwd, bwd, calls


def test_torch_flash_glue_passes_the_contract(monkeypatch):
    fwd, bwd, calls = _aten_like()
    monkeypatch.setattr(flash_varlen, "_FWD", fwd)
    monkeypatch.setattr(flash_varlen, "_BWD", bwd)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(9, 4, 8, generator=g) for _ in range(4))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = flash_varlen.varlen_forward(q, k, v, cu, cu, 5, 5, 0.3, True)
    assert rel_err(out, reference.varlen_attention(q, k, v, cu, cu, 0.3, True)) < TOL[torch.float32]
    assert lse.shape == (4, 9)
    dq, dk, dv = flash_varlen.varlen_backward(do, q, k, v, out, lse, cu, cu, 5, 5, 0.3, True)
    assert dq.shape == q.shape and dk.shape == k.shape and torch.isfinite(dv).all()
    assert calls == [("fwd", 5, 5, 0.0, True, False, 0.3), ("bwd", 5, 5, 0.0, True, torch.uint64, 0.3)]


def test_torch_flash_refuses_a_padded_lse_and_skips_empty_calls(monkeypatch):
    fwd, bwd, calls = _aten_like(lse_shape=(2, 4, 5))
    monkeypatch.setattr(flash_varlen, "_FWD", fwd)
    q = torch.randn(9, 4, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="log-sum-exp"):
        flash_varlen.varlen_forward(q, q, q, cu, cu, 5, 5, 0.3, False)
    empty = torch.randn(0, 4, 8)
    out, lse = flash_varlen.varlen_forward(empty, q, q, torch.zeros(3, dtype=torch.int32), cu, 0, 5, 0.3, False)
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)
    assert len(calls) == 1


# --------------------------------------------------------------------- on a GPU: the real kernel

@pytest.mark.gpu
@pytest.mark.skipif(backends.why_unavailable("torch_flash", CUDA) is not None, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_kv", [4, 2])
def test_torch_flash_matches_the_float64_reference(dtype, causal, heads_kv):
    if backends.device_arch(CUDA) < 80:
        pytest.skip("FlashAttention-2 needs sm_80")
    g = torch.Generator().manual_seed(1)
    lens_q, lens_k = [1, 50, 197, 7], [3, 50, 197, 9]
    q = torch.randn(sum(lens_q), 4, 64, generator=g)
    k, v = (torch.randn(sum(lens_k), heads_kv, 64, generator=g) for _ in range(2))
    do = torch.randn(q.shape, generator=g)
    cu_q, cu_k = ak.cu_seqlens_from_lengths(lens_q), ak.cu_seqlens_from_lengths(lens_k)
    leaves = [t.to(CUDA, dtype).requires_grad_() for t in (q, k, v)]
    out = ak.varlen_attention(*leaves, cu_q.cuda(), cu_k.cuda(), causal=causal, backend="torch_flash")
    out.backward(do.to(CUDA, dtype))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.varlen_attention(*ref_leaves, cu_q, cu_k, causal=causal)
    ref.backward(do.double())
    for got, want in zip([out] + [t.grad for t in leaves], [ref] + [t.grad for t in ref_leaves]):
        assert rel_err(got, want) < TOL[dtype]


# ------------------------------------------------------------------------- asvit info --op, build_info

def test_asvit_info_op_prints_the_choice_and_every_reason(capsys):
    from asvit_kernels import cli
    assert cli.main(["info", "--op", "varlen_attention", "--dtype", "bf16", "--head-dim", "45",
                     "--arch", "90"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "varlen_attention, bfloat16, head dim 45, on sm_90 (described, not detected):"
    assert lines[1].split() == ["triton", "tensor", "cores", "CHOSEN"]
    assert any("torch_flash" in line and "multiple of 8" in line for line in lines)
    assert cli.main(["info", "--op", "varlen_attention", "--dtype", "bf16", "--arch", "70"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "  no backend does this call on tensor cores here"


@pytest.mark.parametrize("args,message", [(["--op", "matmul"], "--op must be one of"),
                                          (["--op", "varlen_attention", "--dtype", "int8"], "--dtype must be"),
                                          (["--op", "varlen_attention", "--features", "rope"], "unknown rope")])
def test_asvit_info_op_refuses_bad_arguments(capsys, args, message):
    from asvit_kernels import cli
    assert cli.main(["info", *args]) == 2
    assert message in capsys.readouterr().err


def test_build_info_holds_the_dispatch_of_every_op():
    dispatch = ak.build_info()["dispatch"]
    assert set(dispatch) == set(capabilities.TABLE)
    for op, per_dtype in dispatch.items():
        for entry in per_dtype.values():
            assert entry["chosen"] in capabilities.TABLE[op]
            assert set(entry["not_chosen"]) == set(capabilities.TABLE[op]) - {entry["chosen"]}
            assert all(entry["not_chosen"].values())
