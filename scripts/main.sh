#!/usr/bin/env bash
# Set up a fresh virtual environment and run the main job: the asvit pipeline (As-ViT topology
# search -> scaling -> training with progressive re-tokenization) on the bundled digits data with
# the quick preset. Writes runs/quick/report.md (+ plots). Extra arguments go to `asvit pipeline`
# (e.g. --data DIR --out runs/cifar, or --preset paper on GPUs). Rerunning resumes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e .
asvit pipeline --out runs/quick "$@"
