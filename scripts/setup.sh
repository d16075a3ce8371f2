#!/usr/bin/env bash
# Installs what building Trellis needs and links it into the checkout, once per machine.
#
# libtorch comes from the torch==2.11.0 wheel on PyPI (tch 0.24 targets libtorch 2.11). The wheel
# is ~4.7 GB with its CUDA dependencies, so it lives in a cache outside the repository
# ($TRELLIS_CACHE, default ~/.cache/trellis) and is reused by every checkout on the machine.
# The checkout gets a `.libtorch` link to it, which `.cargo/config.toml` hands to torch-sys, and
# a `.torch-python` link to the venv's interpreter for the PyTorch side of the benchmarks.
set -euo pipefail

TORCH_VERSION=2.11.0
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${TRELLIS_CACHE:-$HOME/.cache/trellis}
venv=$cache/torch-$TORCH_VERSION
python=$venv/bin/python

have_torch() {
    [ -x "$python" ] && "$python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null
}

if ! have_torch; then
    echo "setup: installing torch==$TORCH_VERSION into $venv (one time, ~5 GB, a few minutes)" >&2
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
    have_torch || { echo "setup: torch $TORCH_VERSION did not import after installing" >&2; exit 1; }
fi

torch_dir=$("$python" -c "import os, torch; print(os.path.dirname(torch.__file__))")
ln -sfn "$torch_dir" "$repo/.libtorch"
ln -sfn "$python" "$repo/.torch-python"
echo "setup: libtorch $("$python" -c 'import torch; print(torch.__version__)') at $torch_dir" >&2
