"""Numpy reference of the per-image deformation (kernel: cuda_kernels/deform.cu, `deform_images`).

Ciresan et al. (2010) deform every training digit anew every epoch: rotation and horizontal shear
by angles in [-beta, beta] (beta_1_7 for the digits 1 and 7, which turn into each other when
tilted too far), horizontal and vertical scaling in [1 - gamma/100, 1 + gamma/100], and Simard's
elastic distortion, all applied by ONE bilinear resampling so that the image is blurred once.

Images are float32 (N, 841) = 29 x 29 row-major, background -1. Coordinates: x = column,
y = row, both 0..28; the centre is c = (14, 14).

Randomness (gpumlp/philox.py): Philox4x32-10, key (seed, epoch), counter (image_index, block, 0, 0).
  block 0            -> words v0..v3 -> rotation, shear, scale_x, scale_y
  blocks 1 .. 421    -> 1684 words; word k = 4 (block - 1) + w is the raw field value k:
                        k < 841 is the x field at pixel k, 841 <= k < 1682 the y field at pixel
                        k - 841 (the last two words are unused)
Each word becomes v = 2 (x >> 8) 2^-24 - 1 in [-1, 1), exactly.

Parameters (float32, single rounded operations in this order, so the kernel's bits are equal):
  b = beta_1_7 if label in (1, 7) else beta
  rotation = b * v0, shear = b * v1 (degrees)
  scale_x = 1 + g * v2, scale_y = 1 + g * v3 with g = float32(gamma / 100) computed on the host

Geometry: the deformation is the map from an OUTPUT pixel p to the SOURCE point it samples:
  source = c + M (p - c) + field(p),   M = R(rotation) Sh(shear) S(scale_x, scale_y)
  R = [[cos, -sin], [sin, cos]], Sh = [[1, tan(shear)], [0, 1]] (horizontal), S = diag(sx, sy)
so a scale above 1 samples a wider area and shrinks the digit (the range is symmetric, so the
distribution of sizes is the paper's either way). field = alpha * (Gaussian-smoothed uniform
[-1, 1) field). The source is sampled bilinearly; pixels outside the 29 x 29 image are background
(-1); the result is clamped to [-1, 1] because float32 interpolation can overshoot by an ulp.

Smoothing: separable Gaussian with taps from `gaussian_taps(sigma)` (float32, radius ceil(3 sigma),
normalised to sum 1), zero (constant) boundary: a field value outside the image counts as 0.
Horizontal pass first, then vertical; each smoothed value is a float32 sum that starts at 0 and
adds the rounded products taps[k + R] * value[pos + k] for ascending k over the taps that fall
inside the line, every operation rounded: the kernel's order exactly, so the field does not depend
on how the images are chunked, on threads or on the BLAS.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gpumlp.philox import philox_blocks, uniform_pm1

SIDE = 29
PIXELS = SIDE * SIDE
CENTRE = np.float32(14.0)
FIELD_BLOCKS = (2 * PIXELS + 3) // 4     # 421 Philox blocks hold the 1682 field values
DEG2RAD = np.float32(math.pi / 180.0)
CHUNK = 256                              # images per pass: the temporaries (~2 MB) stay in cache
F32 = np.float32
THREADS = min(4, os.cpu_count() or 1)


@dataclass
class DeformConfig:
    """The paper's deformation settings. All zero gives the identity exactly."""
    beta: float = 15.0       # max |rotation| and |shear|, degrees
    beta_1_7: float = 7.5    # the same for the digits 1 and 7
    gamma: float = 15.0      # max scaling per axis, percent
    sigma: float = 6.0       # elastic: Gaussian smoothing sigma, pixels
    alpha: float = 36.0      # elastic: displacement scale, pixels

    def scalars(self) -> dict:
        """The float32 values both paths use (gamma already divided by 100 on the host)."""
        return {"beta": F32(self.beta), "beta_1_7": F32(self.beta_1_7),
                "gamma_frac": F32(self.gamma / 100.0), "alpha": F32(self.alpha)}


def gaussian_taps(sigma: float) -> np.ndarray:
    """Normalised Gaussian taps, float32 (2R+1,), R = ceil(3 sigma); tap R is the centre.

    Computed in float64 and rounded once, so the kernel receives exactly these values.
    sigma <= 0 gives the single tap [1] (no smoothing)."""
    if sigma <= 0:
        return np.ones(1, dtype=F32)
    radius = int(math.ceil(3.0 * sigma))
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (k / sigma) ** 2)
    return (taps / taps.sum()).astype(F32)


def smooth_lines(lines: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """One Gaussian pass along the FIRST axis, in the documented fixed order.

    lines (29, ...) float32, position along the line first (so that every step below is one
    contiguous block), taps (2R+1,) float32 -> (29, ...) float32 with
    out[p] = sum over ascending k with 0 <= p + k < 29 of taps[k + R] * lines[p + k]."""
    radius = (len(taps) - 1) // 2
    out = np.zeros_like(lines)
    term = np.empty_like(lines)
    for k in range(-radius, radius + 1):
        lo, hi = max(0, -k), min(SIDE, SIDE - k)     # the positions p whose tap k is inside
        if lo >= hi:
            continue
        np.multiply(lines[lo + k:hi + k], taps[k + radius], out=term[lo:hi])
        out[lo:hi] += term[lo:hi]
    return out


def _as_indices(indices, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices).reshape(-1)


def deformation_params_ref(seed, epoch, indices, labels, cfg: DeformConfig) -> np.ndarray:
    """Affine parameters of each image.

    indices (N,) int (dataset index, the RNG counter), labels (N,) int ->
    (N, 4) float32 [rotation degrees, shear degrees, scale_x, scale_y]."""
    indices = _as_indices(indices, len(labels))
    v = uniform_pm1(philox_blocks(seed, epoch, indices, [0])[:, 0, :])      # (N, 4)
    s = cfg.scalars()
    labels = np.asarray(labels).reshape(-1)
    b = np.where((labels == 1) | (labels == 7), s["beta_1_7"], s["beta"]).astype(F32)
    params = np.empty((len(indices), 4), dtype=F32)
    params[:, 0] = b * v[:, 0]
    params[:, 1] = b * v[:, 1]
    params[:, 2] = F32(1.0) + s["gamma_frac"] * v[:, 2]
    params[:, 3] = F32(1.0) + s["gamma_frac"] * v[:, 3]
    return params


def displacement_fields_ref(seed, epoch, indices, cfg: DeformConfig) -> np.ndarray:
    """Elastic displacement, already multiplied by alpha.

    indices (N,) int -> (N, 2, 29, 29) float32; [:, 0] is the x (column) displacement, [:, 1] the
    y (row) displacement, in pixels. alpha = 0 gives zeros without drawing."""
    indices = np.asarray(indices).reshape(-1)
    n = len(indices)
    if cfg.alpha == 0:
        return np.zeros((n, 2, SIDE, SIDE), dtype=F32)
    taps = gaussian_taps(cfg.sigma)
    alpha = F32(cfg.alpha)
    out = np.empty((n, 2, SIDE, SIDE), dtype=F32)
    for start in range(0, n, CHUNK):
        idx = indices[start:start + CHUNK]
        m = len(idx)
        words = philox_blocks(seed, epoch, idx, np.arange(1, FIELD_BLOCKS + 1)).reshape(m, -1)
        raw = uniform_pm1(words[:, :2 * PIXELS]).reshape(m, 2, SIDE, SIDE)     # (m, 2, y, x)
        # horizontal pass along x, lines laid out (x, m, 2, y)
        h = smooth_lines(np.ascontiguousarray(raw.transpose(3, 0, 1, 2)), taps)
        # vertical pass along y, lines laid out (y, m, 2, x)
        v = smooth_lines(np.ascontiguousarray(h.transpose(3, 1, 2, 0)), taps)
        np.multiply(v.transpose(1, 2, 0, 3), alpha, out=out[start:start + m])
    return out


def affine_matrices(params: np.ndarray):
    """M = R Sh S entries (M00, M01, M10, M11), each (N,) float32, in the kernel's operation order.

    params (N, 4) float32 [rotation deg, shear deg, scale_x, scale_y]."""
    params = np.asarray(params, dtype=F32)
    theta = params[:, 0] * DEG2RAD
    phi = params[:, 1] * DEG2RAD
    sx, sy = params[:, 2], params[:, 3]
    c, s, t = np.cos(theta), np.sin(theta), np.tan(phi)
    return c * sx, (c * t - s) * sy, s * sx, (s * t + c) * sy


def resample_ref(images: np.ndarray, params: np.ndarray, fields: np.ndarray) -> np.ndarray:
    """One bilinear resampling through the affine map and the displacement field.

    images (N, 841) float32, params (N, 4) float32, fields (N, 2, 29, 29) float32 (pixels, the
    alpha already applied) -> (N, 841) float32 in [-1, 1]."""
    images = np.asarray(images, dtype=F32)
    n = len(images)
    fields = np.asarray(fields, dtype=F32).reshape(n, 2, PIXELS)
    out = np.empty((n, PIXELS), dtype=F32)
    M00, M01, M10, M11 = affine_matrices(params)
    ys, xs = np.divmod(np.arange(PIXELS), SIDE)
    dx = (xs.astype(F32) - CENTRE)[None, :]
    dy = (ys.astype(F32) - CENTRE)[None, :]
    wide = SIDE + 4   # 2 background pixels on each side: any clamped 2x2 neighbourhood fits
    for start in range(0, n, CHUNK):
        sl = slice(start, start + CHUNK)
        m = len(images[sl])
        # the kernel's order: (c + (M00 dx + M01 dy)) + field, every operation rounded to float32
        src_x = (CENTRE + (M00[sl, None] * dx + M01[sl, None] * dy)) + fields[sl, 0]
        src_y = (CENTRE + (M10[sl, None] * dx + M11[sl, None] * dy)) + fields[sl, 1]
        x0 = np.floor(src_x)
        y0 = np.floor(src_y)
        ax = src_x - x0        # exact: the fraction bits of src_x
        ay = src_y - y0
        # Clamping the corner keeps the index valid; a clamped corner and its neighbour are both
        # background, as the true (far outside) ones would be, and the weights are unchanged.
        np.clip(x0, -2, SIDE, out=x0)
        np.clip(y0, -2, SIDE, out=y0)
        flat = (y0.astype(np.int32) + 2) * wide + (x0.astype(np.int32) + 2)
        flat += (np.arange(m, dtype=np.int32) * (wide * wide))[:, None]
        padded = np.full((m, wide, wide), -1.0, dtype=F32)
        padded[:, 2:2 + SIDE, 2:2 + SIDE] = images[sl].reshape(m, SIDE, SIDE)
        padded = padded.reshape(-1)
        i00 = padded[flat]
        i01 = padded[flat + 1]
        flat += wide
        i10 = padded[flat]
        i11 = padded[flat + 1]
        top = i00 + ax * (i01 - i00)
        bottom = i10 + ax * (i11 - i10)
        value = top + ay * (bottom - top)
        out[sl] = np.clip(value, F32(-1.0), F32(1.0))
    return out


def deform_images_ref(images, labels, indices, seed, epoch, cfg: DeformConfig, threads: int | None = None):
    """Deform every image with its own parameters and field for this (seed, epoch).

    images (N, 841) float32, labels (N,) int, indices (N,) int or None (= 0..N-1; the dataset
    index that keys the RNG, so a subset deforms exactly as within the full set) ->
    (deformed (N, 841) float32, params (N, 4) float32). `threads` (default THREADS) work on
    different chunks; the result does not depend on it."""
    threads = THREADS if threads is None else threads
    images = np.asarray(images, dtype=F32)
    indices = _as_indices(indices, len(images))
    out = np.empty_like(images)
    params = deformation_params_ref(seed, epoch, indices, labels, cfg)

    def chunk(start):
        sl = slice(start, start + CHUNK)
        fields = displacement_fields_ref(seed, epoch, indices[sl], cfg)
        out[sl] = resample_ref(images[sl], params[sl], fields)

    starts = range(0, len(images), CHUNK)
    if len(starts) > 1 and threads > 1:
        # numpy releases the GIL inside its array operations, so chunks overlap on several cores
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(chunk, starts))
    else:
        for start in starts:
            chunk(start)
    return out, params
