#!/usr/bin/env bash
# Build the GPU kit's wheelhouse, here (where pip reaches a package index):
#
#   bash benchmarks/gpu/wheelhouse.sh [PYTHON_VERSION] [HAVE_FILE]
#
# Downloads into benchmarks/gpu/wheels/ (git-ignored) one wheel per distribution that dsdkit needs besides torch,
# built for CPython PYTHON_VERSION (default 3.12) on x86-64 Linux; HAVE_FILE (pip freeze style) names what the GPU
# machine already has, left out with everything beneath it (benchmarks/gpu/h200-image.txt: this workplace's H200).
# How versions are chosen and what is never carried: benchmarks/gpu/wheelhouse.py. PYTHON picks the interpreter that
# runs pip here (it needs pip and packaging: the project's venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" benchmarks/gpu/wheelhouse.py build --python-version "${1:-3.12}" ${2:+--have "$2"}
