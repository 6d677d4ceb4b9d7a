"""The CUDA ih_accumulate kernel's point loop (``csrc/cuda/ih_point_sum.h``), compiled as plain
C++ on the CPU and compared with the float64 reference on chunks that start and end inside an
input's points and cross baselines (shared and per-input baselines, per-point weights).

The CUDA kernel calls this same function once per output element; on a GPU the op itself is
compared with the reference (tests/ops/test_hessian_ops.py)."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from taylor_kernels.reference import hessian as ref
from tests.conftest import assert_close_ratio

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
HARNESS = r"""
#include <cstdio>
#include <vector>
#include "ih_point_sum.h"
// stdin: B K S R D Bb count start per_point n_w, then h, x, bl, w (doubles), idx (int64);
// stdout: out [B, R, D] (doubles), every b (untouched ones are 0)
int main() {
  int64_t B, K, S, R, D, Bb, count, start, per_point, n_w;
  if (std::fread(&B, 8, 1, stdin) != 1) return 1;
  std::fread(&K, 8, 1, stdin); std::fread(&S, 8, 1, stdin); std::fread(&R, 8, 1, stdin);
  std::fread(&D, 8, 1, stdin); std::fread(&Bb, 8, 1, stdin); std::fread(&count, 8, 1, stdin);
  std::fread(&start, 8, 1, stdin); std::fread(&per_point, 8, 1, stdin);
  std::fread(&n_w, 8, 1, stdin);
  std::vector<double> h(count * R * D), x(B * D), bl(Bb * K * D), w(n_w), out(B * R * D);
  std::vector<int64_t> idx(R);
  std::fread(h.data(), 8, h.size(), stdin); std::fread(x.data(), 8, x.size(), stdin);
  std::fread(bl.data(), 8, bl.size(), stdin); std::fread(w.data(), 8, w.size(), stdin);
  std::fread(idx.data(), 8, idx.size(), stdin);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < D; ++j)
        out[(b * R + r) * D + j] = taylor_kernels::ih_point_sum(
            h.data(), x.data(), bl.data(), w.data(), start, count, R, D, K, S, Bb == 1,
            per_point != 0, b, r, idx[r], j);
  std::fwrite(out.data(), 8, out.size(), stdout);
  return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("ih_point_sum")
    src, exe = folder / "harness.cpp", folder / "harness"
    src.write_text(HARNESS)
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc" / "cuda"), str(src), "-o",
                    str(exe)], check=True, capture_output=True, text=True)
    return exe


def run_harness(exe, h, x, bl, w, idx, start):
    count, R, D = h.shape
    B, K, S = x.shape[0], bl.shape[1], w.shape[-1]
    per_point = w.dim() == 3
    w_chunk = w.reshape(-1)[start:start + count] if per_point else w
    head = torch.tensor([B, K, S, R, D, bl.shape[0], count, start, int(per_point),
                         w_chunk.numel()], dtype=torch.int64)
    payload = b"".join(t.contiguous().numpy().tobytes() for t in
                       (head, h, x, bl, w_chunk, idx))
    done = subprocess.run([str(exe)], input=payload, capture_output=True, check=True)
    return torch.frombuffer(bytearray(done.stdout), dtype=torch.float64).reshape(B, R, D)


SHAPES = [  # B, K, S, R, D, shared baselines, per-point weights
    (3, 2, 5, 4, 7, False, False), (2, 3, 4, 3, 5, True, False), (4, 1, 6, 2, 9, False, True),
    (2, 4, 3, 5, 6, True, True), (1, 1, 1, 1, 1, False, False)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_point_loop_matches_the_reference(harness, shape):
    B, K, S, R, D, shared, per_point = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(B, D, dtype=torch.float64, generator=g)
    bl = torch.randn(1 if shared else B, K, D, dtype=torch.float64, generator=g)
    w = torch.rand((B, K, S) if per_point else (S,), dtype=torch.float64, generator=g)
    idx = torch.randperm(D, generator=g)[:R] if R <= D else torch.randint(D, (R,), generator=g)
    total = B * K * S
    # whole; from inside one input to inside another; one point; the last points
    for start, count in [(0, total), (S // 2 + 1, total - S - 1), (total // 2, 1),
                         (max(0, total - K * S - 1), min(total, K * S + 1))]:
        if count < 1 or start + count > total:
            continue
        h = torch.randn(count, R, D, dtype=torch.float64, generator=g)
        got = run_harness(harness, h, x, bl, w, idx, start)
        assert_close_ratio(got, ref.ih_accumulate(h, x, bl, w, idx, start), torch.float64)
