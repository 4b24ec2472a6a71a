"""Backend choice: argument > ASVIT_BACKEND > auto, and clear errors for what cannot run here."""
import pytest
import torch

import asvit_kernels as ak
from asvit_kernels import backends


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("ASVIT_BACKEND", raising=False)
    for op in backends.OP_BACKENDS:
        assert backends.pick(op, torch.device("cpu")) == "torch"
        assert backends.pick(op, torch.device("cpu"), "auto") == "torch"


def test_env_then_argument(monkeypatch):
    monkeypatch.setenv("ASVIT_BACKEND", "torch")
    assert backends.pick("elastic_linear", torch.device("cpu")) == "torch"
    monkeypatch.setenv("ASVIT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ASVIT_BACKEND"):
        backends.pick("elastic_linear", torch.device("cpu"))
    # The argument wins over the environment.
    assert backends.pick("elastic_linear", torch.device("cpu"), "torch") == "torch"


def test_unknown_or_missing_backends_raise():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend"):
        backends.pick("elastic_linear", cpu, "cublas")
    with pytest.raises(TypeError, match="backend"):
        backends.pick("elastic_linear", cpu, 3)
    with pytest.raises(RuntimeError, match="no cuda implementation"):
        backends.pick("elastic_linear", cpu, "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        backends.pick("elastic_layer_norm", cpu, "cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backends.pick("elastic_linear", torch.device("cpu"), "triton")


@pytest.mark.skipif(not backends.triton_interpreted(), reason="needs the Triton interpreter")
def test_triton_interpreter_has_no_bf16():
    with pytest.raises(RuntimeError, match="bfloat16"):
        backends.pick("elastic_linear", torch.device("cpu"), "triton", torch.bfloat16)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    w = torch.randn(4, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ak.elastic_linear(x, w, backend="triton")


def test_size_limits_steer_auto_and_refuse_explicit():
    def limits(b):
        return "too wide" if b == "triton" else None
    with pytest.raises(RuntimeError, match="too wide"):
        backends.pick("elastic_layer_norm", torch.device("cpu"), "triton", limits=limits)


def test_build_info_keys():
    info = ak.build_info()
    for key in ("version", "cuda_extension", "cuda_archs", "cuda_version", "backends_available"):
        assert key in info
    assert info["version"] == ak.__version__
    assert "torch" in info["backends_available"]
    if not info["cuda_extension"]:
        assert info["cuda_extension_missing_reason"]
