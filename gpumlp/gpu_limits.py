"""What the GPUs the profiler reports against can do: peak DRAM bandwidth and FP32 rate of known
parts, the per-SM limits of each architecture, and the theoretical occupancy they allow a kernel.
Pure arithmetic: no GPU is needed (on one, gpumlp.profile reads the limits from the device)."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    name: str
    bandwidth: float        # bytes/s, DRAM
    fp32: float             # FLOP/s, FP32 without tensor cores


# Data-sheet peaks: DRAM bandwidth and FP32 without tensor cores.
H100 = Peak("H100 SXM", 3.35e12, 66.9e12)
A100 = Peak("A100 80GB", 2.0e12, 19.5e12)
GTX_280 = Peak("GTX 280", 0.1417e12, 0.933e12)

# Matched against the words of the device name (as CUDA reports it, e.g. "NVIDIA A100-SXM4-80GB"),
# first hit wins: every listed word must be one of the name's words, so specific rows come first.
KNOWN_PEAKS = [
    (("h100", "pcie"), Peak("H100 PCIe", 2.0e12, 51.2e12)),
    (("h100",), H100),
    (("h200",), Peak("H200", 4.8e12, 66.9e12)),
    (("a100", "80gb"), A100),
    (("a100",), Peak("A100 40GB", 1.555e12, 19.5e12)),
    (("4090",), Peak("RTX 4090", 1.008e12, 82.6e12)),
    (("l4",), Peak("L4", 0.3e12, 30.3e12)),
    (("t4",), Peak("T4", 0.32e12, 8.1e12)),
    (("v100",), Peak("V100", 0.9e12, 15.7e12)),
    (("gtx", "280"), GTX_280),
]


def known_peak(device_name: str) -> Peak | None:
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    for wanted, peak in KNOWN_PEAKS:
        if words.issuperset(wanted):
            return peak
    return None


def fp32_lanes_per_sm(major: int, minor: int) -> int:
    """FP32 lanes per SM, which turn SM count and clock into an FP32 peak: 64 on Turing and on
    A100 (sm_80), 128 on the other Ampere parts, Ada, Hopper and Blackwell."""
    return 64 if major < 8 or (major, minor) == (8, 0) else 128


# -- occupancy -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits (CUDA Programming Guide, technical specifications per compute capability).
    Turing (sm_75) holds 1024 threads per SM; Ampere GA10x, Ada and consumer Blackwell 1536; the
    data-centre parts 2048."""
    max_threads_per_sm: int
    max_blocks_per_sm: int
    shared_per_sm: int              # the largest shared-memory carveout
    shared_reserved_per_block: int  # what the system keeps of each block's shared memory
    shared_granularity: int = 128
    registers_per_sm: int = 65536
    register_granularity: int = 256  # registers are allocated per warp in units of 256


ARCH_LIMITS = {
    75: ArchLimits(1024, 16, 64 * 1024, 0, shared_granularity=256),
    80: ArchLimits(2048, 32, 164 * 1024, 1024),
    86: ArchLimits(1536, 16, 100 * 1024, 1024),
    89: ArchLimits(1536, 24, 100 * 1024, 1024),
    90: ArchLimits(2048, 32, 228 * 1024, 1024),
    100: ArchLimits(2048, 32, 228 * 1024, 1024),
    120: ArchLimits(1536, 32, 100 * 1024, 1024),
}


def arch_number(arch: str) -> int:
    return int(arch.removeprefix("sm_"))


def arch_limits(arch: str) -> ArchLimits:
    """The limits of `arch`, or of the closest older generation listed (sm_103 is sm_100's)."""
    number = arch_number(arch)
    known = [a for a in ARCH_LIMITS if a <= number]
    if not known:
        raise ValueError(f"no occupancy limits for {arch} (the oldest known is sm_{min(ARCH_LIMITS)})")
    return ARCH_LIMITS[max(known)]


@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    max_warps_per_sm: int
    limiter: str

    @property
    def fraction(self) -> float:
        return self.warps_per_sm / self.max_warps_per_sm


def theoretical_occupancy(limits: ArchLimits, threads_per_block: int, registers: int,
                          shared_per_block: int) -> Occupancy:
    """Resident blocks and warps per SM for a block of `threads_per_block` threads using
    `registers` per thread and `shared_per_block` bytes of (static + dynamic) shared memory."""
    warps_per_block = -(-threads_per_block // 32)
    max_warps = limits.max_threads_per_sm // 32
    by = {"blocks": limits.max_blocks_per_sm, "threads": max_warps // warps_per_block}
    if registers:
        registers_per_warp = _round_up(registers * 32, limits.register_granularity)
        by["registers"] = (limits.registers_per_sm // registers_per_warp) // warps_per_block
    if shared_per_block:
        allocated = _round_up(shared_per_block + limits.shared_reserved_per_block, limits.shared_granularity)
        by["shared memory"] = limits.shared_per_sm // allocated
    limiter = min(by, key=lambda name: (by[name], name != "threads"))
    blocks = by[limiter]
    return Occupancy(blocks, blocks * warps_per_block, max_warps, limiter)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


