"""The CPU trainer's fast path: the float32 operations of gpumlp/reference.py, each one the same
rounded operation in the same order (so the results are equal bit for bit,
tests/test_cpu_fast.py), but written into buffers that live as long as the trainer instead of
fresh temporaries, and the weight update done in one pass over W.

Why it matters: at batch 1, sgd_update_ref makes four full-size temporaries per layer per sample
(np.outer, / batch, .astype, lr * grad), each a fresh allocation of up to 20 MB that the kernel
maps and faults in page by page. Here the update walks W in blocks of rows small enough that the
block's step stays in the L2 cache: step = lr * (delta x) for those rows, then W - step (or the
momentum form), i.e. exactly the per-weight operations of sgd_update_ref and of the kernel
backward_update_partial (cuda_kernels/mlp_online.cu).
"""
from __future__ import annotations

import numpy as np

from gpumlp.reference import F32, TANH_A, TANH_B

# Floats of W per block of rows: 64 KiB, so a block's step, its rows of W (and of the velocity)
# stay in L2 while they are combined, and the per-block Python overhead stays small.
BLOCK_FLOATS = 16384
# The constants of scaled_tanh_derivative_from_output, computed exactly as the reference does.
DERIVATIVE_SCALE = TANH_B / TANH_A
TANH_A_SQUARED = TANH_A * TANH_A


class Buffers:
    """Float32 arrays reused from step to step, one per (name, shape)."""

    def __init__(self):
        self._arrays: dict[tuple, np.ndarray] = {}

    def get(self, name: str, shape: tuple) -> np.ndarray:
        key = (name, *shape)
        array = self._arrays.get(key)
        if array is None:
            array = self._arrays[key] = np.empty(shape, dtype=F32)
        return array


def block_rows(n_in: int) -> int:
    """Rows of a (., n_in) matrix per block of the update."""
    return max(1, BLOCK_FLOATS // n_in)


def layer_forward(W, b, x, activate: bool, out: np.ndarray) -> np.ndarray:
    """reference.layer_forward_ref into `out`: W (n_out, n_in), b (n_out,), x (B, n_in),
    out (B, n_out)."""
    np.matmul(x, W.T, out=out)
    out += b
    if activate:                       # A tanh(B a), as scaled_tanh
        out *= TANH_B
        np.tanh(out, out=out)
        out *= TANH_A
    return out


def backprop_delta(W, delta_out, y_in, out: np.ndarray, derivative: np.ndarray) -> np.ndarray:
    """reference.backprop_delta_ref into `out`: W (n_out, n_in), delta_out (B, n_out), y_in and
    out and the scratch `derivative` (B, n_in)."""
    np.multiply(y_in, y_in, out=derivative)            # f'(y) = (B / A) (A^2 - y^2)
    np.subtract(TANH_A_SQUARED, derivative, out=derivative)
    derivative *= DERIVATIVE_SCALE
    np.matmul(delta_out, W, out=out)
    out *= derivative
    return out


def sgd_update(W, b, delta_out, x, lr, momentum, velocity_W, velocity_b, buffers: Buffers) -> None:
    """reference.sgd_update_ref, in place, bit for bit: W (n_out, n_in), b (n_out,),
    delta_out (B, n_out), x (B, n_in); velocities as there (used only when momentum != 0).

    B = 1: step = lr * (delta x) block by block (no full-size array at all). B > 1: the product
    delta^T x is the reference's own matrix product (the BLAS call, hence its bits, unchanged),
    written into a reused buffer, then divided, scaled and applied block by block."""
    n_out, n_in = W.shape
    batch = delta_out.shape[0]
    lr = F32(lr)
    mu = F32(momentum)
    rows = block_rows(n_in)
    if batch > 1:
        product = np.matmul(delta_out.T, x, out=buffers.get("product", (n_out, n_in)))
    else:
        scratch = buffers.get("step", (min(rows, n_out), n_in))
    for start in range(0, n_out, rows):
        block = slice(start, start + rows)
        if batch > 1:
            step = product[block]
            step /= F32(batch)                        # grad = product / B
        else:
            step = np.multiply(delta_out[0, block, None], x, out=scratch[:len(W[block])])
        step *= lr                                    # lr * grad
        if momentum:
            v = velocity_W[block]
            v *= mu
            v -= step
            W[block] += v
        else:
            W[block] -= step
    step_b = np.sum(delta_out, axis=0, out=buffers.get("step_b", (n_out,)))
    step_b /= F32(batch)
    step_b *= lr
    if momentum:
        velocity_b *= mu
        velocity_b -= step_b
        b += velocity_b
    else:
        b -= step_b
