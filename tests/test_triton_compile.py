"""Ahead-of-time compile of every Triton kernel for real GPU targets, on a CPU machine.

``triton.compile`` with a ``GPUTarget`` runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX)
and its bundled ``ptxas`` without a GPU, so the shared memory, registers and spills of the kernels
*as the launchers configure them on a GPU* can be checked here. Each case goes through the same
config function the launcher calls (``attention_config``, ``matmul_config``, ``gram_config``): there
is no second copy of the tile table to drift.

Asserted per case: it compiles; its shared memory is within the arch's per-block limit (the opt-in
maximum of CUDA's "Technical Specifications per Compute Capability" table: sm_80 163 KB, sm_86/89
99 KB, sm_90 227 KB); no register spills (local memory) on the fp16/bf16 paths. fp32 spills are
reported, not asserted (the ieee fp32 ``tl.dot`` is an FMA loop).

Coverage: by default the bounding subset, 38 compiles (a few minutes on two loaded cores): on each of
sm_80, sm_86 and sm_90 the three attention kernels at fp32 head dim 160 (padded to 256: the most
shared memory), bf16 at 256 (dq), 45 (fwd: non-power-of-two) and 64 (dkdv), the 64-row tiles with
the most registers, bf16 at 64 with every optional feature on (causal, window, softcap, ALiBi,
dropout, per-sequence tiles), and the elastic matmul's large fp32 tile, its bf16 split-K weight gradient and
split-K reduction; on sm_80 also its bf16 forward and
the Gram. ``ASVIT_COMPILE_FULL=1`` compiles the full matrix
(every kernel x arch x fp32/fp16/bf16 x head dims 32, 45, 64, 80, 128, 160, 256, and tf32), and
``ASVIT_COMPILE_TABLE=path`` writes the results as a Markdown table.

The compile runs in subprocesses without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit``
yields interpreted functions that cannot be compiled), in parallel. The module skips, with the
reason, where the installed Triton cannot compile CUDA targets here (no NVIDIA backend or ptxas).

Run the worker directly to print the table: ``python tests/test_triton_compile.py [--full]``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 86, 90)
# Max shared memory per block (opt-in), bytes: CUDA C++ Programming Guide, compute capabilities table.
SMEM_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
HEAD_DIMS = (32, 45, 64, 80, 128, 160, 256)
DTYPES = ("fp32", "fp16", "bf16")
ATTN_KERNELS = ("fwd", "dq", "dkdv")


def _cases(full: bool) -> list[dict]:
    out = []
    for arch in ARCHS:
        for kernel in ATTN_KERNELS:
            if full:
                combos = [(dt, d, "ieee") for dt in DTYPES for d in HEAD_DIMS]
                combos += [("fp32", d, "tf32") for d in HEAD_DIMS]
            else:
                # The bounding cases: shared memory grows with the padded head dim and the element
                # size (fp32 at 160 -> 256 for every kernel; half at 256 in dq, whose tiles dkdv
                # shares); the 64-row tiles at head dim <= 64 hold the most registers (45: also the
                # non-power-of-two path; bf16 spilled there on sm_86 with 4 warps). fp16 and bf16
                # share tiles.
                combos = [("fp32", 160, "ieee")]
                combos += {"fwd": [("bf16", 45, "ieee")], "dq": [("bf16", 256, "ieee")],
                           "dkdv": [("bf16", 64, "ieee")]}[kernel]
            for dt, d, prec in combos:
                out.append(dict(kind="attention", kernel=kernel, arch=arch, dtype=dt, head_dim=d,
                                precision=prec))
            # Every feature at once (causal, window, softcap, ALiBi, dropout; per-sequence tiles): the
            # most registers of the feature code, at the 64-row tiles of head dim 64.
            out.append(dict(kind="attention", kernel=kernel, arch=arch, dtype="bf16", head_dim=64,
                            precision="ieee", features=True))
        variants = ("fwd", "dw", "dw_split", "reduce")
        mm = [(dt, size, var) for dt in DTYPES for size in ("large", "small") for var in variants]
        if full:
            mm += [("fp32tf32", size, var) for size in ("large", "small") for var in variants[:3]]
        else:
            # The split-K weight gradient (workspace store) and its reduction in bf16 on every arch.
            mm = [("fp32", "large", "dw"), ("bf16", "large", "dw_split"), ("bf16", "large", "reduce")]
            mm += [("bf16", "large", "fwd")] if arch == 80 else []
        for dt, size, var in mm:
            out.append(dict(kind="matmul", kernel=var, arch=arch, dtype=dt, size=size))
        for dt in (DTYPES if full else ("bf16",) if arch == 80 else ()):
            out.append(dict(kind="gram", kernel="gram", arch=arch, dtype=dt))
    return out


def _case_id(c: dict) -> str:
    if c["kind"] == "attention":
        p = ("" if c["precision"] == "ieee" else "-tf32") + ("-features" if c.get("features") else "")
        return f"attn_{c['kernel']}-sm{c['arch']}-{c['dtype']}{p}-d{c['head_dim']}"
    if c["kind"] == "matmul":
        return f"matmul_{c['kernel']}-sm{c['arch']}-{c['dtype']}-{c['size']}"
    return f"gram-sm{c['arch']}-{c['dtype']}"


# ---------------------------------------------------------------------------------------------
# Worker side (imported only in the subprocess, where TRITON_INTERPRET is unset).

def _specs(c: dict):
    """(jit fn, {arg: pointer dtype or int value}, constexprs, options, config description)."""
    import torch

    tdt = {"fp32": torch.float32, "fp32tf32": torch.float32, "fp16": torch.float16,
           "bf16": torch.bfloat16}[c["dtype"]]
    el = {"fp32": "fp32", "fp32tf32": "fp32", "fp16": "fp16", "bf16": "bf16"}[c["dtype"]]
    P = "*" + el
    if c["kind"] == "attention":
        from asvit_kernels.triton import varlen_attention as va

        D, H, T = c["head_dim"], 8, 4096
        feats = c.get("features", False)  # window + softcap + alibi + dropout, per-sequence tiles, causal
        cfg = va.attention_config(tdt, D, c["arch"], c["kernel"], dropout=feats)
        const = dict(GROUP=1, CAUSAL=feats, PRECISION=c["precision"], BLOCK_M=cfg.block_m,
                     BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, HAS_WINDOW=feats, HAS_SOFTCAP=feats,
                     HAS_ALIBI=feats, HAS_DROPOUT=feats, PER_SEQ=feats)
        st = (H * D, D)  # contiguous (T, H, D)
        extras = dict(ALIBI="*fp32", softcap="fp32", win_left=-1, win_right=-1, dropout_p="fp32", seed=12345,
                      tiles_per_seq=4)
        if c["kernel"] == "fwd":
            fn = va._fwd_kernel
            args = dict(Q=P, K=P, V=P, O=P, LSE="*fp32", SEQ_Q="*i32", CU_Q="*i32", CU_K="*i32",
                        scale="fp32")
            for n in ("q", "k", "v", "o"):
                args[f"stride_{n}t"], args[f"stride_{n}h"] = st
            args.update(total_q=T, D=D, **extras)
        elif c["kernel"] == "dq":
            fn = va._bwd_dq_kernel
            args = dict(Q=P, K=P, V=P, DO=P, LSE="*fp32", DELTA="*fp32", DQ=P, SEQ_Q="*i32",
                        CU_Q="*i32", CU_K="*i32", scale="fp32")
            for n in ("q", "k", "v", "do", "dq"):
                args[f"stride_{n}t"], args[f"stride_{n}h"] = st
            args.update(total_q=T, D=D, **extras)
        else:
            fn = va._bwd_dkdv_kernel
            args = dict(Q=P, K=P, V=P, DO=P, LSE="*fp32", DELTA="*fp32", DK=P, DV=P, SEQ_K="*i32",
                        CU_Q="*i32", CU_K="*i32", scale="fp32")
            for n in ("q", "k", "v", "do", "dk", "dv"):
                args[f"stride_{n}t"], args[f"stride_{n}h"] = st
            args.update(total_q=T, total_k=T, D=D, **extras)
        desc = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}"
        return fn, args, const, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), desc
    if c["kind"] == "matmul":
        from asvit_kernels.triton import gather_matmul as gm

        M, N, K = (768, 768, 768) if c["size"] == "large" else (64, 768, 768)
        C = 1024  # the shared weight's full size (a wrapping range: index tables)
        fwd = c["kernel"] == "fwd"
        if c["kernel"] == "reduce":  # the split-K sum: its tile is fixed, the dtype is c's
            rb = gm.reduce_config(c["arch"])
            args = dict(ws_ptr="*fp32", ws_rowsum_ptr="*fp32", bias_ptr=P, c_ptr=P, rowsum_ptr=P, bn_idx_ptr="*i32",
                        cm_idx_ptr="*i32", cn_idx_ptr="*i32", M=M, N=N, stride_cm=C, stride_cn=1)
            const = dict(HAS_BIAS=False, HAS_ROWSUM=True, GATHER_BN=False, GATHER_CM=True, GATHER_CN=True,
                         SPLIT_K=8, BLOCK_M=rb, BLOCK_N=rb)
            return gm._split_k_reduce_kernel, args, const, dict(num_warps=4, num_stages=1), f"{rb}x{rb} w4 split 8"
        cfg = gm.matmul_config(M, N, K, tdt, c["arch"])
        split = 8 if c["kernel"] == "dw_split" else 1
        args = dict(a_ptr=P, b_ptr=P, bias_ptr=P, c_ptr=P, rowsum_ptr=P, bk_idx_ptr="*i32",
                    bn_idx_ptr="*i32", cm_idx_ptr="*i32", cn_idx_ptr="*i32", ws_ptr="*fp32", ws_rowsum_ptr="*fp32",
                    M=M, N=N, K=K, k_per_split=K // split)
        if fwd:  # x (M, K) @ w.t(): b strides (1, C)
            args.update(stride_am=K, stride_ak=1, stride_bk=1, stride_bn=C, stride_cm=N, stride_cn=1)
        else:    # dy.t() (M=C_out rows) @ x: a strides (1, M), c = dw (C, C)
            args.update(stride_am=1, stride_ak=M, stride_bk=N, stride_bn=1, stride_cm=C, stride_cn=1)
        prec = "tf32" if c["dtype"] == "fp32tf32" else "ieee"
        const = dict(HAS_BIAS=fwd, HAS_ROWSUM=not fwd, GATHER_BK=fwd, GATHER_BN=fwd, GATHER_CM=not fwd,
                     GATHER_CN=not fwd, SPLIT_K=split, INPUT_PRECISION=prec, BLOCK_M=cfg.block_m,
                     BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
        desc = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
        desc += f" split {split}" if split > 1 else ""
        return (gm._gather_matmul_kernel, args, const,
                dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), desc)
    from asvit_kernels.triton import per_sample_grad_gram as pg

    B, T, D_in, D_out = 256, 197, 768, 768
    cfg = pg.gram_config(tdt, c["arch"])
    args = dict(a_ptr=P, g_ptr=P, part_ptr="*fp32", pairs_ptr="*i32", B=B, T=T, D_in=D_in, D_out=D_out,
                sab=T * D_in, sat=D_in, sgb=T * D_out, sgt=D_out, n_blocks=-(-B // cfg.block_b),
                n_groups=pg.n_tile_groups(B, D_in, D_out, cfg, sms=132))
    const = dict(BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o, BLOCK_I=cfg.block_i)
    desc = f"B{cfg.block_b} T{cfg.block_t} O{cfg.block_o} I{cfg.block_i} w{cfg.num_warps} s{cfg.num_stages}"
    return pg._gram_kernel, args, const, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), desc


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local memory bytes per thread) from ``cuobjdump -res-usage``: the local size is
    what Triton's own ``n_spills`` reads from the driver (CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)."""
    import re

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        from triton import knobs
        tool = Path(knobs.nvidia.cuobjdump.path)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def _compile(fn, args: dict, const: dict, options: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    sig, constexprs, attrs = {}, dict(const), {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            sig[name] = v
            if v.startswith("*"):
                attrs[(i,)] = backend.parse_attr("D")  # torch allocations are 16-byte aligned
        elif v == 1:  # the JIT turns an int argument equal to 1 into a constexpr
            sig[name] = "constexpr"
            constexprs[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = backend.parse_attr("D")
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options)


def _probe() -> str | None:
    """None if this Triton can compile a CUDA kernel here, else why not."""
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton cannot be imported for compilation: {e!r}"

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)

    try:
        k = _compile(_copy, dict(x_ptr="*fp32", y_ptr="*fp32", n=1024), dict(BLOCK=128), {}, 80)
        _resources(k.asm["cubin"])
    except Exception as e:  # noqa: BLE001
        return f"this Triton cannot compile CUDA targets without a GPU: {type(e).__name__}: {e}"[:500]
    return None


def _worker(cases: list[dict]) -> list[dict]:
    out = []
    for c in cases:
        r = dict(c, id=_case_id(c))
        try:
            fn, args, const, options, r["config"] = _specs(c)
            k = _compile(fn, args, const, options, c["arch"])
            r["smem"] = int(k.metadata.shared)
            r["regs"], r["spills"] = _resources(k.asm["cubin"])
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}"[-2000:]
        out.append(r)
    return out


def run_all(cases: list[dict], jobs: int) -> dict:
    """Compile ``cases`` in ``jobs`` subprocesses; {"skip": reason} or {"results": [...]}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the default
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run([sys.executable, __file__, "--probe"], env=env, capture_output=True, text=True,
                               cwd=tmp)
        if probe.returncode != 0:
            return {"skip": f"compile probe crashed: {probe.stderr[-500:]}"}
        reason = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""
        if reason != "ok":
            return {"skip": reason}
        # Longest cases first, dealt round-robin, so the workers finish together.
        order = sorted(cases, key=lambda c: -(c.get("head_dim", 128) * (2 if c["dtype"] == "fp32" else 1)))
        procs = []
        for j in range(jobs):
            part = order[j::jobs]
            if not part:
                continue
            src, dst = Path(tmp, f"in{j}.json"), Path(tmp, f"out{j}.json")
            src.write_text(json.dumps(part))
            procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(src), str(dst)], env=env,
                                           cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                          dst))
        results = []
        for p, dst in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"compile worker failed:\n{err[-3000:]}")
            results += json.loads(dst.read_text())
    return {"results": results}


def table(results: list[dict]) -> str:
    lines = ["| kernel | arch | dtype | head dim | config | smem (B) | limit (B) | regs | spills (B) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["kind"], r["kernel"], r["arch"], r["dtype"], r.get("precision", ""),
                                            r.get("head_dim", 0), r.get("size", ""))):
        dt = r["dtype"] + ("-tf32" if r.get("precision") == "tf32" else "") + ("+features" if r.get("features") else "")
        hd = r.get("head_dim", r.get("size", "-"))
        name = {"attention": "attn_", "matmul": "matmul_", "gram": ""}[r["kind"]] + r["kernel"]
        if "error" in r:
            lines.append(f"| {name} | sm_{r['arch']} | {dt} | {hd} | {r.get('config', '?')} | FAIL: "
                         f"{r['error'].splitlines()[0][:80]} | {SMEM_LIMIT[r['arch']]} | | |")
        else:
            lines.append(f"| {name} | sm_{r['arch']} | {dt} | {hd} | {r['config']} | {r['smem']} | "
                         f"{SMEM_LIMIT[r['arch']]} | {r['regs']} | {r['spills']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# pytest side.

FULL = os.environ.get("ASVIT_COMPILE_FULL") == "1"
CASES = _cases(FULL)


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    out = run_all(CASES, jobs=max(1, min(4, os.cpu_count() or 1)))
    if "skip" in out:
        pytest.skip(out["skip"])
    if os.environ.get("ASVIT_COMPILE_TABLE"):
        Path(os.environ["ASVIT_COMPILE_TABLE"]).write_text(table(out["results"]) + "\n")
    return {r["id"]: r for r in out["results"]}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_compiles_within_limits(compiled, case):
    r = compiled[_case_id(case)]
    assert "error" not in r, f"{r['id']} ({r.get('config')}) does not compile:\n{r['error']}"
    limit = SMEM_LIMIT[case["arch"]]
    assert r["smem"] <= limit, f"{r['id']} ({r['config']}): {r['smem']} B shared memory > {limit} B"
    if case["dtype"] in ("fp16", "bf16"):
        assert r["spills"] == 0, f"{r['id']} ({r['config']}): {r['spills']} B of register spills ({r['regs']} regs)"


# ---------------------------------------------------------------------------------------------
# The GPU tile sizes through the interpreter: the launchers pick their GPU config when told the
# device is an sm_80 (the interpreter ignores warps and stages, not the tiles and their masks).

@pytest.fixture
def gpu_tiles(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")
    from asvit_kernels.triton import gather_matmul, per_sample_grad_gram, varlen_attention

    for m in (gather_matmul, per_sample_grad_gram, varlen_attention):
        monkeypatch.setattr(m, "device_arch", lambda device: 80)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("D,causal", [(45, False), (80, True)])
def test_attention_gpu_tiles_in_interpreter(gpu_tiles, dtype, D, causal):
    import torch
    from test_ops_attention import run

    from asvit_kernels.triton import varlen_attention as va

    tdt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    cfg = va.attention_config(tdt, D, 80, "fwd")
    assert (cfg.block_m, cfg.block_n) != (32, 32) or D > 128  # not the interpreter's own tiles
    lens = [23, 6, 70, 49, 0, 1, 130]  # several sequences per 64-row tile, one over two tiles
    run("cpu", "triton", tdt, lens, None, 2, 1, D, causal, seed=D)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_elastic_linear_gpu_tiles_in_interpreter(gpu_tiles, dtype):
    import torch

    import asvit_kernels as ak
    from asvit_kernels import reference
    from _util import TOL, rel_err

    tdt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 160, generator=g, dtype=torch.float64)
    b = torch.randn(200, generator=g, dtype=torch.float64)
    x = torch.randn(150, 140, generator=g, dtype=torch.float64)  # M, N >= 128: the 128x128 tiles
    rng_in, rng_out = (100, 140), (150, 130)                    # both ranges wrap
    dy = torch.randn(150, 130, generator=g, dtype=torch.float64).to(tdt)
    leaves = [t.to(tdt).requires_grad_() for t in (x, w, b)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    got = ak.elastic_linear(*leaves, rng_in, rng_out, backend="triton")  # dW: M = 130, N = 140
    want = reference.elastic_linear(*exact, rng_in, rng_out)
    got.backward(dy)
    want.backward(dy.double())
    for a, e in zip([got] + [t.grad for t in leaves], [want] + [t.grad for t in exact]):
        assert rel_err(a, e) <= TOL[tdt]


def test_elastic_weight_gradient_split_k_gpu_tiles_in_interpreter(gpu_tiles, monkeypatch):
    """The sm_80 tiles with split-K chosen by the launcher itself (132 SMs, few output tiles): the
    weight gradient runs as several K slices plus the reduction; every gradient vs float64."""
    import torch

    import asvit_kernels as ak
    from asvit_kernels import reference
    from asvit_kernels.triton import gather_matmul
    from _util import TOL, rel_err

    monkeypatch.setattr(gather_matmul, "sm_count", lambda device: 132)
    calls = []
    real = gather_matmul.split_k_for
    monkeypatch.setattr(gather_matmul, "split_k_for", lambda *a: calls.append(real(*a)) or calls[-1])
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 80, generator=g, dtype=torch.float64)
    b = torch.randn(96, generator=g, dtype=torch.float64)
    x = torch.randn(600, 40, generator=g, dtype=torch.float64)   # 600 tokens: K of the weight gradient
    rng_in, rng_out = (60, 40), [(0, 24), (90, 6)]                 # wrapped input, two output pieces
    dy = torch.randn(600, 30, generator=g, dtype=torch.float64).float()
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    got = ak.elastic_linear(*leaves, rng_in, rng_out, backend="triton")
    want = reference.elastic_linear(*exact, rng_in, rng_out)
    got.backward(dy)
    want.backward(dy.double())
    assert max(calls) > 1, f"no product was split: {calls}"
    for a, e in zip([got] + [t.grad for t in leaves], [want] + [t.grad for t in exact]):
        assert rel_err(a, e) <= TOL[torch.float32]


def _main(argv: list[str]) -> None:
    if argv[:1] == ["--probe"]:
        print(_probe() or "ok")
    elif argv[:1] == ["--worker"]:
        Path(argv[2]).write_text(json.dumps(_worker(json.loads(Path(argv[1]).read_text()))))
    else:
        out = run_all(_cases("--full" in argv), jobs=max(1, min(4, os.cpu_count() or 1)))
        print(out["skip"] if "skip" in out else table(out["results"]))


if __name__ == "__main__":
    _main(sys.argv[1:])
