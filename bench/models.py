"""Training-step time of whole models: the fused ops against what the released codes do.

One step = forward, cross-entropy on random labels, backward (gradients set to None first; no
optimizer), timed side by side (``harness.interleaved_ms``: alternating slices). Every method of a
case runs the SAME model object with the SAME weights on the SAME batch; only the attention /
elastic-op implementation is swapped, by patching the model code's seams for the duration of that
method:

As-ViT (``AsViT.from_genotype``), the seed ``8,2,3|4,1,2|4,1,4|4,1,6|32`` and the Large-shaped
``8,2,3,5|4,1,2,2|4,1,4,5|4,1,6,2|32,180`` (on CPU with a narrower hidden width, see --large-hidden):
    ours        the model as built: qkv on the (B, H, W) grid, windows of the whole batch packed as
                sequences, one ``varlen_attention`` call per block (edge windows smaller, no padding)
    plain       the released As-ViT / Swin way: ``WindowAttention.forward`` replaced by a window
                partition by reshape/permute into (B*nW, ws*ws, C) (grid zero-padded to a multiple of
                the window side when needed, padded keys masked), qkv and proj on the windows,
                softmax(QK^T)V with plain matmuls, then window reverse and crop
    plain_sdpa  the same partition with ``F.scaled_dot_product_attention`` on the padded windows
ElasticViT (a ViTAS-space supernet, ``SubnetSpace.vitas(scale)``), sharing "first" and "cyclic"
(cyclic ranges wrap past the end), sub-networks smallest / middle / largest:
    ours          ``set_subnet``: ElasticLinear / ElasticLayerNorm over channel ranges (no weight
                  copies), ``varlen_attention``
    copy_slicing  the same supernet and forward with every elastic linear / LayerNorm gathering its
                  weight slice first (``asvit_kernels.reference``: ``weight[out_idx][:, in_idx]``,
                  then F.linear / F.layer_norm) and attention as plain softmax(QK^T)V matmuls
    dense         ``extract_subnet(config)``: a standalone ViT of the sub-network's shape (the floor)

speedup = baseline ms / method ms (> 1: faster than the baseline; the baseline is "plain" for As-ViT
and "copy_slicing" for ElasticViT). Agreement: before timing, each method's loss and global gradient
norm on the batch are compared with ours (relative difference); a row over the tolerance (fp32: 1e-5
for the loss, 1e-4 for the gradient norm) says so in its note. Targets on a GPU: >= 1.3x for ElasticViT
sub-networks, >= 1.2x for As-ViT with windows. CPU timings are CPU timings (the torch backend).

    python bench/models.py                   # CPU: reduced sizes, fp32, a few minutes on 2 cores
    python bench/models.py --device cuda     # GPU: full sizes (img 224, batch 32 / 64), bf16
    python bench/models.py --full            # the GPU sizes on any device

Prints a table and writes bench/results/models_<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import math
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import asvit_kernels.nn.elastic as elastic_nn  # noqa: E402
from asvit_kernels import reference  # noqa: E402
from asvit_kernels.models import asvit as asvit_mod  # noqa: E402
from asvit_kernels.models import elastic_vit as elastic_mod  # noqa: E402
from asvit_kernels.models.genotype import LARGE, SEED  # noqa: E402
from asvit_kernels.models.subnet import SubnetConfig, SubnetSpace  # noqa: E402

LOSS_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_TOL_FACTOR = 10  # the gradient norm sums many more roundings than the loss
BASELINE = {"As-ViT": "plain", "ElasticViT": "copy_slicing"}
PATCH_CHOICES = (14, 16, 32)  # ViTAS patch sizes; the supernet keeps those dividing the image size


# ------------------------------------------------------------------------------------------ sizes

def default_sizes(device: str, full: bool) -> dict:
    """Problem sizes: the paper's on a GPU (or with --full), reduced for a 2-core CPU otherwise."""
    if full or device != "cpu":
        return dict(img=224, batch=32, large_hidden=None, elastic_scale=1.0, elastic_img=224, elastic_batch=64)
    return dict(img=112, batch=8, large_hidden=64, elastic_scale=0.5, elastic_img=112, elastic_batch=8)


# --------------------------------------------------------------------------- swapping a method in

@contextlib.contextmanager
def patched(target, **attrs):
    """Set ``target.<name> = value`` for each keyword for the duration of the block."""
    old = {name: getattr(target, name) for name in attrs}
    for name, value in attrs.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(target, name, value)


@functools.lru_cache(maxsize=64)
def _window_pad_bias(H: int, W: int, wh: int, ww: int, batch: int, device: torch.device, dtype: torch.dtype):
    """Additive key mask (B*nW, 1, 1, wh*ww) of a zero-padded grid: -inf on padded tokens."""
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    valid = torch.zeros(Hp, Wp, dtype=torch.bool)
    valid[:H, :W] = True
    valid = valid.reshape(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    bias = torch.zeros(valid.shape, dtype=dtype).masked_fill(~valid, float("-inf"))
    return bias[:, None, None, :].repeat(batch, 1, 1, 1).to(device)


def released_window_forward(use_sdpa: bool) -> Callable:
    """A ``WindowAttention.forward`` doing what the released As-ViT (Swin-style) code does."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = asvit_mod.window_sides((H, W), self.split)
        heads, hd = self.num_heads, self.head_dim
        pad_h, pad_w = -H % wh, -W % ww
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        nh, nw, n = Hp // wh, Wp // ww, wh * ww
        windows = x.reshape(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, C)
        q, k, v = self.qkv(windows).reshape(-1, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        bias = _window_pad_bias(H, W, wh, ww, B, x.device, x.dtype) if pad_h or pad_w else None
        if use_sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            o = attn.softmax(dim=-1) @ v
        o = self.proj(o.transpose(1, 2).reshape(-1, n, heads * hd))
        o = o.reshape(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        return o[:, :H, :W] if pad_h or pad_w else o
    return forward


def plain_uniform_attention(q, k, v, cu_q, cu_k, max_q, max_k, *args, backend=None, **kwargs):
    """Drop-in for ElasticAttention's ``varlen_attention`` call (B sequences of N = max_q tokens):
    softmax(QK^T)V on (B, H, N, D) with plain matmuls, as the released ViTAS code does."""
    total, H, D = q.shape
    q, k, v = (t.reshape(-1, max_q, H, D).transpose(1, 2) for t in (q, k, v))
    o = ((q * D ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return o.transpose(1, 2).reshape(total, H, D)


def _gather_linear(x, weight, bias=None, in_range=None, out_range=None, *, backend=None):
    return reference.elastic_linear(x, weight, bias, in_range, out_range)


def _gather_layer_norm(x, weight, bias, channel_range=None, eps=1e-5, *, backend=None):
    return reference.elastic_layer_norm(x, weight, bias, channel_range, eps)


def as_vit_plain(use_sdpa: bool) -> Callable:
    return lambda: patched(asvit_mod.WindowAttention, forward=released_window_forward(use_sdpa))


@contextlib.contextmanager
def copy_slicing():
    """ElasticLinear / ElasticLayerNorm gather their slices; ElasticAttention uses plain matmuls."""
    with patched(elastic_nn, elastic_linear=_gather_linear, elastic_layer_norm=_gather_layer_norm), \
            patched(elastic_mod, varlen_attention=plain_uniform_attention):
        yield


# ------------------------------------------------------------------------------------ measurement

class Method(NamedTuple):
    name: str
    model: torch.nn.Module
    context: Callable = contextlib.nullcontext  # entered around the check and the timing


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss
    return step


def _grad_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _reason(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:110]


def run_case(model_name: str, case: str, shape: str, methods: list[Method], x, y, device: str,
             min_run_time: float, rounds: int = 3) -> list[dict]:
    """Check each method against the first ("ours") on the batch, then time the training steps of
    those that agree side by side (``harness.interleaved_ms``, ``rounds`` x ``min_run_time`` s each)."""
    rows, ref, timed = [], None, {}
    tol = LOSS_TOL.get(x.dtype, 1e-5)
    for m in methods:
        row = {"model": model_name, "case": case, "shape": shape, "method": m.name, "group": f"{model_name} {case}"}
        try:
            m.model.train()
            step = train_step(m.model, x, y)
            with m.context():
                loss, gnorm = step().item(), _grad_norm(m.model)
                timed[len(rows)] = (step, m.context)
                if device == "cuda":
                    row["peak_mb"] = harness.peak_memory_mb(step, device)
            row.update(loss=loss, grad_norm=gnorm)
            if ref is None:
                ref = row
                row["note"] = "reference for agreement"
            else:
                row["loss_rel_diff"] = f"{_rel(loss, ref['loss']):.1e}"
                row["grad_rel_diff"] = f"{_rel(gnorm, ref['grad_norm']):.1e}"
                bad = _rel(loss, ref["loss"]) > tol or _rel(gnorm, ref["grad_norm"]) > GRAD_TOL_FACTOR * tol
                row["note"] = f"DISAGREES with ours (tol {tol:g})" if bad else "agrees"
        except Exception as e:  # noqa: BLE001 - a method that cannot run is a result, not a crash
            row.update(step_ms="n/a", note=f"n/a: {_reason(e)}", error=repr(e))
        rows.append(row)
    for i, ms in harness.interleaved_ms(timed, rounds, min_run_time).items():
        rows[i]["step_ms"] = ms
    print(harness.table(rows, COLUMNS), flush=True)
    base = next((r for r in rows if r["method"] == BASELINE[model_name.split()[0]]), None)
    for r in rows:
        ok = base is not None and isinstance(base.get("step_ms"), float) and isinstance(r.get("step_ms"), float)
        r["speedup"] = base["step_ms"] / r["step_ms"] if ok else "n/a"
    return rows


def _batch(batch: int, img: int, num_classes: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=g).to(device, dtype)
    y = torch.randint(num_classes, (batch,), generator=g).to(device)
    return x, y


# ----------------------------------------------------------------------------------------- As-ViT

def asvit_cases(sizes: dict, device: str, dtype: torch.dtype, backend, min_run_time: float,
                rounds: int = 3) -> list[dict]:
    rows = []
    cases = [("seed", SEED, None), ("Large", LARGE, sizes["large_hidden"])]
    x, y = _batch(sizes["batch"], sizes["img"], 1000, device, dtype)
    for case, genotype, hidden in cases:
        torch.manual_seed(0)
        model = asvit_mod.AsViT.from_genotype(genotype, embed_dim=hidden, img_size=sizes["img"],
                                              backend=backend).to(device, dtype)
        g = model.genotype
        stage1 = model.stage_info()[0]
        if hidden is not None:
            case += f" (hidden {hidden})"
        shape = (f"b{sizes['batch']} {sizes['img']}px, widths {'/'.join(map(str, g.widths))}, depths "
                 f"{'/'.join(map(str, g.depths))}, stage-1 grid {stage1['grid'][0]}x{stage1['grid'][1]} "
                 f"in {stage1['window'][0]}x{stage1['window'][1]} windows")
        methods = [Method("ours", model), Method("plain", model, as_vit_plain(False)),
                   Method("plain_sdpa", model, as_vit_plain(True))]
        rows += run_case("As-ViT", case, shape, methods, x, y, device, min_run_time, rounds)
        del model, methods
        gc.collect()
    return rows


# ------------------------------------------------------------------------------------- ElasticViT

def elastic_space(scale: float, img: int) -> SubnetSpace:
    """ViTAS's space with widths x ``scale``, keeping the patch sizes that divide ``img``."""
    patches = tuple(p for p in PATCH_CHOICES if img % p == 0)
    if not patches:
        raise SystemExit(f"--elastic-img {img} is divisible by none of the ViTAS patch sizes {PATCH_CHOICES}")
    return dataclasses.replace(SubnetSpace.vitas(scale), patch_sizes=patches)


def subnets(space: SubnetSpace, patch: int) -> dict[str, SubnetConfig]:
    """Every dimension at its narrowest, at its middle choice, and at its widest (one patch size)."""
    def pick(at: Callable) -> SubnetConfig:  # at: choices -> the one to take
        q, d = at(space.usable_qkv_dims), at(space.depths)
        return SubnetConfig(patch, at(space.embed_dims), (at(space.heads_for(q)),) * d, (q,) * d,
                            (at(space.mlp_dims),) * d)
    return {"smallest": pick(lambda c: c[0]), "middle": pick(lambda c: c[(len(c) - 1) // 2]),
            "largest": pick(lambda c: c[-1])}


def _describe(cfg: SubnetConfig) -> str:
    return (f"p{cfg.patch_size} d{cfg.depth} e{cfg.embed_dim} h{cfg.heads[0]} q{cfg.qkv_dim[0]} "
            f"m{cfg.mlp_dim[0]}")


def elastic_cases(sizes: dict, device: str, dtype: torch.dtype, backend, sharings: list[str], patch: int,
                  private_qk: bool, min_run_time: float, rounds: int = 3) -> list[dict]:
    rows = []
    space = elastic_space(sizes["elastic_scale"], sizes["elastic_img"])
    if patch not in space.patch_sizes:
        raise SystemExit(f"--patch {patch} must be one of {space.patch_sizes} (those dividing the image size)")
    x, y = _batch(sizes["elastic_batch"], sizes["elastic_img"], 1000, device, dtype)
    for sharing in sharings:
        torch.manual_seed(0)
        supernet = elastic_mod.ElasticViT(space, sizes["elastic_img"], sharing=sharing, private_qk=private_qk,
                                          backend=backend).to(device, dtype)
        for case, cfg in subnets(space, patch).items():
            supernet.set_subnet(cfg)
            dense = supernet.extract_subnet(cfg)
            methods = [Method("ours", supernet), Method("copy_slicing", supernet, copy_slicing),
                       Method("dense", dense)]
            shape = f"b{sizes['elastic_batch']} {sizes['elastic_img']}px, {_describe(cfg)}"
            rows += run_case(f"ElasticViT {sharing}", case, shape, methods, x, y, device, min_run_time, rounds)
            del dense, methods
        del supernet
        gc.collect()
    return rows


# ------------------------------------------------------------------------------------------- main

COLUMNS = ["model", "case", "method", "step_ms", "speedup", "loss_rel_diff", "grad_rel_diff", "note"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: fp32 on CPU, bf16 on GPU); "
                    "the models' parameters and inputs are cast to it")
    ap.add_argument("--models", default="asvit,elastic", help="comma list of asvit, elastic")
    ap.add_argument("--full", action="store_true", help="the GPU sizes (img 224, batch 32 / 64, As-ViT Large at "
                    "hidden 180, ViTAS space at scale 1) on any device")
    ap.add_argument("--img", type=int, default=None, help="As-ViT image size (default 112 CPU, 224 GPU)")
    ap.add_argument("--batch", type=int, default=None, help="As-ViT batch (default 8 CPU, 32 GPU)")
    ap.add_argument("--large-hidden", type=int, default=None,
                    help="As-ViT Large stage-1 width (default 64 CPU, the genotype's 180 GPU); depths stay 5/2/5/2")
    ap.add_argument("--elastic-scale", type=float, default=None,
                    help="SubnetSpace.vitas width scale (default 0.5 CPU, 1.0 GPU)")
    ap.add_argument("--elastic-img", type=int, default=None,
                    help="ElasticViT image size (default 112 CPU, 224 GPU); patch sizes 14/16/32 that divide it")
    ap.add_argument("--elastic-batch", type=int, default=None, help="ElasticViT batch (default 8 CPU, 64 GPU)")
    ap.add_argument("--patch", type=int, default=16, help="patch size of the ElasticViT sub-networks")
    ap.add_argument("--sharing", default="first,cyclic", help="comma list of first, last, cyclic")
    ap.add_argument("--private-qk", action="store_true", help="ViTAS private q/k projections per heads choice")
    ap.add_argument("--backend", default=None, help="backend of the fused ops for ours and dense (default: auto)")
    harness.add_timing_args(ap)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    device = args.device
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    sizes = default_sizes(device, args.full)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    which = args.models.split(",")
    if unknown := set(which) - {"asvit", "elastic"}:
        ap.error(f"unknown models {sorted(unknown)}; choose from asvit, elastic")
    rows = []
    if "asvit" in which:
        rows += asvit_cases(sizes, device, dtype, args.backend, args.min_run_time, args.rounds)
    if "elastic" in which:
        rows += elastic_cases(sizes, device, dtype, args.backend, args.sharing.split(","), args.patch,
                              args.private_qk, args.min_run_time, args.rounds)

    info = harness.machine(device)
    info.update(dtype=str(dtype).replace("torch.", ""), backend=args.backend or "auto", **sizes,
                patch=args.patch, private_qk=args.private_qk)
    cols = COLUMNS[:4] + (["peak_mb"] if device == "cuda" else []) + COLUMNS[4:]
    print("\n" + harness.table(rows, ["shape"] + cols))
    if not args.no_write:
        large = f"hidden {sizes['large_hidden']}" if sizes["large_hidden"] else "hidden 180"
        notes = (f"Training step = forward + cross-entropy on random labels + backward, no optimizer; "
                 f"{info['dtype']}, {harness.interleaved_note(args.rounds, args.min_run_time)}; "
                 f"fused ops backend {info['backend']}. "
                 f"As-ViT: batch {sizes['batch']}, {sizes['img']} px, seed and Large-shaped ({large}). "
                 f"ours = varlen window attention as built; plain = released-style window partition by "
                 f"reshape/permute (grid padded to the window side, padded keys masked) with matmul softmax; "
                 f"plain_sdpa = the same with F.scaled_dot_product_attention; baseline = plain. "
                 f"ElasticViT: SubnetSpace.vitas({sizes['elastic_scale']:g}) with patch sizes dividing "
                 f"{sizes['elastic_img']} px, batch {sizes['elastic_batch']}, sub-networks at patch {args.patch}; "
                 f"ours = set_subnet (elastic ops, no copies); copy_slicing = the same forward through "
                 f"asvit_kernels.reference (weight[out_idx][:, in_idx] then F.linear / F.layer_norm) and "
                 f"matmul softmax attention: the baseline; dense = extract_subnet (a standalone ViT: the floor). "
                 f"speedup = baseline ms / method ms (> 1 is faster). loss_rel_diff / grad_rel_diff: "
                 f"relative difference of the loss and of the global gradient norm from ours on the same batch "
                 f"(tolerance {LOSS_TOL.get(dtype, 1e-5):g} / x{GRAD_TOL_FACTOR}).")
        paths = harness.write("models", info, rows, ["shape"] + cols, notes)
        png = harness.plot_bars("models", info, rows, "group", "method", ["speedup", "step_ms"], "")
        print("wrote", *paths, png or "(no PNG: matplotlib is not installed)")


if __name__ == "__main__":
    main()
