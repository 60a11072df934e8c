"""Shared test helpers."""
from __future__ import annotations

import json

import numpy as np

from gpumlp.tolerances import compare, first_difference


def flush_subnormals(values) -> np.ndarray:
    """float32 values as CUDA's -ftz=true sees them (x86 FTZ + DAZ alike): a subnormal becomes a
    zero of the same sign."""
    values = np.asarray(values, np.float32)
    return np.where(np.abs(values) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), values), values)


def flushed(operation):
    """`operation` (a numpy float32 ufunc such as np.multiply) with its operands and its result
    flushed as a -ftz=true instruction flushes them."""
    def run(*operands):
        return flush_subnormals(operation(*(flush_subnormals(o) for o in operands)))
    return run


def assert_close(actual, ref, atol, rtol: float, what: str) -> float:
    """Assert |actual - ref| <= atol + rtol |ref| elementwise (NaN anywhere fails); return the max
    absolute error. `atol` is a number or an array of the shape (e.g. from
    gpumlp.tolerances.sum_tolerance). On
    failure the message names the worst element (largest error relative to its bound), its index,
    both values and how many elements are out of bounds."""
    result = compare(actual, ref, atol, rtol)
    if result.mismatch:
        raise AssertionError(f"{what}: {result.mismatch}")
    if not result.ok:
        raise AssertionError(
            f"{what}: {result.bad} of {result.size} elements exceed atol={_describe(atol)} + rtol={rtol:g}*|ref|; "
            f"{result.worst}; max abs error {result.max_error:.3g}")
    return result.max_error


def _describe(atol) -> str:
    atol = np.asarray(atol)
    return f"{float(atol):g}" if atol.ndim == 0 else f"(per element, {atol.min():.3g} to {atol.max():.3g})"


def assert_bitwise_equal(actual, ref, what: str) -> None:
    """Assert identical bits (so -0.0 != 0.0 and NaN payloads count); names the first mismatch."""
    result = first_difference(actual, ref)
    if result.mismatch:
        raise AssertionError(f"{what}: {result.mismatch}")
    if not result.ok:
        raise AssertionError(f"{what}: {result.bad} of {result.size} elements differ; {result.worst}")


def synthetic_digits(n: int, seed: int = 0) -> np.ndarray:
    """n digit-like 29 x 29 images, float32 (n, 841): a random ellipse outline and a random bar,
    anti-aliased, on background -1 with a 4-pixel margin like MNIST's padded digits."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:29, 0:29].astype(np.float64)
    images = np.empty((n, 841), dtype=np.float32)
    for i in range(n):
        cx, cy = rng.uniform(11, 17, size=2)
        rx, ry = rng.uniform(3, 7), rng.uniform(4, 9)
        ring = np.abs(np.hypot((x - cx) / rx, (y - cy) / ry) - 1) * min(rx, ry)
        angle = rng.uniform(0, np.pi)
        bar = np.abs((x - cx) * np.sin(angle) - (y - cy) * np.cos(angle))
        bar[np.hypot(x - cx, y - cy) > 8] = np.inf
        ink = np.clip(1.6 - np.minimum(ring, bar), 0, 1)
        ink[:4] = ink[-4:] = 0
        ink[:, :4] = ink[:, -4:] = 0
        images[i] = (2 * ink - 1).ravel()
    return images


def weights_sha(run) -> str:
    """The weights_sha256 a finished run (gpumlp.rundir.RunDir) recorded in summary.json."""
    return json.loads((run.path / "summary.json").read_text())["weights_sha256"]


def first_state_difference(expected_state, state):
    """(layer, array, worst index, expected, got) of the first array of two trainer states
    (get_state: params, then velocities) that differs, or None."""
    for layer, (expected, got) in enumerate(zip(expected_state["params"] + expected_state["velocities"],
                                                state["params"] + state["velocities"])):
        for name, e, g in zip(("W", "b"), expected, got):
            if not np.array_equal(e, g, equal_nan=False):
                index = np.unravel_index(np.argmax(np.abs(e - g)), e.shape)
                return layer, name, index, e[index], g[index]
    return None
