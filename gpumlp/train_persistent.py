"""The persistent online engine (`--engine persistent`): one cooperative launch of
cuda_kernels/mlp_persistent.cu trains a chunk of consecutive images, each block owning the same
32-row chunks of every layer for the whole launch (the kernel's header describes the design).

Everything else is the graph engine's (DeviceTrainer): the uploads, the per-epoch deformation, the
order and the device cursor, the loss and error totals, evaluation and the state for checkpoints.
Both engines do the same arithmetic in the same order and end with the same weights, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpumlp.errors import UserError
from gpumlp.train_gpu import DeviceTrainer

SOURCE = "mlp_persistent.cu"
KERNEL = "train_online_persistent"
# Must match the #defines of mlp_persistent.cu.
PERSISTENT_THREADS = 256
CHUNK_ROWS = 32
MAX_LAYERS = 12
MAX_CLASSES = CHUNK_ROWS     # the output layer is one chunk: its owner does the softmax alone
LAYER_ARRAYS = 5             # W, b, vW, vb, y per layer in the kernels' table (layer_table.cuh)

LAUNCH_STEPS_CUDA = 1000     # images per launch: progress and Ctrl-C stay responsive
LAUNCH_STEPS_EMULATED = 64
ENGINES = ("auto", "graph", "persistent", "spread")


def layer_chunks(sizes) -> list[int]:
    """Chunks of CHUNK_ROWS rows of each layer."""
    return [-(-n_out // CHUNK_ROWS) for n_out in sizes[1:]]


def owned_weights(sizes, blocks: int) -> list[int]:
    """Weights each block owns when layer l's chunk c goes to block (chunks below l + c) % blocks,
    as the kernel deals them."""
    owned = [0] * blocks
    dealt = 0
    for n_in, n_out, chunks in zip(sizes[:-1], sizes[1:], layer_chunks(sizes)):
        for c in range(chunks):
            owned[(dealt + c) % blocks] += min(CHUNK_ROWS, n_out - c * CHUNK_ROWS) * n_in
        dealt += chunks
    return owned


def grid_syncs_per_image(sizes) -> int:
    """Grid-wide barriers per image: after every forward layer but the last, and after every
    backward layer but the first."""
    return 2 * (len(sizes) - 2)


def unsupported_reason(sizes, batch_size: int) -> str | None:
    """Why the persistent kernel cannot train this net (None: it can)."""
    if batch_size != 1:
        return f"it trains online only (batch size 1), not batch size {batch_size}"
    if len(sizes) - 1 > MAX_LAYERS:
        return f"it takes at most {MAX_LAYERS} layers, the net has {len(sizes) - 1}"
    if sizes[-1] > MAX_CLASSES:
        return f"the output layer must have at most {MAX_CLASSES} units, the net has {sizes[-1]}"
    return None


@dataclass(frozen=True)
class LaunchPlan:
    blocks: int
    weights_in_shared: bool
    shared_bytes: int        # dynamic shared memory per block
    resident_blocks: int     # what the device holds resident (blocks per SM x SMs)
    why: str


def plan_launch(device, kernel, sizes, blocks: int | None = None, weights_in_shared: bool | None = None) -> LaunchPlan:
    """The grid (one block per chunk, at most what is resident) and where the weights live: in
    shared memory when every block's rows fit, else read from global memory (L2)."""
    chunks = sum(layer_chunks(sizes))
    x_bytes = 4 * max(sizes[:-1])    # the layer's input, read by every warp of the block
    resident = device.resident_blocks(kernel, PERSISTENT_THREADS, x_bytes)
    if resident < 1:
        raise UserError("the persistent kernel cannot be resident on this device")
    grid = min(chunks, resident) if blocks is None else int(blocks)
    if not 1 <= grid <= resident:
        raise UserError(f"the persistent engine's grid must have 1 to {resident} blocks, got {grid}")
    shared = 4 * max(owned_weights(sizes, grid))
    fits = device.resident_blocks(kernel, PERSISTENT_THREADS, x_bytes + shared) >= grid
    use_shared = fits if weights_in_shared is None else bool(weights_in_shared)
    if use_shared and not fits:
        raise UserError(f"{shared:,} bytes of weights per block do not fit in shared memory at {grid} blocks")
    where = (f"weights in shared memory ({shared / 1024:,.1f} KiB per block)" if use_shared
             else f"weights read from global memory ({shared / 1024:,.1f} KiB per block would not fit on chip)")
    return LaunchPlan(grid, use_shared, x_bytes + (shared if use_shared else 0), resident,
                      f"{grid} blocks of {PERSISTENT_THREADS} threads ({chunks} row chunks, {resident} resident), {where}")


def cooperative_reason(device) -> str | None:
    """Why the device cannot run a cooperative engine (None: it can)."""
    if device.supports_cooperative_launch():
        return None
    return "the device cannot launch kernels cooperatively (cudaDevAttrCooperativeLaunch is 0)"


def choose_engine(requested: str, device, sizes, batch_size: int) -> tuple[str, str]:
    """(engine, why): auto takes persistent where the device can launch cooperatively and the net
    fits the kernel's limits, else graph; spread only when requested."""
    if requested == "graph":
        return "graph", "requested"
    if requested == "spread":   # never auto's choice: it sums in another order (its own tolerance)
        from gpumlp import spread_plan
        reason = spread_plan.unsupported_reason(sizes, batch_size) or cooperative_reason(device)
        if reason is not None:
            raise UserError(f"--engine spread: {reason}")
        return "spread", "requested"
    reason = unsupported_reason(sizes, batch_size) or cooperative_reason(device)
    if requested == "persistent":
        if reason is not None:
            raise UserError(f"--engine persistent: {reason}")
        return "persistent", "requested"
    if reason is not None:
        return "graph", f"the persistent engine does not apply: {reason}"
    return "persistent", "the device launches cooperatively and the net fits the persistent kernel"


class CooperativeTrainer(DeviceTrainer):
    """What the engines of one cooperative launch per chunk of images share (PersistentTrainer,
    train_spread.SpreadTrainer): the kernel's table of layer arrays, the grid barrier, and an epoch
    as launches of `launch_steps` images."""

    def __init__(self, device, params, split, config, log=print):
        super().__init__(device, params, split, config, log)
        d = device
        self.launch_steps = LAUNCH_STEPS_EMULATED if d.is_emulated else LAUNCH_STEPS_CUDA
        activations = self.buffers[1]["activations"]
        # The arrays the kernel reaches through the table's addresses: the device's own
        # allocations, so that the emulator's memcheck guards them (EmulatedDevice.launch_cooperative).
        self.layer_arrays = []
        for layer, (W, b) in enumerate(self.params):
            vW, vb = self.velocities[layer] if self.velocities else (W, b)   # untouched without momentum
            self.layer_arrays += [W, b, vW, vb, activations[layer]]
        self.layer_table = d.asarray(np.array([d.address(a) for a in self.layer_arrays], np.uint64))
        self.layer_sizes = d.asarray(np.array(self.sizes, np.int32))
        self.barrier = d.zeros(1, np.uint32)

    def common_args(self, steps: int) -> tuple:
        """The arguments both cooperative kernels begin with, up to n_samples."""
        return (self.layer_table, self.layer_sizes, self.partial, self.epoch_images, self.train_labels, self.order,
                self.cursor, self.loss_total, self.wrong_total, self.hyper.array, self.barrier,
                np.int32(len(self.sizes) - 1), np.int32(steps), np.int32(self.n_train))

    def launch(self, steps: int) -> None:
        raise NotImplementedError

    def train_epoch(self, epoch: int, lr: float, order: np.ndarray, progress=None):
        self.begin_epoch(epoch, lr, order)   # lr into self.hyper, which the kernel reads
        for done in range(0, len(order), self.launch_steps):
            steps = min(self.launch_steps, len(order) - done)
            self.launch(steps)
            if progress is not None:
                progress(done + steps)
        return self.epoch_totals(len(order))


class PersistentTrainer(CooperativeTrainer):
    engine = "persistent"

    def __init__(self, device, params, split, config, log=print, blocks: int | None = None,
                 weights_in_shared: bool | None = None):
        reason = unsupported_reason(config.sizes, config.batch_size)
        if reason is not None:
            raise UserError(f"--engine persistent: {reason}")
        super().__init__(device, params, split, config, log)
        d = device
        self.kernel = d.cooperative_kernel(SOURCE, KERNEL)
        self.plan = plan_launch(d, self.kernel, self.sizes, blocks, weights_in_shared)
        log(f"persistent engine: {self.plan.why}")
        partials = sum(c * n_in for c, n_in in zip(layer_chunks(self.sizes)[1:], self.sizes[1:-1]))
        self.partial = d.empty(max(partials, 1))

    def launch(self, steps: int) -> None:
        """`steps` online SGD steps from the device cursor on, in one cooperative launch."""
        args = self.common_args(steps) + (np.int32(self.plan.weights_in_shared),)
        self.device.launch_cooperative(self.kernel, (self.plan.blocks,), (PERSISTENT_THREADS,), args,
                                       shared_mem=self.plan.shared_bytes, indirect=self.layer_arrays)
