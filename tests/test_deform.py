"""The deformation reference (gpumlp/deform.py): exact identity, exact translation, the paper's
parameter ranges (and the 1/7 rule), the documented geometry, the draw layout and determinism."""
import math

import numpy as np
import pytest

from gpumlp.deform import (FIELD_BLOCKS, PIXELS, DeformConfig, affine_matrices, deform_images_ref,
                           deformation_params_ref, displacement_fields_ref, gaussian_taps,
                           resample_ref, smooth_lines)
from gpumlp.philox import philox_blocks, uniform_pm1
from helpers import assert_bitwise_equal, assert_close, synthetic_digits

ZERO = DeformConfig(beta=0.0, beta_1_7=0.0, gamma=0.0, sigma=0.0, alpha=0.0)


@pytest.fixture(scope="module")
def digits():
    return synthetic_digits(40, seed=1)


def test_all_zero_config_is_the_exact_identity(digits):
    labels = (np.arange(len(digits)) % 10).astype(np.int32)
    noise = np.random.default_rng(0).uniform(-1, 1, size=(7, PIXELS)).astype(np.float32)
    for images, lab in ((digits, labels), (noise, labels[:7])):
        out, params = deform_images_ref(images, lab, None, 5, 3, ZERO)
        assert_bitwise_equal(out, images, "identity deformation")
        np.testing.assert_array_equal(params, np.tile(np.float32([0, 0, 1, 1]), (len(images), 1)))


def test_no_affine_no_elastic_is_identity_whatever_sigma(digits):
    cfg = DeformConfig(beta=0.0, beta_1_7=0.0, gamma=0.0, sigma=6.0, alpha=0.0)
    out, _ = deform_images_ref(digits, np.zeros(len(digits), np.int32), None, 0, 1, cfg)
    assert_bitwise_equal(out, digits, "identity deformation with sigma 6")


@pytest.mark.parametrize("tx, ty", [(3, 0), (0, -2), (-5, 4), (40, 0)])
def test_constant_integer_field_translates_exactly(digits, tx, ty):
    """source = p + (tx, ty): output pixel (x, y) is input pixel (x + tx, y + ty), or background."""
    n = len(digits)
    params = np.tile(np.float32([0, 0, 1, 1]), (n, 1))
    fields = np.zeros((n, 2, 29, 29), dtype=np.float32)
    fields[:, 0], fields[:, 1] = tx, ty
    out = resample_ref(digits, params, fields).reshape(n, 29, 29)
    padded = np.full((n, 29 + 2 * 45, 29 + 2 * 45), -1.0, dtype=np.float32)
    padded[:, 45:74, 45:74] = digits.reshape(n, 29, 29)
    expected = padded[:, 45 + ty:74 + ty, 45 + tx:74 + tx]
    assert_bitwise_equal(out, expected, f"translation by ({tx}, {ty})")


def test_half_pixel_shift_averages_neighbours():
    image = np.full((1, PIXELS), -1.0, dtype=np.float32)
    image[0, 14 * 29 + 14] = 1.0
    fields = np.zeros((1, 2, 29, 29), dtype=np.float32)
    fields[:, 0] = 0.5
    out = resample_ref(image, np.float32([[0, 0, 1, 1]]), fields).reshape(29, 29)
    assert out[14, 13] == 0.0 and out[14, 14] == 0.0      # halfway between -1 and 1
    assert (np.delete(out.ravel(), [14 * 29 + 13, 14 * 29 + 14]) == -1).all()


def test_affine_matrix_is_rotation_shear_scale_in_that_order():
    params = np.float32([[10.0, -7.0, 1.1, 0.9], [-15.0, 15.0, 0.85, 1.15], [0.0, 0.0, 1.0, 1.0]])
    M = np.stack(affine_matrices(params), axis=1).reshape(-1, 2, 2)
    for (rot, shear, sx, sy), m in zip(params.astype(np.float64), M):
        t, s = math.radians(rot), math.radians(shear)
        R = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        Sh = np.array([[1, math.tan(s)], [0, 1]])
        assert_close(m, R @ Sh @ np.diag([sx, sy]), 1e-6, 0, "M = R Sh S")


def test_rotation_moves_a_pixel_where_the_matrix_says():
    """Output pixel p samples c + M (p - c): a bright source pixel shows up at M^-1 (q - c) + c."""
    image = np.full((1, PIXELS), -1.0, dtype=np.float32)
    image[0, 14 * 29 + 24] = 1.0                                   # (x, y) = (24, 14)
    out = resample_ref(image, np.float32([[90.0, 0, 1, 1]]), np.zeros((1, 2, 29, 29), np.float32))
    y, x = np.unravel_index(np.argmax(out), (29, 29))
    # M = R(90) maps (p - c) = (0, -10) to (10, 0), so p = (14, 4)
    assert (x, y) == (14, 4)
    assert out.max() > 0.99


def test_one_and_seven_rule():
    n = 20000
    indices = np.arange(n)
    cfg = DeformConfig()
    for label in (1, 7):
        p = deformation_params_ref(9, 1, indices, np.full(n, label, np.int32), cfg)
        assert np.abs(p[:, :2]).max() <= 7.5
        assert np.abs(p[:, :2]).max() > 7.4
    for label in (0, 2, 3, 4, 5, 6, 8, 9):
        p = deformation_params_ref(9, 1, indices[:2000], np.full(2000, label, np.int32), cfg)
        assert np.abs(p[:, :2]).max() <= 15.0
        assert (np.abs(p[:, :2]) > 7.5).mean() > 0.4


def test_scales_fill_their_range():
    n = 20000
    p = deformation_params_ref(2, 5, np.arange(n), np.arange(n) % 10, DeformConfig())
    assert p.dtype == np.float32 and p.shape == (n, 4)
    for column in (2, 3):
        assert p[:, column].min() >= np.float32(0.85) and p[:, column].max() <= np.float32(1.15)
        assert p[:, column].min() < 0.851 and p[:, column].max() > 1.149
    # rotation, shear, scale_x, scale_y come from different words: not the same draw
    assert abs(np.corrcoef(p[:, 0], p[:, 2])[0, 1]) < 0.05


def test_params_are_the_documented_function_of_block_zero():
    indices = np.array([4, 0, 77])
    labels = np.array([7, 3, 1], dtype=np.int32)
    cfg = DeformConfig(beta=12.0, beta_1_7=5.0, gamma=20.0)
    v = uniform_pm1(philox_blocks(11, 2, indices, [0])[:, 0])
    b = np.float32([5.0, 12.0, 5.0])
    g = np.float32(0.2)
    expected = np.stack([b * v[:, 0], b * v[:, 1], 1 + g * v[:, 2], 1 + g * v[:, 3]], axis=1).astype(np.float32)
    assert_bitwise_equal(deformation_params_ref(11, 2, indices, labels, cfg), expected, "params")


def test_gaussian_taps():
    taps = gaussian_taps(6.0)
    assert taps.dtype == np.float32 and len(taps) == 2 * 18 + 1
    assert abs(float(taps.astype(np.float64).sum()) - 1) < 1e-6
    np.testing.assert_array_equal(taps, taps[::-1])
    assert np.argmax(taps) == 18
    np.testing.assert_array_equal(gaussian_taps(0.0), np.float32([1.0]))
    assert len(gaussian_taps(0.5)) == 5


def test_fields_are_smoothed_draws_in_the_documented_layout():
    """sigma 0 (no smoothing), alpha 1: the field is the raw draw of blocks 1..421, x then y."""
    indices = np.array([3, 1000])
    fields = displacement_fields_ref(8, 2, indices, DeformConfig(sigma=0.0, alpha=1.0))
    words = philox_blocks(8, 2, indices, np.arange(1, FIELD_BLOCKS + 1)).reshape(2, -1)
    raw = uniform_pm1(words[:, :2 * PIXELS]).reshape(2, 2, 29, 29)
    assert_bitwise_equal(fields, raw, "unsmoothed field")
    # with smoothing: the fixed-order float32 sums equal the direct zero-boundary convolution
    cfg = DeformConfig(sigma=6.0, alpha=36.0)
    smooth = displacement_fields_ref(8, 2, indices, cfg)
    taps = gaussian_taps(6.0).astype(np.float64)
    r = len(taps) // 2
    padded = np.zeros((2, 2, 29 + 2 * r, 29 + 2 * r))
    padded[:, :, r:r + 29, r:r + 29] = raw
    direct = np.zeros((2, 2, 29, 29 + 2 * r))
    for k in range(-r, r + 1):
        direct += taps[k + r] * padded[:, :, r + k:r + k + 29, :]
    direct2 = np.zeros((2, 2, 29, 29))
    for k in range(-r, r + 1):
        direct2 += taps[k + r] * direct[:, :, :, r + k:r + k + 29]
    assert_close(smooth, 36.0 * direct2, 1e-5, 1e-5, "smoothed field vs direct convolution")


def smooth_along_like_the_kernel(line, taps):
    """cuda_kernels/deform.cu smooth_along, transcribed in float32 scalars: for every position a
    sum from 0 over the taps inside the line, ascending k, each product and sum rounded."""
    radius = len(taps) // 2
    out = np.empty(29, np.float32)
    for pos in range(29):
        total = np.float32(0.0)
        for k in range(max(-radius, -pos), min(radius, 28 - pos) + 1):
            total = np.float32(total + np.float32(taps[k + radius] * line[pos + k]))
        out[pos] = total
    return out


@pytest.mark.parametrize("sigma", [6.0, 2.0, 10.0])   # 10: the radius (30) is wider than the image
def test_smoothing_sums_in_the_kernels_order_bit_for_bit(sigma):
    taps = gaussian_taps(sigma)
    lines = np.random.default_rng(4).uniform(-1, 1, size=(29, 3)).astype(np.float32)
    expected = np.stack([smooth_along_like_the_kernel(lines[:, c], taps) for c in range(3)], axis=1)
    assert_bitwise_equal(smooth_lines(lines, taps), expected, f"smooth_lines, sigma {sigma}")


def test_field_magnitude_is_plausible():
    fields = displacement_fields_ref(0, 1, np.arange(300), DeformConfig())
    sd = float(fields.std())
    assert 0.3 < sd < 3.0     # sigma 6, alpha 36: about one pixel
    assert np.abs(fields).max() < 10


def test_output_stays_in_range(digits):
    rng = np.random.default_rng(3)
    extreme = np.where(rng.random((30, PIXELS)) < 0.5, -1.0, 1.0).astype(np.float32)
    noise = rng.uniform(-1, 1, size=(30, PIXELS)).astype(np.float32)
    for images in (digits, extreme, noise, np.ones((5, PIXELS), np.float32)):
        out, _ = deform_images_ref(images, np.arange(len(images)) % 10, None, 1, 1,
                                   DeformConfig(beta=30, gamma=30, alpha=80))
        assert out.dtype == np.float32 and out.shape == images.shape
        assert out.min() >= -1.0 and out.max() <= 1.0


def test_deterministic_per_seed_epoch_index(digits):
    labels = (np.arange(len(digits)) % 10).astype(np.int32)
    cfg = DeformConfig()
    a, pa = deform_images_ref(digits, labels, None, 4, 10, cfg)
    b, pb = deform_images_ref(digits, labels, None, 4, 10, cfg)
    assert_bitwise_equal(a, b, "same seed and epoch")
    assert_bitwise_equal(pa, pb, "same seed and epoch")
    assert not np.array_equal(a, digits)
    # a subset, addressed by its dataset indices, deforms exactly as within the full set
    subset = np.array([5, 17, 2])
    c, pc = deform_images_ref(digits[subset], labels[subset], subset, 4, 10, cfg)
    assert_bitwise_equal(c, a[subset], "subset")
    assert_bitwise_equal(pc, pa[subset], "subset params")
    # another epoch or seed: every image deformed differently
    for seed, epoch in ((4, 11), (5, 10)):
        d, pd = deform_images_ref(digits, labels, None, seed, epoch, cfg)
        assert (np.abs(d - a).max(axis=1) > 0.01).all()
        assert (pd != pa).all()


def test_chunked_and_threaded_paths_agree(monkeypatch, digits):
    import gpumlp.deform as deform
    images = np.tile(digits, (3, 1))[:100]
    labels = (np.arange(100) % 10).astype(np.int32)
    whole, _ = deform_images_ref(images, labels, None, 0, 1, DeformConfig())
    monkeypatch.setattr(deform, "CHUNK", 7)
    monkeypatch.setattr(deform, "THREADS", 2)
    chunked, _ = deform_images_ref(images, labels, None, 0, 1, DeformConfig())
    assert_bitwise_equal(chunked, whole, "chunked")
