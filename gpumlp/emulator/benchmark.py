"""What the emulator's mechanisms cost on this machine: `python -m gpumlp.emulator.benchmark`."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gpumlp.emulator import load_module

SOURCE = Path(__file__).with_name("benchmark.cu")


def _best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure() -> dict[str, float]:
    module = load_module(SOURCE)
    x = np.zeros(1, np.float32)
    empty = module.get_function("empty")
    launches = 2000
    per_launch = _best_seconds(lambda: [empty(1, 1, (x,)) for _ in range(launches)], 3) / launches

    barriers = module.get_function("barriers")
    count = 20000

    def per_barrier(threads):
        return _best_seconds(lambda: barriers(1, threads, (x, np.int32(count))), 3) / count

    # One thread releases its own barrier without a switch; two threads need two switches.
    one_thread, two_threads = per_barrier(1), per_barrier(2)
    full_block = per_barrier(256) / 256

    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 784)).astype(np.float32)
    b = rng.standard_normal((784, 256)).astype(np.float32)
    c = np.zeros((64, 256), np.float32)
    gemm = module.get_function("tiled_gemm")
    gemm_seconds = _best_seconds(
        lambda: gemm((256 // 16, 64 // 16), (16, 16), (a, b, c, np.int32(64), np.int32(784), np.int32(256))), 3)
    assert np.allclose(c, a @ b, rtol=1e-3, atol=1e-3)
    return {
        "launch overhead of an empty 1-thread kernel (us)": per_launch * 1e6,
        "barrier bookkeeping, 1-thread block (ns)": one_thread * 1e9,
        "context switch, (2-thread barrier - 2 x 1-thread barrier) / 2 (ns)": (two_threads - 2 * one_thread) / 2 * 1e9,
        "__syncthreads per thread, 256-thread block (ns)": full_block * 1e9,
        "16x16-tiled GEMM 64x784 @ 784x256 (ms)": gemm_seconds * 1e3,
    }


if __name__ == "__main__":
    for label, value in measure().items():
        print(f"{label:70s} {value:10.1f}")
