"""The spread online engine (`--engine spread`): one cooperative launch of cuda_kernels/mlp_spread.cu
trains a chunk of consecutive images, every hidden layer's rows spread over the whole grid and kept
in registers, shared memory or L2 (gpumlp/spread_plan.py; the kernel's header describes the design).

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
    resident_blocks: int
    why: str


def storage_line(sizes, blocks: int, capacity: int) -> str:
    """Where the busiest block (the most weights) keeps its weights, in KiB."""
    def kib(rows):
        return sum(r * n_in for r, n_in in zip(rows, sizes[:-1])) * spread_plan.F32 / 1024
    places = [spread_plan.block_storage(sizes, b, blocks, capacity) for b in range(blocks)]
    busiest = max(places, key=lambda s: kib(s.register_rows) + kib(s.shared_rows) + kib(s.global_rows))
    return (f"the busiest block's weights: {kib(busiest.register_rows):,.1f} KiB in registers, "
            f"{kib(busiest.shared_rows):,.1f} KiB in shared memory, {kib(busiest.global_rows):,.1f} KiB in global memory")


def plan_launch(device, kernel, sizes, blocks: int | None = None,
                shared_weight_floats: int | None = None) -> SpreadLaunch:
    """The grid (every resident block, or `blocks`) and the shared memory for weights: all the
    busiest block's non-register rows where they fit, else as many as the device allows per block
    (or `shared_weight_floats`, for tests)."""
    threads = spread_plan.THREADS
    # The scratch is largest for one block: the grid that holds it holds any smaller scratch.
    resident = device.resident_blocks(kernel, threads, spread_plan.F32 * spread_plan.scratch_floats(sizes, 1))
    if resident < 1:
        raise UserError("the spread kernel cannot be resident on this device")
    grid = resident if blocks is None else int(blocks)
    if not 1 <= grid <= resident:
        raise UserError(f"the spread engine's grid must have 1 to {resident} blocks, got {grid}")
    scratch = spread_plan.scratch_floats(sizes, grid)
    room = max(device.max_dynamic_shared(kernel) // spread_plan.F32 - scratch, 0)
    needed = spread_plan.shared_weight_floats_needed(sizes, grid)
    capacity = min(needed, room) if shared_weight_floats is None else int(shared_weight_floats)
    if not 0 <= capacity <= room:
        raise UserError(f"the spread engine's shared weights must be 0 to {room:,} floats per block, got {capacity:,}")
    shared_bytes = spread_plan.F32 * (scratch + capacity)
    if device.resident_blocks(kernel, threads, shared_bytes) < grid:
        raise UserError(f"{shared_bytes:,} bytes of shared memory per block leave fewer than {grid} blocks resident")
    register_layer = spread_plan.register_layer(sizes, grid)
    return SpreadLaunch(grid, register_layer, capacity, shared_bytes, resident,
                        f"{grid} blocks of {threads} threads ({resident} resident), register tile on layer "
                        f"{register_layer}, {storage_line(sizes, grid, capacity)}")


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
        self.plan = plan_launch(d, self.kernel, self.sizes, blocks, shared_weight_floats)
        log(f"spread engine: {self.plan.why}")
        self.partial = d.empty(max(spread_plan.partial_floats(self.sizes, self.plan.blocks), 1))

    def launch(self, steps: int) -> None:
        """`steps` online SGD steps from the device cursor on, in one cooperative launch."""
        args = self.common_args(steps) + (np.int32(self.plan.register_layer), np.int32(self.plan.shared_weight_floats))
        self.device.launch_cooperative(self.kernel, (self.plan.blocks,), (spread_plan.THREADS,), args,
                                       shared_mem=self.plan.shared_bytes, indirect=self.layer_arrays)
