"""The NTK / Jacobian ops against the As-ViT definitions (asvit_kernels.reference loops)."""
import math

import pytest
import torch
from torch import nn

import asvit_kernels as ak
from asvit_kernels import reference

from _ntk_models import (CalledTwice, CustomLayer, DirectUse, Embedder, Interacting, Tied, TiedEmbedding, TinyViT,
                         WindowsFirst)
from _util import TOL, cases, dtypes_for, rel_err


@pytest.mark.parametrize("device,backend", cases("per_sample_grad_gram"))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 9), (17, 20, 33, 40), (16, 1, 64, 10), (40, 3, 18, 5)])
def test_per_sample_grad_gram_matches_reference(device, backend, shape, poison):
    B, T, D_in, D_out = shape
    g0 = torch.Generator().manual_seed(sum(shape))
    for dtype in dtypes_for(device, backend):
        a = torch.randn(B, T, D_in, generator=g0, dtype=torch.float64).to(dtype)
        g = torch.randn(B, T, D_out, generator=g0, dtype=torch.float64).to(dtype)
        want = reference.per_sample_grad_gram(a.double(), g.double())
        got = ak.per_sample_grad_gram(a.to(device), g.to(device), backend=backend)
        tol = TOL[dtype] if dtype != torch.float16 else 1e-5  # fp16 inputs, fp32 accumulation
        assert rel_err(got, want) <= tol
        if T == 1:  # (B, D) means T = 1
            assert rel_err(ak.per_sample_grad_gram(a[:, 0].to(device), g[:, 0].to(device), backend=backend), want) <= tol


def test_torch_gram_tiles_add_up(monkeypatch):
    """Both torch routes in several tiles (rows of D_out, samples of the token route) give the Gram."""
    from asvit_kernels.torch_backend import ntk as torch_ntk
    monkeypatch.setattr(torch_ntk, "TILE_BYTES", 4096)
    for B, T, D_in, D_out in ((4, 12, 10, 40), (9, 4, 30, 30)):  # tiles (4 of 12 rows); tokens (3 of 3 samples)
        a, g = torch.randn(B, T, D_in, dtype=torch.float64), torch.randn(B, T, D_out, dtype=torch.float64)
        assert rel_err(torch_ntk.per_sample_grad_gram(a, g), reference.per_sample_grad_gram(a, g)) <= 1e-12


@pytest.mark.parametrize("device,backend", cases("per_sample_grad_gram"))
def test_per_sample_grad_gram_strided_inputs(device, backend):
    a = torch.randn(20, 6, 9, device=device).transpose(0, 1)   # (6, 20, 9), batch stride 9
    g = torch.randn(6, 20, 14, device=device)[:, :, ::2]        # non-unit last-dim stride
    assert rel_err(ak.per_sample_grad_gram(a, g, backend=backend),
                   reference.per_sample_grad_gram(a.double(), g.double())) <= TOL[torch.float32]


def test_triton_gram_grid_is_one_dimensional_for_large_batches():
    """B > 4080 once made the y grid (n_blocks^2) exceed 65535: the grid is now 1-D over the
    upper-triangle block pairs (x allows 2^31 - 1), each symmetric pair once."""
    pytest.importorskip("triton")
    from asvit_kernels.triton import per_sample_grad_gram as pg

    cfg = pg.gram_config(torch.float32, 80)
    for B in (1, 16, 17, 4080, 4081, 5000, 100_000):
        n_blocks = -(-B // cfg.block_b)
        n_groups = pg.n_tile_groups(B, 768, 768, cfg, sms=132)
        grid = pg.grid(B, n_groups, cfg)
        assert len(grid) == 1 and grid[0] <= 2**31 - 1
        assert grid[0] == n_blocks * (n_blocks + 1) // 2 * n_groups  # pairs bi <= bj only
    assert pg.n_tile_groups(5000, 768, 768, cfg, sms=132) == 1


@pytest.mark.parametrize("device,backend", [c for c in cases("per_sample_grad_gram") if "triton" in c.id])
def test_triton_gram_mirrors_symmetric_blocks(device, backend):
    """Several block pairs, several tile groups: every block matches the reference and the mirrored
    (off-diagonal) blocks are bit-for-bit the transpose of the computed ones."""
    g0 = torch.Generator().manual_seed(7)
    for B, T, D_in, D_out in ((53, 2, 5, 3), (33, 1, 40, 20)):
        a = torch.randn(B, T, D_in, generator=g0)
        g = torch.randn(B, T, D_out, generator=g0)
        got = ak.per_sample_grad_gram(a.to(device), g.to(device), backend=backend).cpu()
        assert rel_err(got, reference.per_sample_grad_gram(a.double(), g.double())) <= TOL[torch.float32]
        off = torch.ones(B, B, dtype=torch.bool)
        for b0 in range(0, B, 16):
            off[b0:b0 + 16, b0:b0 + 16] = False
        assert torch.equal(got[off], got.t()[off])


def test_per_sample_grad_gram_rejects():
    a = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="share"):
        ak.per_sample_grad_gram(a, torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="empty batch"):
        ak.per_sample_grad_gram(a[:0], a[:0])
    with pytest.raises(ValueError, match="both"):
        ak.per_sample_grad_gram(a, a[:, 0])
    with pytest.raises(TypeError, match="g is torch.float64"):
        ak.per_sample_grad_gram(a, a.double())


@pytest.mark.parametrize("params", ["all", "weights"])
def test_ntk_fast_path_equals_per_sample_loop(params):
    torch.manual_seed(0)
    model = TinyViT().double()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    K, info = ak.ntk(model, x, params=params, return_info=True)
    assert info["path"] == "fast", info
    assert K.dtype == torch.float64 and K.shape == (6, 6)
    assert rel_err(K, reference.ntk_loop(model, x, params=params)) <= 1e-6


def test_ntk_float32_and_triton_gram():
    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(5, 3, 16, 16)
    want = reference.ntk_loop(model.double(), x.double())
    model.float()
    for backend in ak.backends.available("per_sample_grad_gram", torch.device("cpu")):
        assert rel_err(ak.ntk(model, x, backend=backend), want) <= 1e-4


@pytest.mark.parametrize("kernel,dilation,padding,stride", [
    ((7, 7), (1, 1), (3, 3), (4, 4)), ((3, 2), (2, 1), (1, 2), (2, 3)), ((4, 4), (1, 1), (0, 0), (4, 4)),
    ((1, 1), (1, 1), (0, 0), (1, 1)), ((5, 5), (1, 1), (6, 6), (1, 1)), ((3, 3), (3, 2), (0, 0), (5, 1))])
def test_conv_windows_are_unfold(kernel, dilation, padding, stride):
    """The strided-copy im2col of the Conv2d factor equals F.unfold bit for bit, also on strided
    input (channels_last, a slice) and with non-finite values (pure data movement)."""
    from asvit_kernels.ops.ntk import _conv_windows
    x = torch.randn(3, 4, 13, 11, dtype=torch.float64)
    x[1, 2, 5, 3], x[2, 0, 0, 0] = math.nan, -math.inf
    for t in (x, x.to(memory_format=torch.channels_last), torch.randn(3, 8, 13, 11, dtype=torch.float64)[:, ::2]):
        want = nn.functional.unfold(t, kernel, dilation, padding, stride).transpose(1, 2)
        got = _conv_windows(t, kernel, dilation, padding, stride)
        assert got.shape == want.shape
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_ntk_conv_with_padding_dilation_stride_equals_loop():
    """The Conv2d factor for padding, dilation and unequal strides (the patch embeds above have none)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, (3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1)), nn.GELU(),
                          nn.Conv2d(5, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    x = torch.randn(6, 3, 11, 11, dtype=torch.float64)
    K, info = ak.ntk(model, x, return_info=True)
    assert info["path"] == "fast", info
    assert rel_err(K, reference.ntk_loop(model, x)) <= 1e-10


def test_ntk_conv_fed_unbatched_samples_takes_exact_path():
    """A Conv2d called on each (C, H, W) sample, C equal to B so the leading-dim check cannot tell:
    the fast path must not read the unbatched call as a batch."""
    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 2), nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            return self.head(torch.stack([self.conv(xi) for xi in x]).flatten(1))

    torch.manual_seed(0)
    model = PerSample().double()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    K, info = ak.ntk(model, x, return_info=True)
    assert info["path"] == "exact" and "not a batch" in info["reason"], info
    assert rel_err(K, reference.ntk_loop(model, x)) <= 1e-10


@pytest.mark.parametrize("factory,why", [
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), "BatchNorm"),
    (WindowsFirst, "leading dim"),
    (CustomLayer, "not broadcast"),
    (Interacting, "interact"),
])
def test_ntk_exact_fallback(factory, why):
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(5, 8, 4, dtype=torch.float64) if factory is WindowsFirst else torch.randn(5, 5, dtype=torch.float64)
    K, info = ak.ntk(model, x, return_info=True)
    assert info["path"] == "exact" and why in info["reason"], info
    assert rel_err(K, reference.ntk_loop(model, x)) <= 1e-6


def test_ntk_embedding_and_output_fn():
    torch.manual_seed(0)
    model = Embedder().double()
    idx = torch.randint(0, 11, (5, 7))
    idx[0, :3] = 0  # padding rows get no gradient
    K, info = ak.ntk(model, idx, return_info=True)
    assert info["path"] == "fast"
    assert rel_err(K, reference.ntk_loop(model, idx)) <= 1e-6
    fn = lambda m, x: m(x)[:, :1] * 3  # noqa: E731
    assert rel_err(ak.ntk(model, idx, output_fn=fn), reference.ntk_loop(model, idx, output_fn=fn)) <= 1e-6


def test_ntk_several_initialisations():
    torch.manual_seed(0)
    models = [TinyViT().double() for _ in range(3)]
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    K, info = ak.ntk(models, x, params="weights", return_info=True)
    assert info["path"] == "fast", info
    assert info["method"] == "one model per pass (autograd)" and "cost model" in info["why"], info
    assert K.shape == (3, 4, 4)
    for k, m in zip(K, models):
        assert rel_err(k, reference.ntk_loop(m, x, params="weights")) <= 1e-6
    K2, info = ak.ntk(models, x, params="weights", models_per_pass=2, return_info=True)
    assert info["method"] == "2 models per vmapped pass" and info["why"] == "models_per_pass=2", info
    assert rel_err(K2, K) <= 1e-12
    with pytest.raises(ValueError, match="models_per_pass"):
        ak.ntk(models, x, models_per_pass=0)


def test_ntk_list_must_share_architecture():
    with pytest.raises(ValueError, match="one architecture"):
        ak.ntk([nn.Linear(5, 3), nn.Linear(5, 4)], torch.randn(4, 5))


def test_condition_number():
    torch.manual_seed(0)
    models = [TinyViT().double() for _ in range(2)]
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    kappas = []
    for m in models:
        ev = torch.linalg.eigvalsh(reference.ntk_loop(m, x, params="weights"))
        kappas.append((ev[-1] / ev[0]).item())
    assert math.isclose(ak.ntk_condition_number(models, x, params="weights"), sum(kappas) / 2, rel_tol=1e-6)
    # A degenerate network (every output the same): lambda_min = 0 -> inf, never NaN.
    dead = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    nn.init.constant_(dead[0].weight, 0.0)
    nn.init.constant_(dead[0].bias, -1.0)
    assert ak.ntk_condition_number(dead, torch.randn(4, 5)) == math.inf
    nan_model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))  # NaN activations: a NaN NTK
    nn.init.constant_(nan_model[0].weight, float("nan"))
    assert ak.ntk_condition_number(nan_model, torch.randn(4, 5)) == math.inf
    with pytest.raises(ValueError, match="at least 2"):
        ak.ntk_condition_number(dead, torch.randn(1, 5))


def test_ntk_rejects():
    model = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="non-empty batch"):
        ak.ntk(model, torch.randn(0, 5))
    with pytest.raises(ValueError, match="leading dim"):
        ak.ntk(model, torch.randn(4, 5), output_fn=lambda m, x: m(x).sum())
    with pytest.raises(ValueError, match="selects no parameter"):
        ak.ntk(model, torch.randn(4, 5), params=lambda n, p: False)
    with pytest.raises(ValueError, match="params must be"):
        ak.ntk(model, torch.randn(4, 5), params="biases")
    with pytest.raises(ValueError, match="empty list"):
        ak.ntk([], torch.randn(4, 5))


def test_circle_curve():
    pts, tans = ak.circle_curve((3, 4, 4), 10, generator=torch.Generator().manual_seed(0))
    assert pts.shape == tans.shape == (10, 3, 4, 4)
    p, t = pts.reshape(10, -1).double(), tans.reshape(10, -1).double()
    assert torch.allclose(p.norm(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-6)
    assert torch.allclose((p * t).sum(1), torch.zeros(10, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(p[0], p[-1], atol=1e-6)  # t runs from 0 to 2 pi
    with pytest.raises(ValueError, match="n_points"):
        ak.circle_curve((3,), 0)


def test_length_distortion_equals_per_coordinate_loop():
    torch.manual_seed(0)
    model = TinyViT(classes=32).double().eval()
    pts, tans = ak.circle_curve((3, 16, 16), 10, generator=torch.Generator().manual_seed(1))
    pts, tans = pts.double(), tans.double()
    want = reference.length_distortion_loop(model, pts, tans)
    assert math.isclose(ak.length_distortion(model, pts, tans), want, rel_tol=1e-6)
    assert math.isclose(ak.length_distortion(model, pts, tans, chunk_size=3), want, rel_tol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        ak.length_distortion(model, pts, tans[:5])
    with pytest.raises(ValueError, match="chunk_size"):
        ak.length_distortion(model, pts, tans, chunk_size=-1)


@pytest.mark.parametrize("make,path", [(Tied, "fast"), (CalledTwice, "fast"), (DirectUse, "exact"),
                                       (TiedEmbedding, "exact")])
@pytest.mark.parametrize("params", ["all", "weights"])
def test_ntk_shared_parameters(make, path, params):
    """A Parameter held by two layers, a layer called twice, a weight also used outside its layer:
    the answer is the definition's (every use's gradient summed before the Gram). The fast path
    concatenates the uses of tied layers of one kind; a use no hook sees, or layers of different
    kinds sharing a weight, take the exact path and say why."""
    torch.manual_seed(1)
    model = make().double()
    if make is TiedEmbedding:
        x = torch.randint(0, 11, (5, 4))
    else:
        x = torch.randn(5, 4, 6, dtype=torch.float64)
    K, info = ak.ntk(model, x, params=params, return_info=True)
    assert info["path"] == path, info
    if path == "exact":
        assert "weight" in info["reason"], info
    assert rel_err(K, reference.ntk_loop(model, x, params=params)) <= 1e-6


def test_ntk_shared_parameters_many_models():
    """The vmapped multi-model pass replaces every alias of a tied Parameter by the model's own."""
    torch.manual_seed(2)
    models = [Tied().double() for _ in range(3)]
    x = torch.randn(4, 4, 6, dtype=torch.float64)
    K, info = ak.ntk(models, x, return_info=True)
    assert info["path"] == "fast", info
    for k, m in zip(K, models):
        assert rel_err(k, reference.ntk_loop(m, x)) <= 1e-6


class _InPlaceAfterLinear(nn.Module):
    """A layer output written in place (ReLU(inplace=True)): its gradient must still be the
    gradient at the layer's output, not at the rewritten tensor."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, classes)

    def forward(self, x):
        h = self.fc(x)
        h.mul_(1.5)
        return self.out(self.act(h).mean(1))


class _WeightReadAsTensor(nn.Module):
    """The weight used by a matmul on its transpose (no hook sees it), and its shape read (not a use)."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.fc, self.out = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, x, use=True):
        assert self.fc.weight.shape[0] == x.shape[-1]
        h = torch.tanh(self.fc(x))
        if use:
            h = h + x @ self.fc.weight.t()
        return self.out(h.mean(1))


def test_ntk_fast_path_survives_in_place_writes_to_layer_outputs():
    torch.manual_seed(3)
    model = _InPlaceAfterLinear().double()
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    K, info = ak.ntk(model, x, return_info=True)
    assert info["path"] == "fast", info
    assert rel_err(K, reference.ntk_loop(model, x)) <= 1e-10


def test_ntk_sees_a_weight_used_outside_its_layer_without_weight_gradients():
    torch.manual_seed(4)
    model = _WeightReadAsTensor().double()
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    K, info = ak.ntk(model, x, return_info=True)
    assert info["path"] == "exact" and "fc.weight" in info["reason"], info
    assert rel_err(K, reference.ntk_loop(model, x)) <= 1e-10
    plain = lambda m, z: m(z, use=False)  # noqa: E731 - only the shape is read: the fast path holds
    K, info = ak.ntk(model, x, output_fn=plain, return_info=True)
    assert info["path"] == "fast", info
    assert rel_err(K, reference.ntk_loop(model, x, output_fn=plain)) <= 1e-10
