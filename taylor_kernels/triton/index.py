"""64-bit offset arithmetic shared by the Triton kernels.

Triton types an integer kernel argument or loop counter as int32 whenever its value fits, and an
int32 product wraps once it passes ``2**31``: ``k * N`` for coefficient ``k`` of a ``[J+1, N]``
jet wraps at ``N > 2**31 / J`` although every operand fits. Every offset product in the kernels
goes through :func:`off`, which widens the first factor to int64 before multiplying; sums of
int64 offsets and int32 values are int64. ``tests/ops/test_index_arithmetic.py`` evaluates these
helpers past ``2**31`` under ``TRITON_INTERPRET=1`` (int32 wraps there as on a GPU).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def off(i, stride):
    """``i * stride`` as int64 (``i``, ``stride``: int scalars, constants or blocks)."""
    return tl.cast(i, tl.int64) * stride


@triton.jit
def row_block(pid, BLOCK: tl.constexpr):
    """int64 element numbers ``pid*BLOCK + [0, BLOCK)`` of program ``pid``'s block."""
    return off(pid, BLOCK) + tl.arange(0, BLOCK)


@triton.jit
def split_bounds(lo, hi, j, splits):
    """Points ``[lo + L*j // splits, lo + L*(j+1) // splits)`` of split ``j`` of ``[lo, hi)``,
    ``L = hi - lo`` (int64: ``L * (j+1)`` passes 2**31 for long rows)."""
    length = tl.cast(hi - lo, tl.int64)
    return lo + length * j // splits, lo + length * (j + 1) // splits


@triton.jit
def grid_cell(D, BLOCK: tl.constexpr):
    """``(row, d)`` of this program in a 1-d grid of ``rows * cdiv(D, BLOCK)`` programs (rows
    major, so neighbouring programs share a row): a 1-d grid has no 65535 limit per axis."""
    pid = tl.program_id(0).to(tl.int64)
    nd = tl.cdiv(D, BLOCK)
    return pid // nd, row_block(pid % nd, BLOCK)
