#!/usr/bin/env bash
# Static check of the CUDA kernels in csrc/ (no GPU needed):
#   1. compile each kernel source with `nvcc -c -Xptxas -v` for sm_80 and sm_90 (CUDA 13) and
#      sm_70 (CUDA 12.4), MAX_JOBS at a time (only the .cu files, not the whole extension);
#   2. print ptxas's table per kernel x arch: registers, spill stores / loads, stack, shared memory;
#   3. fail when a kernel spills more (stores + loads, bytes) than csrc/spill_budget.txt allows;
#   4. count the HMMA instructions of each kernel in `cuobjdump -sass` and fail unless every
#      tensor-core instantiation has some (fp16 on every arch; bf16 and tf32 on sm_80/90) and every
#      FMA-labelled one (fp32 without tf32, bf16 on sm_70, fp32 backward at head dim 256) has none.
#
#   bash scripts/check_sass.sh                 # the check (CI runs it after scripts/wheels.sh)
#   ASVIT_SASS_SRC=/some/checkout/csrc bash scripts/check_sass.sh   # another tree, e.g. a baseline
#   ASVIT_SASS_TARGETS="13:80" bash scripts/check_sass.sh           # a subset (toolkit:arch ...)
#   ASVIT_SASS_OUT=build/sass-base  (outputs elsewhere; default build/sass)
#
# Toolkits: CUDA 13 is the nvcc on PATH (or CUDA13_HOME). CUDA 12.4 is CUDA12_HOME, else the one
# scripts/wheels.sh assembles under $ASVIT_WHEEL_WORK (default build/wheels), reused when it has
# nvdisasm, else assembled here (once, under build/sass/cu12) by wheels.sh's own functions.
# cuobjdump and the nvdisasm it runs: CUDA 13.0's bin/ has neither, so for sm_80/sm_90 they come
# from PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels (13.2.51; pip download,
# unpacked under build/sass/tools, reused); sm_70 uses the CUDA 12.4 toolkit's (see below).
# Outputs under build/sass: per-arch objects, ptxas logs, SASS listings and table.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SRC=$(cd "${ASVIT_SASS_SRC:-csrc}" && pwd)
OUTDIR=${ASVIT_SASS_OUT:-$ROOT/build/sass}
export MAX_JOBS="${MAX_JOBS:-2}"
TARGETS="${ASVIT_SASS_TARGETS:-13:80 13:90 12:70}"
SASS_WHEELS=(nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51)
T0=$(date +%s)
die() { echo "check_sass.sh: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------ toolkits
nvcc13() {
    local nvcc=${CUDA13_HOME:+$CUDA13_HOME/bin/nvcc}
    nvcc=${nvcc:-$(command -v nvcc)} || die "no CUDA 13 nvcc (put it on PATH or set CUDA13_HOME)"
    "$nvcc" --version | grep -q "release 13\." || die "$nvcc is not CUDA 13"
    echo "$nvcc"
}

# wheels.sh's CUDA 12 toolkit: reused when wheels.sh has assembled it (in CI it ran just before),
# else assembled here under build/sass/cu12 by wheels.sh's own functions (die, tools, the "CUDA 12
# toolkit" section, evaluated rather than copied: one way to assemble it). sm_70's SASS can only
# be listed by a CUDA <= 13.0 nvdisasm (13.2's refuses SM70, and PyPI has no older one): the
# toolkit's, which assemble_cuda12 copies. CUDA12_HOME: a real installation, used as it is.
cuda12_home_here() {
    if [ -n "${CUDA12_HOME:-}" ]; then echo "$CUDA12_HOME"; return; fi
    local WORK
    WORK=$(mkdir -p "${ASVIT_WHEEL_WORK:-build/wheels}" && cd "${ASVIT_WHEEL_WORK:-build/wheels}" && pwd)
    if [ -f "$WORK/cuda-12.4/.complete" ] && [ -x "$WORK/cuda-12.4/bin/nvdisasm" ]; then
        echo "$WORK/cuda-12.4"; return
    fi
    local tools_venv=$WORK/tools
    WORK=$OUTDIR/cu12 && mkdir -p "$WORK"
    if [ ! -f "$WORK/cuda-12.4/.complete" ]; then
        local defs
        defs=$(sed -n -e '/^die() /p' -e '/^tools() {/,/^}/p' \
                      -e '/^# -* CUDA 12 toolkit$/,/^# -* build and repair$/p' scripts/wheels.sh)
        eval "$defs"
        declare -F assemble_cuda12 >/dev/null && declare -F tools >/dev/null \
            || die "scripts/wheels.sh no longer has tools() and assemble_cuda12() where this script looks"
        echo "check_sass.sh: assembling the CUDA 12.4 toolkit by scripts/wheels.sh's assemble_cuda12" >&2
        if [ -x "$tools_venv/bin/pip" ]; then ln -sfn "$tools_venv" "$WORK/tools"; else tools >&2; fi
        assemble_cuda12 >&2
    fi
    echo "$WORK/cuda-12.4"
}

# cuobjdump -sass runs nvdisasm (found through NVDISASM_PATH): both from PyPI, for CUDA 13.
cuobjdump13() {
    local dir=$OUTDIR/tools
    if [ ! -x "$dir/cuobjdump" ] || [ ! -x "$dir/nvdisasm" ]; then
        mkdir -p "$dir/dl"
        python3 -m pip download -q --no-deps -d "$dir/dl" "${SASS_WHEELS[@]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
        python3 - "$dir" <<'EOF'
import glob, os, sys, zipfile
d = sys.argv[1]
for tool in ("cuobjdump", "nvdisasm"):
    whl, = glob.glob(os.path.join(d, "dl", f"nvidia_cuda_{tool}-*.whl"))
    with zipfile.ZipFile(whl) as z:
        data = z.read(f"nvidia/cu13/bin/{tool}")
    with open(os.path.join(d, tool), "wb") as f:
        f.write(data)
    os.chmod(os.path.join(d, tool), 0o755)
EOF
        rm -rf "$dir/dl"
    fi
    echo "$dir/cuobjdump"
}

# ------------------------------------------------------------------------------------ compile
rm -rf "$OUTDIR/obj" && mkdir -p "$OUTDIR/obj"
SOURCES=(varlen_attention.cu per_sample_grad_gram.cu elastic_layer_norm.cu)
jobs=()
for t in $TARGETS; do
    tk=${t%%:*} arch=${t##*:}
    case "$tk" in
        13) nvcc=$(nvcc13); dump=$(cuobjdump13) ;;
        12) home=$(cuda12_home_here); nvcc=$home/bin/nvcc; dump=$home/bin/cuobjdump ;;
        *) die "unknown toolkit '$tk' in ASVIT_SASS_TARGETS (13 or 12)" ;;
    esac
    [ -x "$nvcc" ] && [ -x "$dump" ] || die "cu$tk: missing $nvcc or $dump"
    mkdir -p "$OUTDIR/obj/sm_$arch"
    echo "sm_$arch: $("$nvcc" --version | tail -1), $dump" >"$OUTDIR/obj/sm_$arch/toolkit.txt"
    for f in "${SOURCES[@]}"; do jobs+=("$nvcc $dump $arch $f"); done
done

compile_one() {  # compile_one NVCC CUOBJDUMP ARCH FILE: object, ptxas log, SASS
    local nvcc=$1 dump=$2 arch=$3 f=$4 o
    o=$OUTDIR/obj/sm_$arch/${f%.cu}
    PATH="$(dirname "$nvcc"):$PATH" "$nvcc" -c -O3 -std=c++17 -arch="sm_$arch" -Xptxas -v -I"$SRC" \
        -o "$o.o" "$SRC/$f" 2>"$o.ptxas.log" || { cat "$o.ptxas.log" >&2; echo "FAILED: sm_$arch $f" >&2; return 1; }
    NVDISASM_PATH=$(dirname "$dump") PATH="$(dirname "$dump"):$PATH" "$dump" -sass "$o.o" >"$o.sass" || { echo "FAILED: cuobjdump sm_$arch $f" >&2; return 1; }
}
export -f compile_one
export OUTDIR SRC
printf '%s\n' "${jobs[@]}" | xargs -P "$MAX_JOBS" -L 1 bash -c 'compile_one "$@"' _ \
    || die "compilation failed (see above)"
echo "check_sass.sh: compiled ${#jobs[@]} units in $(( $(date +%s) - T0 )) s (MAX_JOBS=$MAX_JOBS)"

# ------------------------------------------------------------------------------ table and checks
python3 - "$OUTDIR/obj" "$ROOT/csrc/spill_budget.txt" <<'EOF' | tee "$OUTDIR/table.txt"
import fnmatch, glob, os, re, subprocess, sys
obj, budget_file = sys.argv[1:]

# budget: "glob bytes" lines (the first glob matching the kernel's short name counts)
budget = []
for line in open(budget_file):
    line = line.split("#", 1)[0].split()
    if line:
        budget.append((line[0], int(line[1])))

def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))

def short(full):  # "void asvit::va::varlen_fwd_kernel<__half, 64, true>(asvit::VarlenAttnParams)"
    full = re.sub(r"^void ", "", full.split("(")[0])
    return full.split("::")[-1] if "<" not in full else re.sub(r"^.*::(\w+<)", r"\1", full)

rows, problems = [], []
for arch_dir in sorted(glob.glob(os.path.join(obj, "sm_*"))):
    arch = os.path.basename(arch_dir)
    for log in sorted(glob.glob(os.path.join(arch_dir, "*.ptxas.log"))):
        info, cur = {}, None
        for line in open(log):
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                cur = m.group(1); info[cur] = dict(regs=0, st=0, ld=0, stack=0, smem=0, hmma=0)
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and cur:
                info[cur].update(stack=int(m.group(1)), st=int(m.group(2)), ld=int(m.group(3)))
            m = re.search(r"Used (\d+) registers", line)
            if m and cur:
                info[cur]["regs"] = int(m.group(1))
                sm = re.search(r"(\d+) bytes smem", line)
                info[cur]["smem"] = int(sm.group(1)) if sm else 0
        cur = None
        for line in open(log.replace(".ptxas.log", ".sass")):
            m = re.match(r"\s*Function : (\w+)", line)
            if m:
                cur = m.group(1)
            elif cur in info and re.search(r"\bHMMA\b", line):
                info[cur]["hmma"] += 1
        names = demangle(list(info))
        for mangled, v in info.items():
            rows.append((arch, short(names[mangled]), v))

def expect_hmma(arch, name):
    """True: must have HMMA, False: must have none (an FMA path), None: not checked."""
    m = re.match(r"(varlen_fwd_kernel|varlen_bwd_dq_kernel|varlen_bwd_dkdv_kernel|psg_partial_kernel)"
                 r"<(float|__half|__nv_bfloat16)(?:, (\d+))?, (true|false)>", name)
    if not m:  # delta, reduction and LayerNorm kernels: no tile products
        return None
    kernel, dtype, kd, tc = m.groups()
    sm80 = int(arch[3:]) >= 80
    if tc == "false":
        return False
    if dtype == "__half":
        return True
    if dtype == "__nv_bfloat16":
        return sm80
    # fp32 with tf32: the backward at head dim 256 has 8-row tiles (FMA)
    return sm80 and not (kernel != "varlen_fwd_kernel" and kd == "256")

print(f"{'arch':6} {'kernel':52} {'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>5} {'smem':>6} {'HMMA':>5}")
for arch, name, v in sorted(rows, key=lambda r: (r[1], r[0])):
    print(f"{arch:6} {name:52} {v['regs']:4} {v['st']:8} {v['ld']:8} {v['stack']:5} {v['smem']:6} {v['hmma']:5}")
    allow = next((b for pat, b in budget if fnmatch.fnmatchcase(name, pat)), 0)
    if v["st"] + v["ld"] > allow:
        problems.append(f"{arch} {name}: spills {v['st']} + {v['ld']} bytes > budget {allow}")
    want = expect_hmma(arch, name)
    if want is True and v["hmma"] == 0:
        problems.append(f"{arch} {name}: no HMMA instruction (tensor-core path expected)")
    if want is False and v["hmma"] > 0:
        problems.append(f"{arch} {name}: {v['hmma']} HMMA instructions in an FMA-labelled path")
checked = sum(expect_hmma(a, n) is not None for a, n, _ in rows)
print(f"{len(rows)} kernels, {checked} with an HMMA expectation")
if not rows:
    problems.append("no kernel found in the ptxas logs")
for p in problems:
    print("FAIL:", p)
sys.exit(1 if problems else 0)
EOF
echo "check_sass.sh: done in $(( $(date +%s) - T0 )) s"
