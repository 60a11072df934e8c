"""The profiler's model of the spread engine (`python -m gpumlp.profile --engine spread`): where each
weight lives (spread_plan: registers, shared memory, global memory, and the output layer replicated
in every block's shared memory), where each byte of an image's step comes from, the grid-wide
barriers, the kernel's resources, and the expected time per image with what bounds it. Nothing here
has been measured on a GPU; the device and its assumptions are engine_model's, shared with the
persistent engine's model. The launch (grid, shared memory for weights) is train_spread.plan_launch's,
on the modelled device.

One block per SM (G = SMs blocks of spread_plan.THREADS threads). A phase is the work between two
grid barriers; it lasts as long as its slowest block, so every block's phase is costed
(engine_model.phase_cost) and the slowest kept. A barrier that ends a phase holding a hidden layer's
update is split (arrive, then wait: grid_group::barrier_arrive / barrier_wait): the blocks arrive
before the steps and take them while the barrier completes, so such a phase costs its slowest block
up to the arrive (with its L2 round trips) plus the longer of one barrier and the slowest block's
work after the arrive (SPLIT_BARRIER). The phases of an image, as cuda_kernels/mlp_spread.cu runs
them (2 L - 3 grid barriers for L >= 3 layers, 2 for L = 2; spread_plan.grid_syncs_per_image).
The biases of the block's hidden rows (and their velocities, with momentum) live in the scratch for
the whole launch, and block 0 keeps the loss and error totals in shared memory: no phase reads or
writes them in global memory.
- forward l, every hidden layer: x = y_{l-1} (n_in) from L2 into shared memory (layer 0: the image,
  its sample, label and next sample, all prefetched into shared memory by the previous image, so no
  load and no wait); the register rows by thread per column (x read once) and a block reduction
  through shared memory, then their biases (shared) and y written; the other rows warp per row (W
  row from shared memory or L2, x and the bias from shared memory, y a sector); a grid barrier;
- output (forward L-1 + softmax + backward L-1 + backward L-2), in every block on its own copy of
  the output layer: one pass of loads (y_{L-2}, and the top hidden layer's input y_{L-3}, or for
  L = 2 the image, the next image and thread 0's label of the next image and sample after it); the
  logits warp per class, the softmax (block 0 adds the loss and error to its totals in shared memory
  and writes the logits), the deltas of the block's rows of layer L-2 from W_out and delta_out
  (thread per row, no partial sums); for L >= 3 the partial pass of the block's rows of layer L-2
  (below); the arrive; then the copy's step (W_out, b_out and their velocities, all in shared memory)
  and the step pass of the block's rows of layer L-2 (below); the wait;
- backward l, hidden layers L-3 .. 0: one pass of loads: for every owner b' of layer l + 1 the
  contiguous segment partial_{l+1}[b', i0..i1) of the block's rows into a shared tile (the 32-byte
  sectors covering each segment), the rows' y (for f'), x = y_{l-1} (layer 0: the image, the next
  image from HBM, and thread 0's label of the next image and sample after it); after a block barrier
  each row's delta from the tile (warp per row, lanes over the owners); then, for l >= 1, the partial
  pass, the arrive, the step pass and the wait; layer 0 keeps one walk that takes the steps (the
  step pass's traffic, with the chain of the old weights computed beside it) and no barrier follows.
The partial pass (layer l >= 1): for every column one fmaf chain of the old weights times delta down
the block's rows, which reads delta[r] from shared memory for every weight (a broadcast: one
wavefront per warp) and each weight where it lives (register tile, shared rows, global rows), writes
no weight and reads no x, and writes the block's partial row (n_in). The step pass: for every column
x[j] read once, delta[r] again for every weight, each weight read and written where it lives (and
its velocity in global memory, with momentum); then the biases' steps in shared memory. So the
weights of a layer with partials are read twice per image in the backward pass, once fused before.
Shared-memory traffic is counted in wavefronts of 128 bytes (the SM's bandwidth per clock): a
warp's access moves 128 bytes, a broadcast or one-lane access costs the same clock.
L2 round trips: the global reads a block's phase waits for after a barrier, as the kernel orders
them: the phase's load pass (none in forward 0 of a launch's later images); the rows of the layer
in global memory, read after x's block barrier. The first image of a launch waits at the launch
start for thread 0's cursor, then order[start], then its label (3 dependent waits), then loads its
image in forward 0: 4 round trips, printed apart. The loads and stores of the shared memory fill
and write-back at the start and end of a launch are spread over its images and left out.
The column walks (NOT_COUNTED): per column, the memory rows (shared rows, then global rows) in
groups of 4 whose loads are issued together: one serial L2 wait per group that holds a global row;
in the step pass (and layer 0's walk) with momentum one per group (the velocities are in global
memory) and one per register row (the register tile's velocity walk is not grouped); the partial
pass, with no stores, could issue a column's loads all together but is counted like the others.
Counted apart and printed beside the figure, not in it, as are the L2 waits of the work after an
arrive.
"""
from __future__ import annotations

from dataclasses import dataclass

from gpumlp import compile_gate, nets
from gpumlp.device import KERNEL_DIR
from gpumlp.engine_model import (F32, H100_SXM, ModelDevice, Phase, closing_lines, global_share, mb, phase_cost,
                                  resource_times)
from gpumlp.errors import UserError
from gpumlp.gpu_limits import arch_limits, theoretical_occupancy
from gpumlp.spread_plan import (REGISTER_COLUMNS, REGISTER_ROWS, THREADS, block_rows, block_storage,
                                grid_syncs_per_image, output_copy_floats, owners, partial_floats, register_layer,
                                unsupported_reason)
from gpumlp.train_spread import KERNEL, SOURCE, plan_launch, storage_line

WARPS = THREADS // 32
NOT_COUNTED = ("latency within a phase beyond its L2 round trips: the column walks wait on L2 in series, per "
               "column once per group of 4 memory rows that holds a row in global memory (the partial pass: its "
               "loads in a column are issued together, and counted the same), and the step pass and backward 0's "
               "walk with momentum once per group of 4 memory rows (the velocities) and once per register row (the "
               "register tile's velocity walk is not grouped); "
               "the issue slots of the multiplies and subtractions beside the FMAs; thread 0's single-word "
               "shared accesses (the sample, label and upcoming sample; block 0's loss and error totals); "
               "the shared memory's fill and write-back once per launch")
SPLIT_BARRIER = ("a barrier whose phase holds a hidden layer's update is split: every block arrives after its "
                 "partial pass (the top layer: after its deltas, for one hidden layer) and steps the weights "
                 "(and the output layer's copy) before it waits; the barrier's 1 us is latency a block can spend "
                 "on its own work after it arrived, so the phase takes its slowest block up to the arrive (with "
                 "its L2 round trips) plus the longer of the barrier and the slowest block's work after the "
                 "arrive (its L2 waits not counted, as the walks' are not): an upper bound where the two "
                 "slowest are different blocks")
WAVEFRONT = 128     # bytes: one shared-memory access of a warp, one clock of the SM's shared memory
SECTOR = 32         # bytes: the unit L2 sends; a lone 4-byte load costs one
COLUMN_GROUP = 4    # memory rows of a column whose loads the update issues together (SP_COLUMN_GROUP)


@dataclass
class AfterArrive:
    """The work a phase ending with a split barrier does between the arrive and the wait."""
    cost: Phase             # of the slowest block after the arrive (no L2 round trip: NOT_COUNTED)
    block: int              # which block that is
    register_bytes: int     # weight bytes that block reads and writes in its register tile
    walk_waits: int         # the most serial L2 waits of any block's step pass (not in the cost)


@dataclass
class SpreadPhase:
    cost: Phase             # of the slowest block, up to the barrier (up to the arrive of a split barrier)
    block: int              # which block that is
    blocks: int             # the blocks working in this phase
    register_bytes: int     # weight bytes the slowest block reads and writes in its register tile
    partial_tile_bytes: int  # of the slowest block's global bytes: its partial tile's sectors
    round_trips: int
    walk_waits: int          # the most serial L2 waits of any block's column walk (not in the cost)
    ends_with: str           # "grid barrier", "split barrier" or "no barrier"
    after_arrive: AfterArrive | None = None   # a split barrier's work between its arrive and its wait

    def beyond_barrier(self, barrier_seconds: float) -> float:
        """What the work after the arrive adds beyond the barrier's latency, which it overlaps."""
        return max(0.0, self.after_arrive.cost.seconds - barrier_seconds) if self.after_arrive else 0.0

    def seconds(self, barrier_seconds: float) -> float:
        """The phase with the barrier that ends it."""
        if self.ends_with == "no barrier":
            return self.cost.seconds
        return self.cost.seconds + barrier_seconds + self.beyond_barrier(barrier_seconds)


@dataclass
class _BlockWork:
    """What one block does in one phase."""
    rows: int
    register_bytes: int = 0
    shared_bytes: int = 0
    exchange_bytes: int = 0   # global: activations, partials, images, label, totals (L2)
    resident_bytes: int = 0   # global: weights in W, hidden biases, their velocities (L2, or HBM when they do not fit)
    partial_tile_bytes: int = 0   # of exchange_bytes: the partial tile
    flops: int = 0
    round_trips: int = 0
    walk_waits: int = 0   # serial L2 waits of a thread's column walk: not in the cost (NOT_COUNTED)


def _warp_accesses(n: int) -> int:
    """Warp accesses that cover n consecutive floats."""
    return -(-n // 32)


def _sectors(first_float: int, floats: int) -> int:
    """32-byte sectors covering `floats` consecutive floats from float offset `first_float` of a
    buffer that starts on a sector (every cupy allocation does)."""
    if floats <= 0:
        return 0
    return (F32 * (first_float + floats) - 1) // SECTOR - F32 * first_float // SECTOR + 1


def partial_tile_sectors(sizes, l: int, block: int, blocks: int) -> int:
    """The sectors a block loads in backward l (l < L-2): partial_{l+1}[b', i0..i1) of its rows
    [i0, i1) for every owner b' of layer l + 1, where partial_{l+1} starts after the partial
    buffers of hidden layers 1..l in the kernel's buffer (spread_plan.partial_floats of the net cut
    after layer l + 1)."""
    begin, end = block_rows(sizes, l, block, blocks)
    start = partial_floats(sizes[:l + 3], blocks)
    return sum(_sectors(start + owner * sizes[l + 1] + begin, end - begin) for owner in owners(sizes, l + 1, blocks))


LAUNCH_START_WAITS = 3   # a launch's first image: thread 0's cursor, then order[start], then its label


def _forward(sizes, l, storage, rows, first_image) -> _BlockWork:
    n_in = sizes[l]
    reg, shared, global_ = storage.register_rows[l], storage.shared_rows[l], storage.global_rows[l]
    memory_rows = shared + global_
    loads_x = l > 0 or first_image   # layer 0 reads the image (and sample, label) the previous image prefetched
    launch_start = LAUNCH_START_WAITS if first_image else 0
    work = _BlockWork(rows, register_bytes=F32 * reg * n_in, flops=2 * rows * n_in,
                      round_trips=launch_start + int(loads_x) + int(global_ > 0))
    work.shared_bytes = WAVEFRONT * _warp_accesses(n_in) if loads_x else 0               # x stored
    if reg:   # x read once by thread per column, the 8 warps' sums of each row, then the biases
        work.shared_bytes += WAVEFRONT * (_warp_accesses(n_in) + WARPS * REGISTER_ROWS + WARPS + _warp_accesses(reg))
    work.shared_bytes += WAVEFRONT * _warp_accesses(n_in) * (memory_rows + shared)        # x per row, shared W rows
    work.shared_bytes += WAVEFRONT * memory_rows                                           # a memory row's bias
    # a register row's y is written by consecutive threads, a memory row's by one lane of its warp (a sector)
    work.exchange_bytes = F32 * n_in * loads_x + F32 * reg + SECTOR * memory_rows          # x read, y written
    work.exchange_bytes += SECTOR * launch_start                                           # cursor, order, label
    work.resident_bytes = F32 * global_ * n_in                                             # W rows
    return work


def _partial_pass(work, sizes, l, storage, rows) -> None:
    """Adds the partial pass of the block's rows of hidden layer l >= 1 (before the arrive) to
    `work`: for every column one fmaf chain of the old weights times delta down the rows, each
    weight read where it lives and none written, delta[r] a broadcast per weight, no x; the
    block's partial row (n_in) written."""
    n_in = sizes[l]
    reg, shared, global_ = storage.register_rows[l], storage.shared_rows[l], storage.global_rows[l]
    work.register_bytes += F32 * reg * n_in
    work.shared_bytes += WAVEFRONT * _warp_accesses(n_in) * (rows + shared)              # delta[r]; W
    work.exchange_bytes += F32 * n_in                                                    # the partial row
    work.resident_bytes += F32 * global_ * n_in                                          # W rows
    work.flops += 2 * rows * n_in
    work.walk_waits += -(-n_in // THREADS) * column_walk_waits(reg, shared, global_, False)


def _step_pass(work, sizes, l, storage, rows, momentum) -> None:
    """Adds the step of the block's rows of hidden layer l to `work`: for every column x[j] read
    once, delta[r] a broadcast per weight, each weight read and written where it lives (and its
    velocity in global memory, with momentum); then the biases' steps in the scratch."""
    n_in = sizes[l]
    reg, shared, global_ = storage.register_rows[l], storage.shared_rows[l], storage.global_rows[l]
    work.register_bytes += 2 * F32 * reg * n_in
    work.shared_bytes += WAVEFRONT * _warp_accesses(n_in) * (1 + rows + 2 * shared)   # x[j]; delta[r]; W
    # the biases' steps in the scratch: delta read, the bias (and its velocity) read and written
    work.shared_bytes += WAVEFRONT * _warp_accesses(rows) * (3 + (2 if momentum else 0))
    velocities = 2 * F32 * rows * n_in if momentum else 0
    work.resident_bytes += 2 * F32 * global_ * n_in + velocities                         # W rows, vW rows
    work.flops += (5 if momentum else 3) * rows * (n_in + 1)
    work.walk_waits += -(-n_in // THREADS) * column_walk_waits(reg, shared, global_, momentum)


def _fused_update(work, sizes, l, storage, rows, momentum) -> None:
    """Adds backward 0's single walk (hidden_update) to `work`: the step pass, with the fmaf chain of
    the old weights it computes beside the steps (layer 0 writes no partial row)."""
    _step_pass(work, sizes, l, storage, rows, momentum)
    work.flops += 2 * rows * sizes[l]


def column_walk_waits(register_rows: int, shared_rows: int, global_rows: int, momentum: bool) -> int:
    """Serial L2 waits of one column of hidden_update: the memory rows (shared, then global) go in
    groups of 4 whose loads are issued together, one wait per group that holds a global row (with
    momentum every group: the velocities are in global memory); with momentum the register tile's
    rows also read their velocities one after another (not grouped)."""
    memory_rows = shared_rows + global_rows
    if momentum:
        return register_rows + -(-memory_rows // COLUMN_GROUP)
    return (memory_rows - 1) // COLUMN_GROUP - shared_rows // COLUMN_GROUP + 1 if global_rows else 0


def _output(sizes, storage, rows, block, momentum) -> tuple[_BlockWork, _BlockWork]:
    """The output phase of one block, before the arrive and after it: `rows` of the top hidden layer
    (L-2) are its own."""
    n_classes, n_in, top_in = sizes[-1], sizes[-2], sizes[-3]
    one_hidden = len(sizes) == 3
    work = _BlockWork(rows, round_trips=1)   # the load pass
    loads = n_in + (top_in + (sizes[0] if one_hidden else 0) if rows else 0)   # y_{L-2}; x of layer L-2; next image
    work.exchange_bytes = F32 * loads + (2 * SECTOR if one_hidden else 0)      # thread 0: next label, sample after
    work.shared_bytes = WAVEFRONT * (_warp_accesses(n_in) + (_warp_accesses(top_in) if rows else 0)
                                     + (_warp_accesses(sizes[0]) if one_hidden and rows else 0))
    # the logits: a warp per class reads W_out's row and x, the bias, and writes the logit
    work.shared_bytes += WAVEFRONT * n_classes * (2 * _warp_accesses(n_in) + 2)
    # the softmax (warp 0): the logits read for the argmax, the sum, p and the loss; delta_out written
    work.shared_bytes += WAVEFRONT * 5 * _warp_accesses(n_classes)
    if block == 0:   # the logits written to y (the totals are in its shared memory)
        work.exchange_bytes += SECTOR * _sectors(0, n_classes)
    # the top layer's deltas, thread per row: W_out[c][i] and delta_out[c] for every class, y, delta
    work.shared_bytes += WAVEFRONT * _warp_accesses(rows) * (2 * n_classes + 2)
    work.flops = (2 * n_in + 5) * n_classes + 2 * n_classes * rows
    if rows and not one_hidden:
        _partial_pass(work, sizes, len(sizes) - 3, storage, rows)
    # after the arrive, the copy's step: W_out (and vW_out) read and written, x and delta_out read;
    # then b_out; then the step of the block's rows of the top layer
    velocity = 2 if momentum else 0
    after = _BlockWork(rows, shared_bytes=WAVEFRONT * ((4 + velocity) * _warp_accesses(n_classes * n_in)
                                                       + (3 + velocity) * _warp_accesses(n_classes)),
                       flops=(5 if momentum else 3) * n_classes * (n_in + 1))
    if rows:
        _step_pass(after, sizes, len(sizes) - 3, storage, rows, momentum)
    return work, after


def _backward(sizes, l, storage, rows, block, blocks, momentum) -> tuple[_BlockWork, _BlockWork | None]:
    """Backward l of a hidden layer below the top one (its deltas from the partial sums of l + 1):
    before the arrive and after it (None for layer 0, whose single walk no barrier follows)."""
    n_in = sizes[l]
    begin, _ = block_rows(sizes, l, block, blocks)
    above = len(owners(sizes, l + 1, blocks))
    tile = SECTOR * partial_tile_sectors(sizes, l, block, blocks)
    next_image = sizes[0] if l == 0 else 0
    work = _BlockWork(rows, partial_tile_bytes=tile, round_trips=1)   # the load pass
    work.exchange_bytes = tile + SECTOR * _sectors(begin, rows) + F32 * (n_in + next_image)   # tile, y, x, image
    work.exchange_bytes += 2 * SECTOR if l == 0 else 0   # thread 0: the next image's label and the sample after it
    work.shared_bytes = WAVEFRONT * (_warp_accesses(above * rows) + _warp_accesses(rows) + _warp_accesses(n_in)
                                     + _warp_accesses(next_image))
    # each row's delta: lanes over the G owners' slots of the tile, then y and delta by lane 0
    work.shared_bytes += WAVEFRONT * rows * (_warp_accesses(blocks) + 2)
    work.flops = rows * (above + 2)
    if l == 0:
        _fused_update(work, sizes, l, storage, rows, momentum)
        return work, None
    _partial_pass(work, sizes, l, storage, rows)
    after = _BlockWork(rows)
    _step_pass(after, sizes, l, storage, rows, momentum)
    return work, after


class _ModelledLaunchDevice:
    """What train_spread.plan_launch asks of a device, answered for the modelled one: the opt-in
    shared memory of `arch` less the kernel's static shared memory, and one block per SM where the
    occupancy rule allows it."""

    def __init__(self, limits, used, device: ModelDevice):
        self.limits, self.used, self.device = limits, used, device

    def max_dynamic_shared(self, kernel) -> int:
        return self.limits.shared_per_sm - self.limits.shared_reserved_per_block - self.used.shared_bytes

    def resident_blocks(self, kernel, threads: int, shared_mem: int) -> int:
        if shared_mem > self.max_dynamic_shared(kernel):
            return 0
        shared = self.used.shared_bytes + shared_mem
        occupancy = theoretical_occupancy(self.limits, threads, self.used.registers, shared)
        return occupancy.blocks_per_sm * self.device.sms


def model(sizes, arch: str = "sm_90", momentum: bool = False, device: ModelDevice = H100_SXM) -> dict:
    reason = unsupported_reason(sizes, 1)
    if reason is not None:
        raise ValueError(f"the spread engine cannot train {nets.describe(sizes)}: {reason}")
    limits = arch_limits(arch)
    used = compile_gate.resources_by_kernel(compile_gate.compile_all([arch], [KERNEL_DIR / SOURCE]))[(KERNEL, arch)]
    try:
        launch = plan_launch(_ModelledLaunchDevice(limits, used, device), None, sizes, momentum)
    except UserError as error:
        raise ValueError(f"the spread engine cannot train {nets.describe(sizes)} on {arch}: "
                         f"{str(error).removeprefix('--engine spread: ')}") from None
    grid, capacity = launch.blocks, launch.shared_weight_floats
    storages = [block_storage(sizes, b, grid, capacity) for b in range(grid)]
    occupancy = theoretical_occupancy(limits, THREADS, used.registers, used.shared_bytes + launch.shared_bytes)
    n_layers = len(sizes) - 1
    last = n_layers - 1
    weights = nets.count_weights(sizes)
    hidden_weights = sum(n_in * n_out for n_in, n_out in zip(sizes[:-2], sizes[1:-1]))
    in_registers = sum(s.register_rows[l] * sizes[l] for s in storages for l in range(last))
    in_shared = sum(s.shared_floats(sizes) for s in storages)
    in_global = hidden_weights - in_registers - in_shared
    hidden_biases = sum(sizes[1:-1])
    output_layer = sizes[-1] * (sizes[-2] + 1)   # W_out and b_out, replicated in every block
    activations = sum(sizes[1:])
    in_global_memory = F32 * (in_global + (hidden_weights if momentum else 0) + partial_floats(sizes, grid)
                              + activations)   # what an image touches there: the biases are in the scratch
    from_hbm = in_global_memory > device.l2_bytes

    def phase(name, works, ends_with, after=None) -> SpreadPhase:
        """The slowest of the blocks' `works` ({block: _BlockWork}) in one phase, up to its barrier
        (a split barrier's arrive), and the slowest of their work `after` the arrive."""
        bandwidth = global_share(device, len(works), from_hbm)
        costs = {b: phase_cost(name, w.rows, w.shared_bytes, w.exchange_bytes + w.resident_bytes, w.flops,
                               bandwidth, device, w.round_trips) for b, w in works.items()}
        slowest = max(costs, key=lambda b: costs[b].seconds)
        w = works[slowest]
        return SpreadPhase(costs[slowest], slowest, len(works), w.register_bytes, w.partial_tile_bytes, w.round_trips,
                           max(v.walk_waits for v in works.values()), ends_with,
                           None if after is None else after_arrive(name, after, bandwidth))

    def after_arrive(name, works, bandwidth) -> AfterArrive:
        """The slowest block's work between the arrive and the wait: its longest time, no round trip."""
        def cost(w):
            times = resource_times(w.shared_bytes, w.exchange_bytes + w.resident_bytes, w.flops, bandwidth, device)
            bound = max(times, key=times.get)
            return Phase(name, w.rows, w.shared_bytes, w.exchange_bytes + w.resident_bytes, w.flops, times[bound],
                         bound)
        costs = {b: cost(w) for b, w in works.items()}
        slowest = max(costs, key=lambda b: costs[b].seconds)
        return AfterArrive(costs[slowest], slowest, works[slowest].register_bytes,
                           max(w.walk_waits for w in works.values()))

    def rows_of(l, b):
        begin, end = block_rows(sizes, l, b, grid)
        return end - begin

    totals = {"register": 0, "shared": 0, "l2": 0, "hbm": F32 * sizes[0]}   # the next image enters L2 from HBM

    def working(works) -> dict:
        for w in works.values():
            totals["register"] += w.register_bytes
            totals["shared"] += w.shared_bytes
            totals["l2"] += w.exchange_bytes + (0 if from_hbm else w.resident_bytes)
            totals["hbm"] += w.resident_bytes if from_hbm else 0
        return works

    def forward(l, first_image):
        return {b: _forward(sizes, l, storages[b], rows_of(l, b), first_image) for b in range(grid) if rows_of(l, b)}

    def split(name, works):
        """A phase that ends with a split barrier: works is {block: (before the arrive, after it)}."""
        return phase(name, working({b: w for b, (w, _) in works.items()}), "split barrier",
                     working({b: a for b, (_, a) in works.items()}))

    phases = [phase(f"forward {l}", working(forward(l, False)), "grid barrier") for l in range(last)]
    phases.append(split(f"output (forward {last}, softmax, backward {last}, backward {last - 1})",
                        {b: _output(sizes, storages[b], rows_of(last - 1, b), b, momentum) for b in range(grid)}))
    backward = {l: {b: _backward(sizes, l, storages[b], rows_of(l, b), b, grid, momentum)
                    for b in range(grid) if rows_of(l, b)} for l in reversed(range(last - 1))}
    phases += [split(f"backward {l}", works) if l else
               phase(f"backward {l}", working({b: w for b, (w, _) in works.items()}), "no barrier")
               for l, works in backward.items()]
    first_image = phase("forward 0 (a launch's first image)", forward(0, True), "grid barrier")
    syncs = grid_syncs_per_image(sizes)
    barrier = device.grid_sync_seconds
    assert syncs == sum(p.ends_with != "no barrier" for p in phases)
    compute = sum(p.cost.seconds for p in phases)
    round_trips = sum(p.round_trips for p in phases) * device.l2_round_trip_seconds
    beyond = sum(p.beyond_barrier(barrier) for p in phases)
    parts = {"grid barriers": syncs * barrier, "L2 round trips": round_trips,
             "the phases' traffic and FLOPs up to their barrier's arrive": compute - round_trips,
             "the work after the arrives beyond the barrier": beyond}
    slowest = max(phases, key=lambda p: p.cost.seconds + p.beyond_barrier(barrier))
    slowest_bound = slowest.cost.bound + (f"; after the arrive {slowest.after_arrive.cost.bound}"
                                          if slowest.beyond_barrier(barrier) else "")
    return {
        "net": nets.describe(sizes), "sizes": list(sizes), "weights": weights, "arch": arch, "device": device.name,
        "momentum": momentum, "grid": grid, "threads": THREADS, "registers": used.registers,
        "spill_bytes": used.spill_store_bytes + used.spill_load_bytes, "static_shared": used.shared_bytes,
        "dynamic_shared": launch.shared_bytes, "scratch_bytes": launch.shared_bytes - F32 * capacity,
        "shared_capacity_floats": capacity, "blocks_per_sm": occupancy.blocks_per_sm,
        "occupancy": occupancy.fraction, "occupancy_limiter": occupancy.limiter,
        "register_layer": launch.register_layer,
        "storages": storages, "storage_line": storage_line(sizes, grid, capacity, momentum),
        "floats_in_registers": in_registers, "floats_in_shared": in_shared, "floats_in_global": in_global,
        "output_layer_floats": output_layer, "output_copy_floats": output_copy_floats(sizes, momentum),
        "hidden_biases": hidden_biases, "global_home": "HBM" if from_hbm else "L2",
        "bytes_in_registers": totals["register"], "bytes_on_chip": totals["shared"], "bytes_l2": totals["l2"],
        "bytes_hbm": totals["hbm"], "grid_syncs": syncs, "sync_seconds": parts["grid barriers"],
        "split_barriers": sum(p.ends_with == "split barrier" for p in phases), "barrier_seconds": barrier,
        "round_trip_seconds": round_trips, "compute_seconds": compute, "beyond_barrier_seconds": beyond,
        "per_image_seconds": sum(p.seconds(barrier) for p in phases), "phases": phases, "parts": parts,
        "first_image_phase": first_image,
        "walk_wait_seconds": sum(p.walk_waits + (p.after_arrive.walk_waits if p.after_arrive else 0)
                                 for p in phases) * device.l2_round_trip_seconds,
        "first_image_extra_seconds": first_image.cost.seconds - phases[0].cost.seconds,
        "bound": max(parts, key=parts.get), "slowest_phase": f"{slowest.cost.name} ({slowest_bound})",
    }


def _kib(floats: int) -> str:
    return f"{F32 * floats / 1024:,.1f}"


def render(m: dict) -> str:
    sizes, storages, grid = m["sizes"], m["storages"], m["grid"]
    n_layers = len(sizes) - 1
    per_image = m["per_image_seconds"]
    tile = (f"layer {m['register_layer']}'s first {REGISTER_ROWS} rows of each block"
            f" ({REGISTER_ROWS} x {REGISTER_COLUMNS} weights per thread)"
            if m["register_layer"] >= 0 else "none (no hidden layer has n_in <= 2560)")
    lines = [
        f"spread engine model (nothing measured): net {m['net']} ({m['weights']:,} weights), online"
        f"{' with momentum' if m['momentum'] else ''}, {m['arch']} on an {m['device']}",
        f"grid {grid} blocks (one per SM) x {m['threads']} threads, {m['registers']} registers/thread "
        f"({m['spill_bytes']} B spilled; NVRTC), shared memory {m['static_shared']:,} B static + "
        f"{m['dynamic_shared']:,} B dynamic per block ({m['scratch_bytes']:,} B of it scratch, with the output "
        f"layer's copy), {m['blocks_per_sm']} block/SM resident (occupancy {100 * m['occupancy']:.1f}%, limited by "
        f"{m['occupancy_limiter']})",
        f"register tile: {tile}; weights left in global memory are read from {m['global_home']}",
        f"storage per block (train_spread): {m['storage_line']}",
    ]
    if m["spill_bytes"]:
        lines.append(f"warning: the kernel spills {m['spill_bytes']} B: register rows are costed as registers, "
                     f"so the figure below is optimistic")
    kinds = {"registers": lambda s: sum(r * n for r, n in zip(s.register_rows, sizes)),
             "shared memory (hidden rows)": lambda s: s.shared_floats(sizes),
             "global memory": lambda s: sum(r * n for r, n in zip(s.global_rows, sizes))}
    grid_floats = {"registers": m["floats_in_registers"], "shared memory (hidden rows)": m["floats_in_shared"],
                   "global memory": m["floats_in_global"]}
    lines += ["", "| weights in | KiB per block (fewest - most) | whole grid | share of the net |",
              "|---|---:|---:|---:|"]
    for kind, floats_of in kinds.items():
        per = [floats_of(s) for s in storages]
        lines.append(f"| {kind} | {_kib(min(per))} - {_kib(max(per))} | {mb(F32 * grid_floats[kind])} | "
                     f"{grid_floats[kind] / m['weights']:.1%} |")
    copy = m["output_copy_floats"]
    lines.append(f"| output layer W and b{' and their velocities' if m['momentum'] else ''}, replicated in every "
                 f"block's shared memory | {_kib(copy)} | {grid} copies of {mb(F32 * copy)} | "
                 f"{m['output_layer_floats'] / m['weights']:.1%} |")
    lines.append(f"| hidden biases (each block's rows in its scratch) | | {mb(F32 * m['hidden_biases'])} | "
                 f"{m['hidden_biases'] / m['weights']:.1%} |")
    lines.append(f"| all | | {mb(F32 * m['weights'])} | 100.0% |")
    lines += ["", "| layer | n_in x n_out | rows per block | rows in registers | in shared memory | in global memory "
              "| replicated in every block |", "|---|---|---:|---:|---:|---:|---:|"]
    for l in range(n_layers):
        owning = [e - s for s, e in (block_rows(sizes, l, b, grid) for b in range(grid)) if e > s]
        span = f"{min(owning)}" if min(owning) == max(owning) else f"{min(owning)} - {max(owning)}"
        span += f" on {len(owning)} blocks" if len(owning) < grid else ""
        lines.append(f"| {l} | {sizes[l]} x {sizes[l + 1]} | {span} | "
                     f"{sum(s.register_rows[l] for s in storages)} | {sum(s.shared_rows[l] for s in storages)} | "
                     f"{sum(s.global_rows[l] for s in storages)} | {storages[0].replicated_rows[l]} |")
    first = m["first_image_phase"]
    lines += [
        "",
        "| per image | value |",
        "|---|---:|",
        f"| weight bytes touched in registers | {mb(m['bytes_in_registers'])} |",
        f"| bytes from on-chip shared memory (128-B wavefronts) | {mb(m['bytes_on_chip'])} |",
        f"| bytes from L2 | {mb(m['bytes_l2'])} |",
        f"| bytes from HBM | {mb(m['bytes_hbm'])} |",
        f"| grid-wide syncs | {m['grid_syncs']} ({m['sync_seconds'] * 1e6:.1f} us), {m['split_barriers']} of them "
        f"split (arrive / wait) |",
        f"| phases up to their barrier's arrive (slowest block each) | {m['compute_seconds'] * 1e6:.1f} us, of which "
        f"L2 round trips {m['round_trip_seconds'] * 1e6:.1f} us |",
        f"| work after the split barriers' arrives, beyond the barrier | {m['beyond_barrier_seconds'] * 1e6:.2f} us |",
        f"| expected time | {per_image * 1e6:.1f} us |",
        f"| a launch's first image, on top ({LAUNCH_START_WAITS} dependent L2 waits at the launch start: cursor, "
        f"sample, label; then its forward 0 loads the image: {first.round_trips} L2 round trips in all) "
        f"| {m['first_image_extra_seconds'] * 1e6:.2f} us |",
        "",
        "up to the barrier (a split barrier's arrive):",
        "",
        "| phase | blocks | slowest block | its rows | its register bytes | its shared bytes | its L2/HBM bytes "
        "| of which partial tile | its FLOPs | L2 round trips | us | bound | column walk's serial L2 waits "
        "(not counted) | ends with | us with its barrier |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    barrier = m["barrier_seconds"]
    lines += [f"| {p.cost.name} | {p.blocks} | {p.block} | {p.cost.rows} | {p.register_bytes:,} "
              f"| {p.cost.shared_bytes:,} | {p.cost.global_bytes:,} | {p.partial_tile_bytes:,} | {p.cost.flops:,} "
              f"| {p.round_trips} | {p.cost.seconds * 1e6:.2f} | {p.cost.bound} | {p.walk_waits} | {p.ends_with} "
              f"| {p.seconds(barrier) * 1e6:.2f} |" for p in m["phases"]]
    lines += ["", f"after a split barrier's arrive (the steps), beside the barrier's {barrier * 1e6:.1f} us:", "",
              "| phase | slowest block | its register bytes | its shared bytes | its L2/HBM bytes | its FLOPs | us "
              "| bound | of the barrier used | beyond the barrier, us | step pass's serial L2 waits (not counted) |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {p.cost.name} | {a.block} | {a.register_bytes:,} | {a.cost.shared_bytes:,} | {a.cost.global_bytes:,} "
              f"| {a.cost.flops:,} | {a.cost.seconds * 1e6:.2f} | {a.cost.bound} "
              f"| {min(a.cost.seconds, barrier) * 1e6:.2f} us ({min(a.cost.seconds / barrier, 1):.0%}) "
              f"| {p.beyond_barrier(barrier) * 1e6:.2f} | {a.walk_waits} |"
              for p in m["phases"] if (a := p.after_arrive) is not None]
    parts = "; ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in m["parts"].items())
    lines += ["", *closing_lines(per_image, f"{m['bound']} ({parts}; slowest phase {m['slowest_phase']})"),
              f"L2 round trips here: the waits on L2 of each phase's slowest block, as counted in the table "
              f"(not one per phase)",
              f"split barriers: {SPLIT_BARRIER}",
              f"not counted: {NOT_COUNTED}; the column walks' serial L2 waits alone (the tables' columns, most of "
              f"any block in each phase and after each arrive) would add {m['walk_wait_seconds'] * 1e6:.1f} us if "
              f"nothing hid them"]
    return "\n".join(lines)
