"""build_info(): toolkit, SASS/PTX archs, minimum driver, and the GPU coverage check (its logic is
exercised with faked devices: it cannot run on a machine without a GPU)."""
from __future__ import annotations

import pytest

import asvit_kernels as ak
from asvit_kernels import _ext

CU13 = ["75", "80", "86", "89", "90"]
CU12 = ["70", "75", "80", "86", "90"]


@pytest.mark.parametrize("cap, archs, want", [
    ((8, 0), CU13, "sass sm_80"),
    ((8, 6), CU13, "sass sm_86"),
    ((8, 7), CU13, "sass sm_86"),     # same major, newer minor: the highest SASS below it runs
    ((8, 9), CU13, "sass sm_89"),
    ((9, 0), CU13, "sass sm_90"),
    ((10, 0), CU13, "ptx compute_90"),  # Blackwell: only the PTX of 9.0, JIT-compiled
    ((12, 0), CU13, "ptx compute_90"),
    ((7, 0), CU13, None),             # V100 and CUDA 13: not covered
    ((7, 0), CU12, "sass sm_70"),
    ((7, 2), CU12, "sass sm_70"),
    ((6, 1), CU12, None),             # older than every SASS and the PTX
    ((8, 0), ["80"], "sass sm_80"),
    ((8, 6), ["80"], "sass sm_80"),
    ((9, 0), ["80"], "ptx compute_80"),
    ((7, 5), ["80"], None),
])
def test_arch_coverage(cap, archs, want):
    assert _ext.arch_coverage(cap, archs, _ext.ptx_archs(archs)) == want


def test_arch_specific_targets():
    assert _ext.arch_coverage((9, 0), ["90a"], []) == "sass sm_90a"
    assert _ext.arch_coverage((9, 1), ["90a"], []) is None     # 'a' SASS runs on exactly 9.0
    assert _ext.arch_coverage((10, 0), ["90a"], ["90a"]) is None  # and its PTX is not portable


def test_ptx_is_the_highest_arch():
    assert _ext.ptx_archs(CU13) == ["90"]
    assert _ext.ptx_archs(["100", "90", "80"]) == ["100"]
    assert _ext.ptx_archs([]) == []
    with pytest.raises(ValueError, match="arch"):
        _ext.ptx_archs(["sm_x"])


def test_min_driver():
    assert _ext.min_driver("13.0") == {"sass": "580", "ptx_jit": "580"}
    assert _ext.min_driver("12.4") == {"sass": "525", "ptx_jit": "550"}
    assert _ext.min_driver("12.9")["sass"] == "525"
    assert _ext.min_driver(None) == {"sass": None, "ptx_jit": None}


def test_gpu_coverage_sentence():
    devices = [(0, "NVIDIA A100", (8, 0)), (1, "Tesla V100-SXM2-32GB", (7, 0))]
    rows, sentence = _ext.gpu_coverage(devices, CU13, ["90"], "13.0")
    assert [r["covered_by"] for r in rows] == ["sass sm_80", None]
    assert rows[1]["capability"] == "7.0"
    assert sentence.count(".") >= 1 and "\n" not in sentence
    assert sentence.startswith("GPU 1 (Tesla V100-SXM2-32GB, sm_70): not covered by asvit_kernels._C")
    assert "+cu12" in sentence and "sm_75" in sentence and "compute_90 (PTX)" in sentence
    _, sentence = _ext.gpu_coverage([(0, "GTX 1080", (6, 1))], CU12, ["90"], "12.4")
    assert "ASVIT_CUDA_ARCHS including 61" in sentence
    assert _ext.gpu_coverage(devices[:1], CU13, ["90"], "13.0")[1] is None
    assert _ext.gpu_coverage([], CU13, ["90"], "13.0") == ([], None)


class _FakeC:
    def __init__(self, archs, version):
        self._archs, self._version = archs, version

    def compiled_archs(self):
        return list(self._archs)

    def cuda_version(self):
        return self._version

    def device_count(self):
        return 1


def test_build_info_with_a_faked_uncovered_gpu(monkeypatch):
    monkeypatch.setattr(_ext, "C", _FakeC(CU13, "13.0"))
    monkeypatch.setattr(ak, "_cuda_devices", lambda: [(0, "Tesla V100-PCIE-16GB", (7, 0))])
    info = ak.build_info()
    assert info["cuda_sass_archs"] == ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
    assert info["cuda_ptx_archs"] == ["compute_90"]
    assert info["min_driver"] == {"sass": "580", "ptx_jit": "580"}
    assert info["gpus"] == [{"index": 0, "name": "Tesla V100-PCIE-16GB", "capability": "7.0",
                             "covered_by": None}]
    assert "not covered" in info["gpu_not_covered"]

    monkeypatch.setattr(_ext, "C", _FakeC(CU12, "12.4"))
    info = ak.build_info()
    assert info["gpus"][0]["covered_by"] == "sass sm_70" and info["gpu_not_covered"] is None
    assert info["min_driver"]["sass"] == "525"


def test_build_info_here():
    info = ak.build_info()
    for key in ("cuda_version", "cuda_sass_archs", "cuda_ptx_archs", "min_driver", "gpus", "gpu_not_covered"):
        assert key in info
    if _ext.C is None:
        assert info["cuda_sass_archs"] == [f"sm_{a}" for a in _ext.BUILD_CONFIG["cuda_archs"]]
        assert info["gpus"] == [] and info["gpu_not_covered"] is None
    else:
        archs = _ext.C.compiled_archs()
        assert info["cuda_sass_archs"] == [f"sm_{a}" for a in archs]
        assert info["cuda_ptx_archs"] == [f"compute_{a}" for a in _ext.ptx_archs(archs)]
        assert info["cuda_version"] == _ext.C.cuda_version()
        assert info["min_driver"]["sass"] is not None
