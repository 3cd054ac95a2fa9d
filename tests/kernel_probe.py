"""A tiny kernel that exposes celib's row-offset arithmetic to a test (imported after celib picks Triton's mode)."""

import triton
import triton.language as tl

from celib.kernels.kernel import row_offset


@triton.jit
def offset_probe(out_ptr, first_row, n_inner, stride_n, stride_s):
    row = tl.program_id(0) + first_row  # a 32-bit value, as Triton passes small integers
    tl.store(out_ptr + tl.program_id(0), row_offset(row, n_inner, stride_n, stride_s))
