#!/usr/bin/env bash
# Installs what building Trellis needs and links it into the checkout, once per machine.
#
# libtorch comes from the torch==2.11.0 wheel on PyPI (tch 0.24 targets libtorch 2.11). The wheel
# is ~4.7 GB with its CUDA dependencies, so it lives in a cache outside the repository
# ($TRELLIS_CACHE, default ~/.cache/trellis) and is reused by every checkout on the machine.
# The checkout gets a `.libtorch` link to it, which `.cargo/config.toml` hands to torch-sys, and
# a `.torch-python` link to the venv's interpreter for the PyTorch side of the benchmarks.
#
# trellis-dist (dist/) compiles against c10d's ProcessGroupGloo.hpp, which includes Gloo's own
# headers; the wheel exports Gloo's symbols but ships no Gloo headers. Debian's libgloo-dev has
# them: its .deb is unpacked into the same cache (nothing is installed system-wide) and linked into
# the checkout as `.gloo-include`. Its NCCL path includes the CUDA runtime's headers, which need
# crt/ and CCCL's nv/target that the wheel's nvidia packages lack: cuda-toolkit's `crt` and `cccl`
# extras, at the version torch pins, go into the cache too, linked as `.cuda-include`. Without
# apt this step only warns (the rest of Trellis builds); without the CUDA headers, dist builds
# with Gloo alone.
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

# Only Gloo's headers are used, and only for types that ProcessGroupGloo.hpp names behind pointers
# (Device, Context, Store): every Gloo function that runs is the wheel's own copy in libtorch_cpu.
# A Debian package unpacked into the cache (nothing installed system-wide): unpack_deb PACKAGE DIR.
unpack_deb() {
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 0
    echo "setup: unpacking $1 into $2 (one time)" >&2
    mkdir -p "$cache"
    local tmp deb
    tmp=$(mktemp -d "$cache/$1-download.XXXXXX")
    # apt-get download writes into the working directory; a fresh machine may have no package
    # lists yet, so they are fetched once if the first try fails.
    if ! (cd "$tmp" && apt-get download -q "$1" >/dev/null 2>&1); then
        apt-get update -q >/dev/null 2>&1 || true
        (cd "$tmp" && apt-get download -q "$1" >/dev/null 2>&1) || true
    fi
    deb=$(ls "$tmp/$1"_*.deb 2>/dev/null | head -n 1 || true)
    if [ -n "$deb" ]; then
        dpkg-deb -x "$deb" "$tmp/root"
        dpkg-deb -f "$deb" Version >"$tmp/root/VERSION"
        rm -rf "$2"
        mv "$tmp/root" "$2"
    fi
    rm -rf "$tmp"
}

gloo=$cache/gloo-headers
have_gloo() { [ -f "$gloo/usr/include/gloo/rendezvous/store.h" ]; }
if ! have_gloo; then
    unpack_deb libgloo-dev "$gloo"
    have_gloo || echo "setup: warning: could not get libgloo-dev's headers (apt-get download libgloo-dev); trellis-dist will not build" >&2
fi
if have_gloo; then
    ln -sfn "$gloo/usr/include" "$repo/.gloo-include"
    echo "setup: Gloo headers from libgloo-dev $(cat "$gloo/VERSION" 2>/dev/null || echo '(unknown version)') at $gloo" >&2
fi

# The speed benchmark gives its "PyTorch tuned" side the allocator Trellis links in (jemalloc,
# configured as `.cargo/config.toml` configures Trellis's), preloaded from Debian's libjemalloc2.
jemalloc=$cache/jemalloc
find_jemalloc() { find "$jemalloc" -name 'libjemalloc.so.2' 2>/dev/null | head -n 1; }
if [ -z "$(find_jemalloc)" ]; then
    unpack_deb libjemalloc2 "$jemalloc"
fi
if [ -n "$(find_jemalloc)" ]; then
    ln -sfn "$(find_jemalloc)" "$repo/.libjemalloc.so"
    echo "setup: jemalloc $(cat "$jemalloc/VERSION" 2>/dev/null || echo '(unknown version)') for the benchmark's PyTorch side at $(find_jemalloc)" >&2
else
    echo "setup: warning: could not get libjemalloc2 (apt-get download libjemalloc2); the speed benchmark's tuned PyTorch side will not start" >&2
fi

# CUDA builds of torch 2.11 pin their toolkit through the cuda-toolkit metapackage; its crt and
# cccl extras are headers only (~20 MB), installed beside the venv rather than into it.
if [ -f "$torch_dir/lib/libtorch_cuda.so" ]; then
    toolkit=$("$python" -c "import importlib.metadata as m; print(m.version('cuda-toolkit'))" 2>/dev/null || true)
    if [ -n "$toolkit" ]; then
        cuda_headers=$cache/cuda-headers-$toolkit
        have_cuda_headers() { compgen -G "$cuda_headers/nvidia/*/include/nv/target" >/dev/null; }
        if ! have_cuda_headers; then
            echo "setup: installing cuda-toolkit[crt,cccl]==$toolkit's headers into $cuda_headers (one time)" >&2
            mkdir -p "$cache"
            tmp=$(mktemp -d "$cache/cuda-headers-download.XXXXXX")
            if "$python" -m pip install --quiet --disable-pip-version-check --target "$tmp" \
                "cuda-toolkit[crt,cccl]==$toolkit" >/dev/null; then
                rm -rf "$cuda_headers"
                mv "$tmp" "$cuda_headers"
            else
                rm -rf "$tmp"
            fi
        fi
        if have_cuda_headers; then
            ln -sfn "$cuda_headers/nvidia" "$repo/.cuda-include"
        else
            echo "setup: warning: could not install cuda-toolkit[crt,cccl]==$toolkit; trellis-dist builds without NCCL" >&2
        fi
    fi
fi
