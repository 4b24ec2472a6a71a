#!/usr/bin/env bash
# Set up a fresh virtual environment and run the test suite (the README's test command).
# Without a GPU, Triton kernels run on the CPU through TRITON_INTERPRET=1 (tests/conftest.py sets it);
# with nvcc present, `pip install` builds the CUDA extension for ASVIT_CUDA_ARCHS.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0          # CPU build; a bare `torch` would pull several GB of CUDA wheels
pip install -q -e ".[test]"
python -c "import asvit_kernels, json; print(json.dumps(asvit_kernels.build_info(), indent=1))"
pytest -q "$@"
