"""What the profiler's models of the one-kernel engines (persistent_model, spread_model) share:
the modelled device (data-sheet figures of an H100 SXM plus the assumptions named in ASSUMED),
the cost of one phase of a block, and the closing lines of a model's report.

A phase is the work a block does between two grid-wide barriers. It takes the longest of its
shared-memory traffic at the SM's shared-memory bandwidth, its global traffic at its share of L2
(or HBM) bandwidth and its FLOPs at the SM's FP32 rate, plus one L2 round trip (each phase starts
by reading what other blocks wrote; a model may count more where a phase's reads wait for each
other). Nothing here has been measured on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from gpumlp.gpu_limits import H100

F32 = 4
MNIST_TRAIN_IMAGES = 60_000
EPOCHS = 800


@dataclass(frozen=True)
class ModelDevice:
    name: str
    sms: int
    clock_hz: float              # from the FP32 peak: SMs x 128 lanes x 2 FLOPs x clock
    hbm_bandwidth: float         # bytes/s
    l2_bytes: int
    l2_bandwidth: float          # bytes/s, whole chip (assumed)
    l2_bandwidth_per_sm: float   # bytes/s one SM can draw from L2 (assumed)
    shared_bandwidth_per_sm: float
    grid_sync_seconds: float     # one grid-wide barrier (assumed)
    l2_round_trip_seconds: float


H100_SXM = ModelDevice(
    name="H100 SXM", sms=132, clock_hz=H100.fp32 / (132 * 128 * 2), hbm_bandwidth=H100.bandwidth,
    l2_bytes=50 * 2**20, l2_bandwidth=5.5e12, l2_bandwidth_per_sm=64 * H100.fp32 / (132 * 128 * 2),
    shared_bandwidth_per_sm=128 * H100.fp32 / (132 * 128 * 2), grid_sync_seconds=1e-6,
    l2_round_trip_seconds=0.3e-6)

ASSUMED = ("L2 bandwidth 5.5 TB/s for the chip and 64 B/clock per SM; shared memory 128 B/clock per SM; "
           "one grid barrier 1 us; one L2 round trip (0.3 us) at the start of every phase; "
           "weights that fit in L2 stay there")


@dataclass
class Phase:
    name: str
    rows: int            # rows the busiest block owns in this layer
    shared_bytes: int    # its shared-memory traffic
    global_bytes: int    # its L2 / HBM traffic
    flops: int
    seconds: float
    bound: str


def resource_times(shared_bytes, global_bytes, flops, global_bandwidth, device: ModelDevice) -> dict[str, float]:
    """One block's shared, global and FP32 times for some work, by the resource's name."""
    return {"shared memory": shared_bytes / device.shared_bandwidth_per_sm,
            "L2/HBM bandwidth": global_bytes / global_bandwidth,
            "FP32": flops / (128 * 2 * device.clock_hz)}


def phase_cost(name, rows, shared_bytes, global_bytes, flops, global_bandwidth, device: ModelDevice,
               round_trips: int = 1) -> Phase:
    """One block's phase: the longest of its shared, global and FP32 times, plus its L2 round trips
    (the global reads that wait for each other or for a barrier: one unless told)."""
    times = resource_times(shared_bytes, global_bytes, flops, global_bandwidth, device)
    bound = max(times, key=times.get)
    if times[bound] < device.l2_round_trip_seconds:
        bound = "latency"
    return Phase(name, rows, shared_bytes, global_bytes, flops,
                 max(times.values()) + round_trips * device.l2_round_trip_seconds, bound)


def global_share(device: ModelDevice, blocks: int, from_hbm: bool) -> float:
    """A block's share of L2 (or HBM) bandwidth when `blocks` blocks, on as many SMs, read at once."""
    share = min(device.l2_bandwidth / blocks, device.l2_bandwidth_per_sm)
    return min(device.hbm_bandwidth / blocks, share) if from_hbm else share


def mb(n: int) -> str:
    return f"{n / 1e6:,.3f} MB"


def closing_lines(per_image_seconds: float, bound: str) -> list[str]:
    """The expected time per image, per epoch and for the paper's 800 epochs, and the assumptions."""
    epoch = per_image_seconds * MNIST_TRAIN_IMAGES
    return [f"expected: {per_image_seconds * 1e6:.1f} us per image, bound by {bound}; "
            f"{epoch:.2f} s per epoch of {MNIST_TRAIN_IMAGES:,} images, {epoch * EPOCHS / 60:,.0f} min for {EPOCHS} epochs",
            f"assumed: {ASSUMED}"]
