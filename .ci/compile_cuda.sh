#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc (sm_80 and sm_90) against the installed torch's
# headers, with the flags of the real build, so the CUDA kernels cannot rot on machines without
# a GPU or a CUDA torch. Nothing is linked or run. Exits non-zero on the first compile error.
#   env: PYTHON (default python), NVCC (default nvcc), TAYLOR_KERNELS_CUDA_ARCHS (default "80;90")
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NVCC=${NVCC:-nvcc}
ARCHS=${TAYLOR_KERNELS_CUDA_ARCHS:-80;90}
command -v "$NVCC" >/dev/null || { echo "compile_cuda: nvcc not found" >&2; exit 2; }
read -r TORCH_DIR ABI < <("$PYTHON" -c \
  "import os, torch; print(os.path.dirname(torch.__file__), int(torch._C._GLIBCXX_USE_CXX11_ABI))")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
includes=(-I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include")
# CPU-only torch wheels ship c10/cuda/*.h but not this header, which CMake generates for CUDA
# builds (its whole content is the macro below); supply it so the real headers compile.
if [[ ! -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$tmp/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
    >"$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"
  includes+=(-I"$tmp/shim")
  echo "compile_cuda: torch is CPU-only; using a generated c10/cuda/impl/cuda_cmake_macros.h"
fi
cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")
[[ -d "$cuda_home/include" ]] && includes+=(-isystem "$cuda_home/include")
gencode=()
for arch in ${ARCHS//;/ }; do gencode+=(-gencode "arch=compute_$arch,code=sm_$arch"); done

# same flags as CMakeLists.txt (C++20: torch >= 2.10 headers need it)
flags=(-std=c++20 -O3 --threads 0 --expt-relaxed-constexpr -Xcompiler -fPIC -DTK_WITH_CUDA
       -D_GLIBCXX_USE_CXX11_ABI="$ABI" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ "${gencode[@]}")
echo "compile_cuda: $("$NVCC" --version | tail -n 1); archs $ARCHS; torch at $TORCH_DIR"
shopt -s nullglob
files=(csrc/cuda/*.cu)
[[ ${#files[@]} -gt 0 ]] || { echo "compile_cuda: no csrc/cuda/*.cu files" >&2; exit 1; }
for f in "${files[@]}"; do
  t0=$SECONDS
  "$NVCC" "${flags[@]}" "${includes[@]}" -c "$f" -o "$tmp/$(basename "$f").o"
  echo "compiled $f ($((SECONDS - t0)) s)"
done
echo "compile_cuda: ${#files[@]} file(s) OK"
