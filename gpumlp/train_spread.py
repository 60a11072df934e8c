"""The spread online engine (`--engine spread`): one cooperative launch of cuda_kernels/mlp_spread.cu
trains a chunk of consecutive images, every hidden layer's rows spread over the whole grid and kept
in registers, shared memory or L2, the output layer replicated in every block's shared memory
(gpumlp/spread_plan.py; the kernel's header describes the design).

It sums in another order than the graph and persistent engines, so its weights are not theirs bit
for bit: tests/test_spread.py holds it to the numpy reference within the sum-length bounds of
gpumlp/tolerances.py. Its own result is the same bits in every block order and wherever the
weights are kept. Everything else is the graph engine's (CooperativeTrainer, DeviceTrainer).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpumlp import spread_plan
from gpumlp.errors import UserError
from gpumlp.train_persistent import CooperativeTrainer

SOURCE = "mlp_spread.cu"
KERNEL = "train_online_spread"


@dataclass(frozen=True)
class SpreadLaunch:
    blocks: int
    register_layer: int          # the hidden layer of the register tile, -1 for none
    shared_weight_floats: int    # the capacity of the weight part of dynamic shared memory
    shared_bytes: int            # all dynamic shared memory per block
    output_velocities: bool      # the output layer's copy holds its velocities (momentum != 0)
    resident_blocks: int
    why: str


def kib(floats: int) -> float:
    return floats * spread_plan.F32 / 1024


def storage_line(sizes, blocks: int, capacity: int, momentum: bool) -> str:
    """Where the busiest block (the most hidden-layer weights) keeps its weights, in KiB, and the
    output layer's copy every block keeps."""
    def floats(rows):
        return sum(r * n_in for r, n_in in zip(rows, sizes[:-1]))
    places = [spread_plan.block_storage(sizes, b, blocks, capacity) for b in range(blocks)]
    busiest = max(places, key=lambda s: floats(s.register_rows) + floats(s.shared_rows) + floats(s.global_rows))
    copy = spread_plan.output_copy_floats(sizes, momentum)
    return (f"the busiest block's hidden weights: {kib(floats(busiest.register_rows)):,.1f} KiB in registers, "
            f"{kib(floats(busiest.shared_rows)):,.1f} KiB in shared memory, "
            f"{kib(floats(busiest.global_rows)):,.1f} KiB in global memory; the output layer "
            f"({sizes[-1]} x {sizes[-2]}{' and its velocities' if momentum else ''}) replicated in shared "
            f"memory in every block ({kib(copy):,.1f} KiB)")


def plan_launch(device, kernel, sizes, momentum: bool, blocks: int | None = None,
                shared_weight_floats: int | None = None) -> SpreadLaunch:
    """The grid (every resident block, or `blocks`) and the shared memory for weights: all the
    busiest block's non-register rows where they fit, else as many as the device allows per block
    (or `shared_weight_floats`, for tests). The scratch holds the output layer's copy (with its
    velocities when `momentum`): a net whose copy does not fit is refused."""
    threads = spread_plan.THREADS
    most = device.max_dynamic_shared(kernel)
    copy = spread_plan.output_copy_floats(sizes, momentum)

    def refuse_copy(scratch_floats: int):
        raise UserError(f"--engine spread: every block keeps a copy of the output layer ({sizes[-1]} x {sizes[-2]}"
                        f"{' and its velocities' if momentum else ''}, {kib(copy):,.1f} KiB; "
                        f"{kib(scratch_floats):,.1f} KiB of scratch in all) in shared memory, more than the "
                        f"{most / 1024:,.1f} KiB a block may have")
    if spread_plan.F32 * copy > most:
        refuse_copy(copy)
    # A first estimate of the grid from the copy alone (the rest of the scratch depends on the
    # grid); the shared memory of the real grid is checked below.
    resident = device.resident_blocks(kernel, threads, spread_plan.F32 * copy)
    if resident < 1:
        raise UserError("the spread kernel cannot be resident on this device")
    grid = resident if blocks is None else int(blocks)
    if not 1 <= grid <= resident:
        raise UserError(f"the spread engine's grid must have 1 to {resident} blocks, got {grid}")
    scratch = spread_plan.scratch_floats(sizes, grid, momentum)
    if spread_plan.F32 * scratch > most:
        refuse_copy(scratch)
    room = max(most // spread_plan.F32 - scratch, 0)
    needed = spread_plan.shared_weight_floats_needed(sizes, grid)
    capacity = min(needed, room) if shared_weight_floats is None else int(shared_weight_floats)
    if not 0 <= capacity <= room:
        raise UserError(f"the spread engine's shared weights must be 0 to {room:,} floats per block, got {capacity:,}")
    shared_bytes = spread_plan.F32 * (scratch + capacity)
    if device.resident_blocks(kernel, threads, shared_bytes) < grid:
        raise UserError(f"{shared_bytes:,} bytes of shared memory per block leave fewer than {grid} blocks resident")
    register_layer = spread_plan.register_layer(sizes, grid)
    return SpreadLaunch(grid, register_layer, capacity, shared_bytes, bool(momentum), resident,
                        f"{grid} blocks of {threads} threads ({resident} resident), register tile on layer "
                        f"{register_layer}, {spread_plan.grid_syncs_per_image(sizes)} grid barriers per image, "
                        f"{kib(scratch):,.1f} KiB of scratch, {storage_line(sizes, grid, capacity, momentum)}")


class SpreadTrainer(CooperativeTrainer):
    engine = "spread"

    def __init__(self, device, params, split, config, log=print, blocks: int | None = None,
                 shared_weight_floats: int | None = None):
        reason = spread_plan.unsupported_reason(config.sizes, config.batch_size)
        if reason is not None:
            raise UserError(f"--engine spread: {reason}")
        super().__init__(device, params, split, config, log)
        d = device
        self.kernel = d.cooperative_kernel(SOURCE, KERNEL)
        self.plan = plan_launch(d, self.kernel, self.sizes, bool(config.momentum), blocks, shared_weight_floats)
        log(f"spread engine: {self.plan.why}")
        self.partial = d.empty(max(spread_plan.partial_floats(self.sizes, self.plan.blocks), 1))

    def launch(self, steps: int) -> None:
        """`steps` online SGD steps from the device cursor on, in one cooperative launch."""
        args = self.common_args(steps) + (np.int32(self.plan.register_layer), np.int32(self.plan.shared_weight_floats),
                                          np.int32(self.plan.output_velocities))
        self.device.launch_cooperative(self.kernel, (self.plan.blocks,), (spread_plan.THREADS,), args,
                                       shared_mem=self.plan.shared_bytes, indirect=self.layer_arrays)
