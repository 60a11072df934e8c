"""Cooperative launches on the emulator: every block of the grid resident at once, and
`cooperative_groups::this_grid().sync()` a barrier of the whole grid (scheduler.c).

A GPU refuses a cooperative grid larger than what can be resident (cudaErrorCooperativeLaunchTooLarge):
resident blocks per SM, from the kernel's threads, registers and shared memory, times the SM count.
The emulator applies the same rule to a nominal device, an H100 SXM (132 SMs, sm_90 limits).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from gpumlp.gpu_limits import arch_limits, theoretical_occupancy

BLOCK_ORDERS = {"launch": 0, "reversed": 1, "shuffled": 2}
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


class _ModuleMemory(ctypes.Structure):
    _fields_ = [("static_begin", ctypes.c_void_p), ("static_end", ctypes.c_void_p),
                ("dynamic", ctypes.c_void_p), ("dynamic_capacity", ctypes.c_size_t)]


def static_shared_bytes(module) -> int:
    """Bytes of the module's static __shared__ variables (every kernel of the module has them)."""
    memory = _ModuleMemory.from_address(module.memory)
    return int(memory.static_end - memory.static_begin)


def _launcher(runtime):
    function = runtime.gpumlp_launch_cooperative
    if function.argtypes is None:
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int,
                             ctypes.c_int, ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_size_t]
    return function
