"""cuda_kernels/deform.cu against the reference, run by the CPU emulator (and compiled by NVRTC).

Tolerance of the images: atol 1e-4, rtol 0. The parameters and the raw field draws are equal bit
for bit, and every float step of the kernel is a single rounded operation in the reference's
order. What remains is (1) sinf/cosf/tanf (CUDA: up to 2 ulp; the emulator: the C library) against
numpy's float32 versions, an error of a few ulp in M, i.e. ~1e-5 pixel in the source coordinate
after multiplying by |p - c| <= 14; (2) the smoothing's summation order (the reference uses a
banded matrix product), ~1e-6 pixel after alpha = 36. The bilinear surface has a slope of at most
2 per pixel along each axis, so the value error is at most ~6e-5; measured on +-1 checkerboard
noise (the steepest images there are): 1.5e-5. The error is in the coordinates, not proportional
to the value, hence rtol 0.
"""
import numpy as np
import pytest

from gpumlp import ops_deform
from gpumlp.deform import PIXELS, DeformConfig, deform_images_ref
from gpumlp.device import KERNEL_DIR, EmulatedDevice
from gpumlp.philox import philox_fill_ref
from gpumlp.tolerances import DEFORM
from helpers import assert_bitwise_equal, assert_close, synthetic_digits

ATOL, RTOL = DEFORM["atol"], DEFORM["rtol"]   # gpumlp/tolerances.py, shared with gpumlp.selfcheck

DEVICES = {
    "plain": lambda: EmulatedDevice(),
    # shared memory filled with NaN and threads run last to first: a missing barrier shows; every
    # launch also runs with its blocks in reverse and in a seeded random order, and the results of
    # the three orders must agree bit for bit
    "poison+reverse+block-orders": lambda: EmulatedDevice(poison_shared=True, reverse_threads=True,
                                                          compare_block_orders=True),
}


@pytest.fixture(scope="module", params=list(DEVICES))
def device(request):
    return DEVICES[request.param]()


def images_for(n, kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "digits":
        return synthetic_digits(n, seed=seed)
    return np.where(rng.random((n, PIXELS)) < 0.5, -1.0, 1.0).astype(np.float32)   # steepest case


def run_kernel(device, images, labels, indices, seed, epoch, cfg, **launch):
    n = len(images)
    out = device.asarray(np.full((n, PIXELS), np.nan, np.float32))
    params = device.asarray(np.full((n, 4), np.nan, np.float32))
    ops_deform.deform_images(device, device.asarray(images), device.asarray(labels, np.int32),
                             None if indices is None else device.asarray(indices, np.int32),
                             out, params, seed, epoch, cfg, **launch)
    return device.to_host(out), device.to_host(params)


@pytest.mark.parametrize("n, n_blocks", [(1, 1), (5, 3), (3, 422)])
def test_philox_fill_is_bitwise_the_reference(device, n, n_blocks):
    indices = np.array([0, 7, 59999, 2**31 - 1, 12345][:n], dtype=np.int32)
    out = device.asarray(np.zeros((n, n_blocks * 4), np.uint32))
    ops_deform.philox_fill(device, device.asarray(indices), out, n_blocks, 0xDEADBEEF, 17)
    assert_bitwise_equal(device.to_host(out), philox_fill_ref(0xDEADBEEF, 17, indices, n_blocks), "philox_fill")


@pytest.mark.parametrize("indices, problem", [(np.arange(4, dtype=np.int64), "must be int32"),
                                              (np.arange(8, dtype=np.int32)[::2], "must be C-contiguous"),
                                              (np.zeros((4, 1), np.int32), "must have shape")])
def test_philox_fill_refuses_bad_indices(indices, problem):
    """On a GPU nothing checks pointer types: an int64 or strided array would be misread."""
    out = np.zeros((4, 4), np.uint32)
    with pytest.raises(ValueError, match=f"philox_fill: indices {problem}"):
        ops_deform.philox_fill(EmulatedDevice(), indices, out, 1, 1, 1)
    assert not out.any()


@pytest.mark.parametrize("n, kind", [(1, "digits"), (7, "noise"), (37, "digits"), (301, "noise")])
def test_deform_images_matches_reference(device, n, kind):
    images = images_for(n, kind, seed=n)
    labels = (np.arange(n) * 7 % 10).astype(np.int32)        # every digit, 1 and 7 included
    cfg = DeformConfig()
    out, params = run_kernel(device, images, labels, None, 123, 4, cfg)
    ref, ref_params = deform_images_ref(images, labels, None, 123, 4, cfg)
    assert_bitwise_equal(params, ref_params, f"params (N={n})")
    assert_close(out, ref, ATOL, RTOL, f"deformed images (N={n}, {kind})")
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("threads, max_grid", [(32, 65535), (96, 4), (256, 3)])
def test_any_block_size_and_grid_stride(device, monkeypatch, threads, max_grid):
    """Fewer threads than items and fewer blocks than images exercise every stride loop."""
    monkeypatch.setattr(ops_deform, "MAX_GRID", max_grid)
    n = 11
    images = images_for(n, "noise", seed=5)
    labels = (np.arange(n) % 10).astype(np.int32)
    cfg = DeformConfig(beta=30.0, beta_1_7=10.0, gamma=25.0, sigma=4.0, alpha=50.0)
    out, params = run_kernel(device, images, labels, None, 9, 2, cfg, threads=threads)
    ref, ref_params = deform_images_ref(images, labels, None, 9, 2, cfg)
    assert_bitwise_equal(params, ref_params, "params")
    assert_close(out, ref, ATOL, RTOL, f"deformed images ({threads} threads, grid <= {max_grid})")


def test_identity_config_is_exact(device):
    images = images_for(9, "digits", seed=2)
    labels = np.arange(9, dtype=np.int32)
    cfg = DeformConfig(beta=0.0, beta_1_7=0.0, gamma=0.0, sigma=0.0, alpha=0.0)
    out, params = run_kernel(device, images, labels, None, 1, 1, cfg)
    assert_bitwise_equal(out, images, "identity")
    # 0 times a negative draw is -0.0 on both paths, so compare values here and bits with the ref
    np.testing.assert_array_equal(params, np.tile(np.float32([0, 0, 1, 1]), (9, 1)))
    assert_bitwise_equal(params, deform_images_ref(images, labels, None, 1, 1, cfg)[1], "identity params")


def test_indices_key_the_stream(device):
    """Explicit dataset indices: a subset deforms as within the whole set; the epoch changes it."""
    images = images_for(6, "digits", seed=3)
    labels = np.array([1, 7, 0, 4, 9, 3], dtype=np.int32)
    indices = np.array([100, 5, 59999, 0, 77, 31], dtype=np.int32)
    cfg = DeformConfig()
    out, params = run_kernel(device, images, labels, indices, 2, 30, cfg)
    ref, ref_params = deform_images_ref(images, labels, indices, 2, 30, cfg)
    assert_bitwise_equal(params, ref_params, "params with indices")
    assert_close(out, ref, ATOL, RTOL, "deformed images with indices")
    other, other_params = run_kernel(device, images, labels, indices, 2, 31, cfg)
    assert (other_params != params).all()
    assert (np.abs(other - out).max(axis=1) > 0.01).all()


@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_compiles_with_nvrtc(arch):
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    source = (KERNEL_DIR / "deform.cu").read_text()
    program = nvrtc.createProgram(source, "deform.cu", [], [])
    try:
        nvrtc.compileProgram(program, [f"-arch={arch}", "-std=c++17", f"-I{KERNEL_DIR}"])
    except nvrtc.NVRTCError as error:
        pytest.fail(f"NVRTC ({arch}): {error}\n{nvrtc.getProgramLog(program)}")


@pytest.mark.mnist
def test_real_digits_match_reference(mnist):
    images = np.ascontiguousarray(mnist.train_images[:97])
    labels = np.ascontiguousarray(mnist.train_labels[:97]).astype(np.int32)
    cfg = DeformConfig()
    device = EmulatedDevice()
    out, params = run_kernel(device, images, labels, None, 0, 1, cfg)
    ref, ref_params = deform_images_ref(images, labels, None, 0, 1, cfg)
    assert_bitwise_equal(params, ref_params, "params (MNIST)")
    assert_close(out, ref, ATOL, RTOL, "deformed MNIST digits")
