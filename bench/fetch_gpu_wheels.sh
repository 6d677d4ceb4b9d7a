#!/usr/bin/env bash
# Fill bench/wheels/ (git-ignored) with the wheels bench/gpu_check.sh installs offline on a GPU
# machine that lacks them: Captum and path_explain (absent from the GPU image), transformers and
# its direct dependencies (the image has a transformers; gpu_check installs a wheel only when
# its module cannot be imported there). Run on a machine with PyPI access, then pass
# bench/wheels in the device tool's `carry` list (64 MiB limit for the whole tree: the size is
# printed at the end). Target: CPython 3.12, manylinux x86-64.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
mkdir -p wheels
# (captum.attr imports matplotlib and tqdm: their wheels too, installed only where missing)
pkgs=(captum path-explain transformers huggingface-hub tokenizers safetensors regex pyyaml
      tqdm matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d wheels "${pkgs[@]}"
ls -l wheels
echo "fetch_gpu_wheels: $(du -sh wheels | cut -f1) in bench/wheels ($(ls wheels | wc -l) wheels)"
