"""How far each kernel may differ from its numpy reference: |actual - ref| <= atol + rtol |ref|.

One table for the kernel tests (tests/test_mlp_kernels.py, tests/test_deform_kernel.py) and the
user-facing self-check (gpumlp.selfcheck), so that both hold the kernels to the same bounds. Why
each value (weights in +-0.05, inputs in +-1):
  * FORWARD (layer_forward_*): the pre-activation is a float32 sum of n_in terms in another order
    than numpy's BLAS, with fmaf (one rounding where numpy may use two); the sums of |terms| stay
    below ~25, so reordering costs a few 1e-6; the scaled tanh adds tanhf against numpy's float32
    tanh (a few ulp) times A B < 1.2.
  * BACKPROP (backprop_delta_gemm, backward_reduce, the partials of backward_update_partial): the
    delta_out W product, a sum of n_out terms in another order.
  * SOFTMAX (softmax_xent delta and loss): expf/logf against numpy's (a few ulp each) and a
    10-term sum in another order.
  * UPDATE (sgd_update_gemm): the gradient is a B-term sum in another order, so W differs by
    lr * (a few ulp of the gradient). The online update (backward_update_partial) is not here:
    it rounds every step as the reference does and is compared bit for bit.
  * STEP, LOSS (whole training steps of a small net): a few ulp of the deltas feed the updates,
    times lr; the loss is a sum of per-sample losses.
  * DEFORM (deform_images pixels): sinf/cosf/tanf against numpy's move the source point by ~1e-5
    pixel; the bilinear surface has a slope of at most 2 per pixel, so ~6e-5 at most. The error is
    in the coordinates, not proportional to the value, hence rtol 0.
Integers (predictions, counts, gathered labels, the cursor), gathered images, random numbers,
deformation parameters and the online weight update compare exactly.

Long sums (the products and their backward and update counterparts at any shape, the paper's
2000 x 2500 layer included) get a bound that grows with the length of the sum instead: a per-element
atol `sum_tolerance` (below) times the largest slope of what follows the sum, plus rtol PAPER_RTOL
(forward_atol, backprop_atol, partial_atol, update_atol compose it per kernel). The fixed
FORWARD/BACKPROP/UPDATE values stay for the small-shape kernel tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpumlp.reference import TANH_A, TANH_B, scaled_tanh_derivative_from_output

FORWARD = dict(atol=2e-5, rtol=1e-5)
BACKPROP = dict(atol=1e-6, rtol=1e-5)
SOFTMAX = dict(atol=1e-6, rtol=1e-5)
UPDATE = dict(atol=1e-7, rtol=1e-6)
STEP = dict(atol=1e-6, rtol=1e-5)
LOSS = dict(atol=1e-5, rtol=1e-5)
DEFORM = dict(atol=1e-4, rtol=0.0)

# The unit roundoff of float32 (half an ulp of 1): one rounding errs by at most U * |result|.
U = 2.0 ** -24
# The rtol that goes with sum_tolerance (named for the paper-shape tests; used at every shape):
# the few roundings after the sum (tanhf against numpy's tanh, f'(y), the update's own steps), a
# few ulp of the result each.
PAPER_RTOL = 8 * U
# The largest slope of the scaled tanh, A B (at 0): how much a forward sum's error can grow.
TANH_SLOPE = float(TANH_A) * float(TANH_B)


def sum_tolerance(abs_terms_sum, n_terms: int, c: float = 2.0) -> np.ndarray:
    """The atol of each element of an n-term float32 sum that the kernel and numpy add in different
    orders: c * sqrt(n) * U * sum|terms|. Each of the n roundings errs by at most U |partial sum|
    <= U sum|terms|; independent errors add like a random walk (sqrt(n), where the worst case is n),
    and there are two implementations. `abs_terms_sum` (any shape) is sum|terms| per element,
    computed in float64 (e.g. |X| @ |W|^T + |b|)."""
    return c * np.sqrt(n_terms) * U * np.asarray(abs_terms_sum, np.float64)


def abs_products(a, b) -> np.ndarray:
    """sum_k |a[i, k] b[k, j]| in float64: the sum|terms| of each element of a @ b."""
    return np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)


# The bounds of the kernels' long sums (gpumlp.selfcheck at every shape; the paper-shape kernel tests
# compose the same).
def forward_atol(W, b, X) -> np.ndarray:
    """act(X W^T + b), W (n_out, n_in), X (B, n_in) or (n_in,): n_in terms, then the scaled tanh
    (slope at most A B)."""
    return TANH_SLOPE * sum_tolerance(abs_products(X, W.T) + np.abs(b), W.shape[1])


def backprop_atol(W, delta_out, y_in) -> np.ndarray:
    """(delta_out W) f'(y_in), W (n_out, n_in), delta_out (B, n_out) or (n_out,): n_out terms, times
    |f'(y_in)|. Also the bound of backward_reduce's delta_in, the same sum in two levels."""
    slope = np.abs(scaled_tanh_derivative_from_output(y_in)).astype(np.float64)
    return slope * sum_tolerance(abs_products(delta_out, W), W.shape[0])


def update_atol(delta_out, X, lr) -> tuple[np.ndarray, np.ndarray]:
    """W's and b's share of the minibatch update: lr times the gradient's B-term sum (divided by B),
    delta_out (B, n_out), X (B, n_in)."""
    batch = delta_out.shape[0]
    return (lr * sum_tolerance(abs_products(delta_out.T, X) / batch, batch),
            lr * sum_tolerance(np.abs(delta_out).astype(np.float64).sum(0) / batch, batch))


def partial_atol(W, delta_out, rows_per_chunk: int) -> np.ndarray:
    """backward_update_partial's partials (chunks, n_in): chunk c sums the rows_per_chunk terms
    delta_out[r] W[r, j] of its rows r, W (n_out, n_in), delta_out (n_out,)."""
    n_out, n_in = W.shape
    chunks = -(-n_out // rows_per_chunk)
    terms = np.abs(delta_out).astype(np.float64)[:, None] * np.abs(W)
    terms = np.pad(terms, ((0, chunks * rows_per_chunk - n_out), (0, 0)))
    return sum_tolerance(terms.reshape(chunks, rows_per_chunk, n_in).sum(1), rows_per_chunk)


@dataclass
class Comparison:
    """The outcome of comparing an array with its reference under atol + rtol |ref|."""
    max_error: float            # the largest |actual - ref| (NaN-free part)
    bad: int                    # elements out of bounds (NaN in either counts as out)
    size: int
    worst: str = ""             # the worst element, when one is out of bounds
    mismatch: str = ""          # shapes (or dtypes) that cannot be compared at all
    used: float = float("nan")  # the largest |actual - ref| / bound: the margin left (1 = at the bound)

    @property
    def ok(self) -> bool:
        return self.bad == 0 and not self.mismatch


def compare(actual, ref, atol: float, rtol: float) -> Comparison:
    """Elementwise |actual - ref| <= atol + rtol |ref|; the worst element is the one furthest
    beyond its bound (relative to the bound), named by index, both values and the bound."""
    actual, ref = np.asarray(actual), np.asarray(ref)
    if actual.shape != ref.shape:
        return Comparison(float("nan"), 0, int(actual.size),
                          mismatch=f"shape {actual.shape} != reference shape {ref.shape}")
    a, r = actual.astype(np.float64), ref.astype(np.float64)
    err = np.abs(a - r)
    bound = atol + rtol * np.abs(r)
    bad = ~(err <= bound)   # also catches NaN in either array
    max_err = float(np.nanmax(err)) if err.size and not np.isnan(err).all() else 0.0
    excess = np.where(np.isnan(err), np.inf, err / np.maximum(bound, np.finfo(np.float64).tiny))
    used = float(np.max(excess[np.isfinite(excess)])) if np.isfinite(excess).any() else float("nan")
    result = Comparison(max_err, int(bad.sum()), int(bad.size), used=used)
    if bad.any():
        index = np.unravel_index(int(np.argmax(np.where(bad, excess, -1.0))), actual.shape)
        result.worst = (f"worst at index {tuple(int(i) for i in index)}: actual {a[index]!r}, reference "
                        f"{r[index]!r}, error {err[index]:.3g} > bound {bound[index]:.3g}")
    return result


def first_difference(actual, ref) -> Comparison:
    """Bit-for-bit comparison (so -0.0 != 0.0 and NaN payloads count); names the first mismatch."""
    actual, ref = np.ascontiguousarray(actual), np.ascontiguousarray(ref)
    if actual.shape != ref.shape or actual.dtype != ref.dtype:
        return Comparison(float("nan"), 0, int(actual.size),
                          mismatch=f"{actual.dtype} {actual.shape} != reference {ref.dtype} {ref.shape}")
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.dtype.itemsize]
    differ = actual.view(bits) != ref.view(bits)
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.abs(actual.astype(np.float64) - ref.astype(np.float64))
    max_err = float(np.nanmax(delta)) if delta.size and not np.isnan(delta).all() else 0.0
    result = Comparison(max_err if differ.any() else 0.0, int(differ.sum()), int(differ.size))
    if differ.any():
        index = np.unravel_index(int(np.argmax(differ)), actual.shape)
        result.worst = (f"first at index {tuple(int(i) for i in index)}: actual {actual[index]!r}, "
                        f"reference {ref[index]!r}")
    return result
