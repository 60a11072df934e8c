"""Cooperative launches on the emulator: every block of the grid resident at once, and
`cooperative_groups::this_grid().sync()` a barrier of the whole grid (scheduler.c).

A GPU refuses a cooperative grid larger than what can be resident (cudaErrorCooperativeLaunchTooLarge):
resident blocks per SM, from the kernel's threads, registers and shared memory, times the SM count.
The emulator applies the same rule to a nominal device, an H100 SXM (132 SMs, sm_90 limits).
"""
from __future__ import annotations

from dataclasses import dataclass

from gpumlp.gpu_limits import arch_limits, theoretical_occupancy

MAX_THREADS = 16 * 1024   # threads of one cooperative launch (scheduler.c MAX_COOPERATIVE_THREADS)


@dataclass(frozen=True)
class NominalDevice:
    name: str
    sm_count: int
    arch: str


NOMINAL_DEVICE = NominalDevice("H100 SXM (nominal, emulated)", 132, "sm_90")


def resident_block_limit(threads_per_block: int, registers_per_thread: int, shared_per_block: int,
                         device: NominalDevice = NOMINAL_DEVICE) -> int:
    """The largest cooperative grid `device` accepts for blocks of this shape (0: none fits)."""
    occupancy = theoretical_occupancy(arch_limits(device.arch), threads_per_block, registers_per_thread,
                                      shared_per_block)
    return occupancy.blocks_per_sm * device.sm_count
