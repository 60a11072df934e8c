"""Typed launchers of cuda_kernels/deform.cu (references: gpumlp/deform.py, gpumlp/philox.py).

Every scalar goes to the kernel as np.int32 / np.uint32 / np.float32 so its C type is right on
both devices. The Gaussian taps are computed once on the host by `gaussian_taps` (the same float32
values the reference uses) and kept on the device per (device, sigma).
"""
from __future__ import annotations

import weakref

import numpy as np

from gpumlp.deform import PIXELS, DeformConfig, gaussian_taps
from gpumlp.device import check_array

THREADS = 256          # 841 pixels / 421 Philox blocks: a few items per thread, 8 warps per image
MAX_GRID = 65535       # the kernel strides over images, so a capped grid still covers any N

# device -> {("taps", sigma): array, ("arange", n): array}; weak so a dropped device frees them
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached(device, key, make):
    per_device = _cache.setdefault(device, {})
    if key not in per_device:
        per_device[key] = make()
    return per_device[key]


def deform_images(device, images, labels, indices, out, params, seed, epoch, cfg: DeformConfig,
                  threads: int = THREADS) -> None:
    """out[i], params[i] = the deformation of images[i] for (seed, epoch), as deform_images_ref.

    images (N, 841) float32, labels (N,) int32, indices (N,) int32 or None (= 0..N-1: the
    dataset index that keys the RNG), out (N, 841) float32, params (N, 4) float32; all device
    arrays of `device`. seed, epoch: integers in [0, 2^32)."""
    n = int(images.shape[0])
    check_array("deform_images", "images", images, (n, PIXELS), np.float32)
    check_array("deform_images", "labels", labels, (n,), np.int32)
    check_array("deform_images", "out", out, (n, PIXELS), np.float32)
    check_array("deform_images", "params", params, (n, 4), np.float32)
    if indices is None:
        indices = _cached(device, ("arange", n), lambda: device.asarray(np.arange(n, dtype=np.int32)))
    check_array("deform_images", "indices", indices, (n,), np.int32)
    if n == 0:
        return
    taps = _cached(device, ("taps", float(cfg.sigma)), lambda: device.asarray(gaussian_taps(cfg.sigma)))
    radius = (int(taps.shape[0]) - 1) // 2
    s = cfg.scalars()
    kernel = device.kernel("deform.cu", "deform_images")
    device.launch(kernel, (min(n, MAX_GRID),), (threads,),
                  (images, labels, indices, out, params, taps,
                   np.int32(n), np.int32(radius), np.uint32(seed), np.uint32(epoch),
                   s["beta"], s["beta_1_7"], s["gamma_frac"], s["alpha"]))


def philox_fill(device, indices, out, n_blocks: int, seed, epoch, threads: int = 128) -> None:
    """out = philox_fill_ref(seed, epoch, indices, n_blocks): the raw generator, for tests.

    indices (N,) int32, out (N, n_blocks * 4) uint32, device arrays."""
    n = int(indices.shape[0])
    check_array("philox_fill", "indices", indices, (n,), np.int32)
    check_array("philox_fill", "out", out, (n, n_blocks * 4), np.uint32)
    total = n * n_blocks
    if total == 0:
        return
    kernel = device.kernel("deform.cu", "philox_fill")
    device.launch(kernel, (min((total + threads - 1) // threads, MAX_GRID),), (threads,),
                  (indices, out, np.int32(n), np.int32(n_blocks), np.uint32(seed), np.uint32(epoch)))
