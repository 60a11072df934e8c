"""What the emulator's mechanisms cost on this machine: `python -m gpumlp.emulator.benchmark`."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gpumlp.emulator import guarded_empty, load_module

SOURCE = Path(__file__).with_name("benchmark.cu")


def _best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


# The checks whose cost is measured, each alone on top of none (Module keyword arguments).
BARE = dict(memcheck=False, flush_to_zero=False)
CHECKS = {
    "no checks": {},
    "memcheck": dict(memcheck=True),
    "flush_to_zero": dict(flush_to_zero=True),
    "poison_shared + reverse_threads": dict(poison_shared=True, reverse_threads=True),
    "compare_block_orders": dict(compare_block_orders=True),
}


def measure() -> dict[str, float]:
    module = load_module(SOURCE, **BARE)
    x = np.zeros(1, np.float32)
    barriers = module.get_function("barriers")
    count = 20000

    def per_barrier(threads):
        return _best_seconds(lambda: barriers(1, threads, (x, np.int32(count))), 3) / count

    # One thread releases its own barrier without a switch; two threads need two switches.
    one_thread, two_threads = per_barrier(1), per_barrier(2)
    full_block = per_barrier(256) / 256
    results = {
        "barrier bookkeeping, 1-thread block (ns)": one_thread * 1e9,
        "context switch, (2-thread barrier - 2 x 1-thread barrier) / 2 (ns)": (two_threads - 2 * one_thread) / 2 * 1e9,
        "__syncthreads per thread, 256-thread block (ns)": full_block * 1e9,
    }

    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 784)).astype(np.float32)
    b = rng.standard_normal((784, 256)).astype(np.float32)
    c = np.zeros((64, 256), np.float32)
    wide = np.zeros((2000, 2500), np.float32)   # the largest weight matrix of the paper's nets
    guarded = guarded_empty((2000, 2500))         # the same, allocated as EmulatedDevice allocates
    for label, checks in CHECKS.items():
        checked = load_module(SOURCE, **{**BARE, **checks})
        gemm, empty = checked.get_function("tiled_gemm"), checked.get_function("empty")
        seconds = _best_seconds(
            lambda: gemm((256 // 16, 64 // 16), (16, 16), (a, b, c, np.int32(64), np.int32(784), np.int32(256))), 3)
        assert np.allclose(c, a @ b, rtol=1e-3, atol=1e-3)
        results[f"16x16-tiled GEMM 64x784 @ 784x256, {label} (ms)"] = seconds * 1e3
        small = _best_seconds(lambda: [empty(1, 1, (x,)) for _ in range(2000)], 3) / 2000
        results[f"launch of an empty 1-thread kernel with one 4-byte array, {label} (us)"] = small * 1e6
        large = _best_seconds(lambda: empty(1, 1, (wide,)), 3)
        results[f"empty kernel with one 2000x2500 float array, {label} (us)"] = large * 1e6
        in_place = _best_seconds(lambda: empty(1, 1, (guarded,)), 3)
        results[f"the same, the array from EmulatedDevice, {label} (us)"] = in_place * 1e6
    return results


if __name__ == "__main__":
    for label, value in measure().items():
        print(f"{label:80s} {value:10.1f}")
