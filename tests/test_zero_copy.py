"""The elastic backends never copy a weight slice: every aten op that touches the shared weight's
storage is a view or a matmul reading it in place, and the weight gradient is written straight into
the used rows/columns of one full-size buffer (no slice-sized gradient scattered afterwards)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from asvit_kernels import backends
from asvit_kernels.ranges import normalize_range, normalize_ranges

aten = torch.ops.aten
VIEWS = {aten.slice.Tensor, aten.t.default, aten.transpose.int, aten.view.default, aten._unsafe_view.default,
         aten.alias.default, aten.as_strided.default, aten.detach.default, aten.select.int, aten.expand.default,
         aten.unsqueeze.default, aten.permute.default}
READS_IN_PLACE = {aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out, aten.addmm_.default, aten.linear.default,
                  aten.matmul.default, aten.mul.Tensor, aten.addcmul.default, aten.mul_.Tensor}
# Ops allowed to write into the full-size gradient: allocation, zero fill, in-place products/sums.
WRITES_IN_PLACE = {aten.zeros_like.default, aten.zeros.default, aten.zero_.default, aten.fill_.Scalar,
                   aten.addmm_.default, aten.sum.IntList_out, aten.copy_.default, aten.new_zeros.default,
                   aten.empty.memory_format, aten.empty_like.default}


class StorageLog(TorchDispatchMode):
    """Records (op, input storages, output storages) for every aten op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outs = {t.untyped_storage().data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        self.calls.append((func, ins, outs))
        return out


def impls():
    from asvit_kernels.torch_backend import elastic as torch_impl
    out = [pytest.param(torch_impl.linear_forward, torch_impl.linear_backward, id="torch")]
    # Triton's CPU interpreter copies every argument to host arrays itself, which would hide what
    # the kernel does; on a GPU the launch is one op reading the pointers it is given.
    if torch.cuda.is_available() and backends.why_unavailable("triton", torch.device("cuda")) is None:
        from asvit_kernels.triton import elastic_linear as triton_impl
        out.append(pytest.param(triton_impl.forward, triton_impl.backward, id="triton", marks=pytest.mark.gpu))
    return out


@pytest.mark.parametrize("forward,backward", impls())
@pytest.mark.parametrize("in_range,out_range", [((0, 20), (0, 30)), ((30, 20), (40, 30)),
                                                ((5, 20), [(2, 8), (20, 8), (44, 6)])])
def test_linear_reads_and_writes_weight_in_place(forward, backward, in_range, out_range, monkeypatch):
    """The torch backend's CPU default gathers a multi-run weight block into one matmul (measured
    faster there: GATHER_PIECES); its per-run view products, the Triton kernel's way, are the ones
    held to zero copies here."""
    from asvit_kernels.torch_backend import elastic as torch_impl
    monkeypatch.setattr(torch_impl, "GATHER_PIECES", False)
    dev = "cuda" if forward.__module__.startswith("asvit_kernels.triton") else "cpu"
    w, b = torch.randn(48, 40, device=dev), torch.randn(48, device=dev)
    in_r = (normalize_range(in_range, 40),)
    out_r = normalize_ranges(out_range, 48, "out_range")
    x = torch.randn(33, in_r[0][1], device=dev)
    wp = w.untyped_storage().data_ptr()
    with StorageLog() as log:
        y = forward(x, w, b, in_r, out_r)
    for func, ins, outs in log.calls:
        if wp in ins:
            assert func in VIEWS | READS_IN_PLACE, f"forward ran {func} on the shared weight"
    dy = torch.randn_like(y)
    with StorageLog() as log:
        dx, dw, db = backward(dy, x, w, in_r, out_r, True, True, True)
    assert dw.shape == w.shape and db.shape == b.shape
    for grad in (dw, db):
        gp = grad.untyped_storage().data_ptr()
        for func, ins, outs in log.calls:
            if gp in outs or gp in ins:
                assert func in VIEWS | WRITES_IN_PLACE, f"backward ran {func} on a weight gradient"
    # No op allocated a slice-sized weight gradient to scatter later.
    for func, ins, outs in log.calls:
        assert func not in {aten.index_put_.default, aten.index_put.default, aten.slice_scatter.default,
                            aten.slice_backward.default, aten.index_add_.default, aten.index_copy_.default,
                            aten.scatter.src, aten.index.Tensor, aten.index_select.default}, func
