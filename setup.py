"""Build script for asvit-kernels: the pure-Python package plus, when nvcc is available, the
torch-free CUDA extension ``asvit_kernels._C`` built from csrc/ with CMake + Ninja + pybind11.

Environment:
  ASVIT_BUILD_CUDA   auto (default; also when empty): build _C when nvcc is found
                     (CUDA_HOME/bin/nvcc, CUDA_PATH/bin/nvcc, else nvcc on PATH), otherwise
                     install pure Python.  1: nvcc is required (missing -> error).  0: skip.
  ASVIT_CUDA_ARCHS   "80;90" or "80,90" ("8.0" and "sm_80" also accepted). Default
                     75;80;86;89;90 with CUDA >= 13, 70;75;80;86;90 with older toolkits.
                     SASS is built for every arch, PTX for the highest.
  MAX_JOBS           parallel ninja jobs (default: number of CPUs).
  ASVIT_LOCAL_VERSION  the wheel's PEP 440 local version label. Default: "cu13" / "cu12" (the
                     toolkit's major) when _C is built, none for a pure-Python build, so the two
                     CUDA wheels are 0.1.0+cu13 and 0.1.0+cu12 of one distribution (the PyTorch
                     convention; see the README's install section). Set it empty for no label.

Wheel kinds: when _C is not built, the extension list is empty and the wheel is a pure
``py3-none-any`` wheel (it really is pure Python then); with _C it is a platform wheel.

The decision (build or not, and why) is written to ``asvit_kernels/_build_config.py`` in the
build output, and for editable installs into the source tree, so ``asvit_kernels._ext`` can
report why the extension is missing.  Editable installs (``pip install -e .``) build _C into
build/ and copy it next to the sources as ``asvit_kernels/_C.<abi>.so`` (gitignored); its CMake
build directory is build/cmake-editable, reused by the next editable build (incremental).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = "asvit_kernels"
EXT_NAME = f"{PACKAGE}._C"
CONFIG_FILE = "_build_config.py"

DEFAULT_ARCHS_CUDA13 = ["75", "80", "86", "89", "90"]  # CUDA 13 dropped sm_70/72
DEFAULT_ARCHS_CUDA12 = ["70", "75", "80", "86", "90"]


class BuildConfigError(RuntimeError):
    """A build setting is invalid; the message says which and how to fix it."""


# ------------------------------------------------------------------------------------------------
# What to build: decided once from the environment, before setup() runs.
# ------------------------------------------------------------------------------------------------
@dataclass
class CudaPlan:
    build: bool
    reason: str
    nvcc: Optional[str] = None
    version: Optional[str] = None  # "13.0"
    archs: List[str] = field(default_factory=list)


def find_nvcc() -> Optional[str]:
    exe = "nvcc.exe" if os.name == "nt" else "nvcc"
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            cand = Path(home) / "bin" / exe
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return shutil.which(exe)


def nvcc_version(nvcc: str) -> str:
    """'13.0' from `nvcc --version` (raises BuildConfigError when it cannot be read)."""
    try:
        out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildConfigError(f"`{nvcc} --version` failed: {exc}") from exc
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise BuildConfigError(f"cannot find the CUDA release in `{nvcc} --version`:\n{out}")
    return f"{m.group(1)}.{m.group(2)}"


def nvcc_supported_archs(nvcc: str) -> Optional[set]:
    """{'75', '80', ...} from `nvcc --list-gpu-code`, or None when nvcc cannot tell."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], check=True, capture_output=True,
                             text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = set(re.findall(r"sm_(\d+[a-z]?)", out))
    return archs or None


def parse_archs(value: str) -> List[str]:
    archs: List[str] = []
    for item in re.split(r"[;,\s]+", value.strip()):
        if not item:
            continue
        a = item.lower()
        a = a[3:] if a.startswith("sm_") else a
        a = a.replace(".", "")  # "8.0" -> "80", as in TORCH_CUDA_ARCH_LIST
        if not re.fullmatch(r"\d+[a-z]?", a):
            raise BuildConfigError(
                f"ASVIT_CUDA_ARCHS: {item!r} is not a GPU architecture; expected a list such as "
                f"'80;90' or '80,90'")
        if a not in archs:
            archs.append(a)
    if not archs:
        raise BuildConfigError("ASVIT_CUDA_ARCHS is set but empty; expected e.g. '80;90'")
    return sorted(archs, key=lambda a: (int(re.match(r"\d+", a).group()), a))


def plan_cuda_build() -> CudaPlan:
    mode = os.environ.get("ASVIT_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise BuildConfigError(
            f"ASVIT_BUILD_CUDA={os.environ['ASVIT_BUILD_CUDA']!r} is not valid: use auto (build "
            f"the CUDA extension when nvcc is found), 1 (require it) or 0 (skip it)")
    if mode == "0":
        return CudaPlan(False, "ASVIT_BUILD_CUDA=0: installed without the CUDA extension")

    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise BuildConfigError(
                "ASVIT_BUILD_CUDA=1 but nvcc was not found (looked in $CUDA_HOME/bin, "
                "$CUDA_PATH/bin and on PATH). Install the CUDA toolkit and set CUDA_HOME, or use "
                "ASVIT_BUILD_CUDA=auto/0 to install without the CUDA extension.")
        return CudaPlan(False, "nvcc not found (ASVIT_BUILD_CUDA=auto): installed without the "
                               "CUDA extension")

    try:
        version = nvcc_version(nvcc)
    except BuildConfigError as exc:
        if mode == "1":
            raise
        return CudaPlan(False, f"nvcc at {nvcc} is unusable (ASVIT_BUILD_CUDA=auto): {exc}; "
                               f"installed without the CUDA extension")

    env_archs = os.environ.get("ASVIT_CUDA_ARCHS")
    if env_archs is not None:
        archs = parse_archs(env_archs)
        supported = nvcc_supported_archs(nvcc)
        if supported is not None:
            # compare the numbers: "90a" is built by an nvcc that lists sm_90
            numbers = {re.match(r"\d+", a).group() for a in supported}
            bad = [a for a in archs if re.match(r"\d+", a).group() not in numbers]
            if bad:
                raise BuildConfigError(
                    f"ASVIT_CUDA_ARCHS: nvcc {version} cannot build {', '.join(bad)}; it supports "
                    f"{', '.join(sorted(supported, key=lambda a: (int(re.match(r'[0-9]+', a).group()), a)))}")
    else:
        archs = DEFAULT_ARCHS_CUDA13 if int(version.split(".")[0]) >= 13 else DEFAULT_ARCHS_CUDA12
    how = f"ASVIT_BUILD_CUDA={mode}"
    return CudaPlan(True, f"built with nvcc {version} ({nvcc}) for sm_{', sm_'.join(archs)} "
                          f"({how})", nvcc, version, list(archs))


def build_config_text(plan: CudaPlan) -> str:
    return (
        '"""Generated by setup.py at build time (not tracked by git): how asvit_kernels._C was '
        'built."""\n'
        f"CUDA_EXTENSION_BUILT = {plan.build!r}\n"
        f"CUDA_ARCHS = {plan.archs!r}\n"
        f"CUDA_VERSION = {plan.version!r}\n"
        f"BUILD_REASON = {plan.reason!r}\n"
    )


def write_build_config(package_dir: Path, plan: CudaPlan) -> None:
    package_dir.mkdir(parents=True, exist_ok=True)
    target = package_dir / CONFIG_FILE
    text = build_config_text(plan)
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


def local_version_label(plan: CudaPlan) -> str:
    """'cu13' for a build with nvcc 13.x, '' for pure Python; ASVIT_LOCAL_VERSION overrides."""
    value = os.environ.get("ASVIT_LOCAL_VERSION")
    if value is None:
        return f"cu{plan.version.split('.')[0]}" if plan.build else ""
    value = value.strip().lstrip("+")
    if value and not re.fullmatch(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*", value):
        raise BuildConfigError(f"ASVIT_LOCAL_VERSION={value!r} is not a PEP 440 local version label "
                               f"(letters and digits separated by '.', e.g. 'cu12')")
    return value


def package_version(plan: CudaPlan) -> str:
    """asvit_kernels/_version.py's __version__ (read, not imported) plus the local label."""
    text = (ROOT / PACKAGE / "_version.py").read_text()
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    if not m:
        raise BuildConfigError(f"no __version__ = '...' line in {PACKAGE}/_version.py")
    label = local_version_label(plan)
    return m.group(1) + (f"+{label}" if label else "")


def max_jobs() -> int:
    value = os.environ.get("MAX_JOBS", "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise BuildConfigError(f"MAX_JOBS={value!r} must be a positive integer")
    return int(value)


PLAN = plan_cuda_build()


# ------------------------------------------------------------------------------------------------
# setuptools commands
# ------------------------------------------------------------------------------------------------
class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt at the repository root, not by setuptools."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _tool(module: str, attr: str, name: str) -> str:
    """The cmake/ninja executable from its PyPI package (build requirement), else from PATH."""
    try:
        mod = __import__(module)
        cand = Path(getattr(mod, attr)) / name
        if cand.is_file():
            return str(cand)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if found is None:
        raise BuildConfigError(f"{name} was not found: `pip install {name}` (a build requirement)")
    return found


def _remove_stale_extensions(package_dir: Path) -> None:
    """Delete a _C module left by an earlier build (a gitignored output of this script): it would
    be imported, or packed into the wheel, although this build skipped CUDA."""
    for stale in package_dir.glob("_C.*"):
        if stale.suffix in (".so", ".pyd"):
            print(f"removing stale {stale} (CUDA extension not built)", flush=True)
            stale.unlink()


class BuildPy(build_py):
    """Also writes _build_config.py (into build_lib, or into the sources for editable installs)."""

    def run(self):
        super().run()
        if self.editable_mode:
            write_build_config(ROOT / PACKAGE, PLAN)
            if not PLAN.build:
                _remove_stale_extensions(ROOT / PACKAGE)
        else:
            write_build_config(Path(self.build_lib) / PACKAGE, PLAN)
            if not PLAN.build:
                _remove_stale_extensions(Path(self.build_lib) / PACKAGE)


class CMakeBuild(build_ext):
    def run(self):
        super().run()
        # `python setup.py build_ext --inplace` (no build_py): keep the sources' config in sync.
        if self.inplace and not self.editable_mode:
            write_build_config(ROOT / PACKAGE, PLAN)

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # build requirement; imported here so metadata steps do not need it

        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        jobs = max_jobs()

        # Editable builds get a stable build directory under build/ so rebuilds are incremental;
        # otherwise setuptools' build_temp. A stamp of the toolchain wipes a stale CMake cache
        # (e.g. the previous isolated build environment is gone).
        if self.editable_mode:
            build_dir = ROOT / "build" / "cmake-editable"
        else:
            build_dir = Path(self.build_temp).resolve() / "cmake"
        stamp_key = "\n".join([sys.executable, cmake, ninja, PLAN.nvcc or "", PLAN.version or "",
                               pybind11.get_cmake_dir(), str(ROOT)])
        stamp = hashlib.sha256(stamp_key.encode()).hexdigest()
        stamp_file = build_dir / "asvit-toolchain.stamp"
        if build_dir.exists() and (not stamp_file.exists() or stamp_file.read_text() != stamp):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(stamp)
        staging = build_dir / "out"
        if staging.exists():
            shutil.rmtree(staging)

        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={PLAN.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DASVIT_CUDA_ARCHS={';'.join(PLAN.archs)}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={staging}",
        ]
        build = [cmake, "--build", str(build_dir), "--config", "Release", "-j", str(jobs)]
        print(f"asvit_kernels: {PLAN.reason}; {jobs} parallel job(s)", flush=True)
        self._run(configure)
        self._run(build)

        built = sorted(p for p in staging.glob("_C*") if p.suffix in (".so", ".pyd"))
        if len(built) != 1:
            raise RuntimeError(f"expected one _C module in {staging}, found {built}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)
        shutil.copymode(built[0], target)

    @staticmethod
    def _run(cmd):
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


packages = sorted(set(find_packages(include=[PACKAGE, f"{PACKAGE}.*"])) | {PACKAGE})
package_dir = {}
if (ROOT / "models").is_dir():
    # asvit_kernels.models lives in the top-level models/ directory (subpackages follow the mapping).
    packages.append(f"{PACKAGE}.models")
    packages += [f"{PACKAGE}.models.{sub}" for sub in find_packages(where=str(ROOT / "models"))]
    package_dir[f"{PACKAGE}.models"] = "models"

setup(
    version=package_version(PLAN),
    packages=packages,
    package_dir=package_dir,
    ext_modules=[CMakeExtension(EXT_NAME)] if PLAN.build else [],
    cmdclass={"build_py": BuildPy, "build_ext": CMakeBuild},
    zip_safe=False,
)
