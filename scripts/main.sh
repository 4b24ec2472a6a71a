#!/usr/bin/env bash
# Set up a fresh virtual environment and run the main job available today: the elastic-channel
# benchmark (sub-network forward+backward vs dense and copy-slicing) on synthetic ViT activations.
# The search -> scale -> train pipeline on bundled data replaces this as it lands.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e .
python bench/elastic.py "$@"
