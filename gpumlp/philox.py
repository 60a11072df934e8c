"""Philox4x32-10 (Salmon et al., SC11 "Parallel random numbers: as easy as 1, 2, 3"), vectorised numpy.

Philox is counter-based: the output is a pure function of a 128-bit counter and a 64-bit key, so
the deformation kernel (cuda_kernels/philox.cuh) and this reference draw the same numbers for the
same (seed, epoch, image index) with no generator state to carry between epochs or threads.

Stream layout used by the whole project:
    key     = (seed, epoch)
    counter = (image_index, block, 0, 0)
Block 0 gives the four affine draws of an image; blocks 1 .. FIELD_BLOCKS give its elastic field
(see gpumlp/deform.py). Words 2 and 3 of the counter stay 0 and are free for future streams.

uint32 -> float: u = (x >> 8) * 2^-24 is a 24-bit integer times a power of two, exact in float32
on both sides (no rounding mode or contraction can change it); v = 2u - 1 in [-1, 1) is exact too.
"""
from __future__ import annotations

import numpy as np

PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint32(0x9E3779B9)
PHILOX_W1 = np.uint32(0xBB67AE85)
ROUNDS = 10
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def round_keys(key) -> list[tuple[np.uint64, np.uint64]]:
    """The 10 round keys (k0 + r W0, k1 + r W1) mod 2^32, r = 0..9, as uint64 scalars."""
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    keys = []
    with np.errstate(over="ignore"):
        for r in range(ROUNDS):
            keys.append((np.uint64(np.uint32(k0 + np.uint32(r) * PHILOX_W0)),
                         np.uint64(np.uint32(k1 + np.uint32(r) * PHILOX_W1))))
    return keys


def philox4x32_10(counters: np.ndarray, key) -> np.ndarray:
    """Philox4x32 with 10 rounds.

    counters (..., 4) uint32, key (2,) uint32 -> (..., 4) uint32.
    The arithmetic is done in uint64 so that the 32x32 -> 64-bit product (mulhilo) is exact."""
    counters = np.asarray(counters, dtype=np.uint32)
    shape = counters.shape
    flat = counters.reshape(-1, 4).astype(np.uint64)
    c0, c1, c2, c3 = (np.ascontiguousarray(flat[:, i]) for i in range(4))
    for k0, k1 in round_keys(key):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0 = (p1 >> _SHIFT32) ^ c1 ^ k0
        c1 = p1 & _LOW32
        c2 = (p0 >> _SHIFT32) ^ c3 ^ k1
        c3 = p0 & _LOW32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32).reshape(shape)


def philox4x32_10_scalar(counter, key) -> tuple[int, int, int, int]:
    """The same generator one counter at a time in Python integers: an independent transcription
    of the published algorithm that the vectorised version is tested against."""
    mask = 0xFFFFFFFF
    c = [int(v) & mask for v in counter]
    k0, k1 = int(key[0]) & mask, int(key[1]) & mask
    for r in range(ROUNDS):
        if r:  # the key is bumped between rounds, as in Random123's philox4x32_R
            k0 = (k0 + 0x9E3779B9) & mask
            k1 = (k1 + 0xBB67AE85) & mask
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & mask, (p0 >> 32) ^ c[3] ^ k1, p0 & mask]
    return tuple(c)


def philox_blocks(seed, epoch, indices, blocks) -> np.ndarray:
    """Raw draws for counters (index, block, 0, 0), key (seed, epoch).

    indices (N,) int, blocks (B,) int -> (N, B, 4) uint32. Worked in row chunks that stay in the
    CPU cache, which is several times faster than one pass over a 60,000 x 421 array."""
    indices = np.asarray(indices).astype(np.uint32).reshape(-1)
    blocks = np.asarray(blocks).astype(np.uint32).reshape(-1)
    key = (np.uint32(seed), np.uint32(epoch))
    keys = round_keys(key)
    n, b = len(indices), len(blocks)
    out = np.empty((n, b, 4), dtype=np.uint32)
    rows = max(1, 32768 // max(b, 1))
    block_col = blocks.astype(np.uint64)[None, :]
    for start in range(0, n, rows):
        idx = indices[start:start + rows].astype(np.uint64)[:, None]
        m = len(idx)
        c0 = np.broadcast_to(idx, (m, b)).copy()
        c1 = np.broadcast_to(block_col, (m, b)).copy()
        c2 = np.zeros((m, b), dtype=np.uint64)
        c3 = np.zeros((m, b), dtype=np.uint64)
        p0 = np.empty_like(c0)
        p1 = np.empty_like(c0)
        for k0, k1 in keys:
            np.multiply(c0, PHILOX_M0, out=p0)
            np.multiply(c2, PHILOX_M1, out=p1)
            # new c0 = hi(p1) ^ c1 ^ k0; new c2 = hi(p0) ^ c3 ^ k1; new c1 = lo(p1); new c3 = lo(p0)
            np.right_shift(p1, _SHIFT32, out=c0)
            np.bitwise_xor(c0, c1, out=c0)
            np.bitwise_xor(c0, k0, out=c0)
            np.right_shift(p0, _SHIFT32, out=c2)
            np.bitwise_xor(c2, c3, out=c2)
            np.bitwise_xor(c2, k1, out=c2)
            np.bitwise_and(p1, _LOW32, out=c1)
            np.bitwise_and(p0, _LOW32, out=c3)
        chunk = out[start:start + m]
        chunk[..., 0] = c0
        chunk[..., 1] = c1
        chunk[..., 2] = c2
        chunk[..., 3] = c3
    return out


def philox_fill_ref(seed, epoch, indices, n_blocks: int) -> np.ndarray:
    """What the test kernel `philox_fill` writes: the raw draws of blocks 0 .. n_blocks-1.

    indices (N,) int -> (N, n_blocks * 4) uint32, row i = words of counters (indices[i], b, 0, 0)
    for b = 0, 1, ..., key (seed, epoch)."""
    draws = philox_blocks(seed, epoch, indices, np.arange(n_blocks))
    return draws.reshape(len(draws), n_blocks * 4)


def uniform01(x: np.ndarray) -> np.ndarray:
    """uint32 -> float32 in [0, 1): (x >> 8) * 2^-24, exact (any shape)."""
    return ((np.asarray(x, dtype=np.uint32) >> np.uint32(8)).astype(np.float32)
            * np.float32(2.0 ** -24)).astype(np.float32)


def uniform_pm1(x: np.ndarray) -> np.ndarray:
    """uint32 -> float32 in [-1, 1): 2 u - 1, exact (any shape).

    Written as (x >> 8) 2^-23 - 1, which is the same value (every step is exact) in two passes."""
    k = (np.asarray(x, dtype=np.uint32) >> np.uint32(8)).astype(np.float32)
    k *= np.float32(2.0 ** -23)
    k -= np.float32(1.0)
    return k
