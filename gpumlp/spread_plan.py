"""Where the spread engine (`--engine spread`, cuda_kernels/mlp_spread.cu) puts every weight:
which block owns which rows of each layer, which of them live in registers, which in shared memory
and which stay in global memory (L2). The kernel computes the same plan for itself; this module is
its mirror for the launch (how much shared memory), the profiler's model and the tests.

Ownership. Every hidden layer is spread over the whole grid: block b owns rows
[b n_out // G, (b + 1) n_out // G) of layer l (G blocks), so every phase keeps every SM busy. The
output layer is replicated: every block keeps all of it (W, b and, with momentum, their velocities)
in the scratch part of its shared memory and does its forward pass, softmax and step itself, so
that no grid barrier follows it.

Storage of a block's rows of a hidden layer l, in row order:
- the register layer (one per net, REGISTER_LAYER below): its first REGISTER_ROWS rows live in a
  register tile, thread t holding columns t + THREADS k (k < REGISTER_COLUMNS) of each;
- the next rows of every hidden layer, layer 0 first, fill the block's shared memory (dense,
  row-major) up to the capacity the launch gives;
- what is left is read and written in place in W (global memory, L2).
"""
from __future__ import annotations

from dataclasses import dataclass

F32 = 4
# Must match the #defines of cuda_kernels/mlp_spread.cu.
THREADS = 256            # SP_THREADS
REGISTER_ROWS = 16       # SP_REG_ROWS
REGISTER_COLUMNS = 10    # SP_REG_COLS: the tile covers n_in <= THREADS * REGISTER_COLUMNS = 2560
MAX_LAYERS = 12          # SP_MAX_LAYERS
MAX_CLASSES = 32         # the largest output layer the engine accepts (every block keeps a copy)


def block_rows(sizes, layer: int, block: int, blocks: int) -> tuple[int, int]:
    """[begin, end) of the rows of `layer` that `block` owns: all of the output layer's (every block
    has its copy)."""
    n_out = sizes[layer + 1]
    if layer == len(sizes) - 2:
        return 0, n_out
    return block * n_out // blocks, (block + 1) * n_out // blocks


def owners(sizes, layer: int, blocks: int) -> list[int]:
    """The blocks that own at least one row of `layer`, in block order: the partial sums of a hidden
    layer's backward pass are added in this order."""
    return [b for b in range(blocks) if block_rows(sizes, layer, b, blocks)[1] > block_rows(sizes, layer, b, blocks)[0]]


def max_block_rows(sizes, layer: int, blocks: int) -> int:
    """The most rows of `layer` one block owns."""
    return max(e - s for s, e in (block_rows(sizes, layer, b, blocks) for b in range(blocks)))


def register_layer(sizes, blocks: int) -> int:
    """The hidden layer whose rows go into the register tile: the one that puts the most weights
    there (n_in must fit the tile's columns); -1 when none fits."""
    best, best_weights = -1, 0
    for layer in range(len(sizes) - 2):
        n_in = sizes[layer]
        if n_in > THREADS * REGISTER_COLUMNS:
            continue
        weights = min(max_block_rows(sizes, layer, blocks), REGISTER_ROWS) * n_in
        if weights > best_weights:
            best, best_weights = layer, weights
    return best


@dataclass(frozen=True)
class BlockStorage:
    """Rows of each layer one block keeps in registers, in shared memory (its share of the
    capacity), in global memory, and replicated in shared memory (the output layer's copy, in the
    scratch)."""
    register_rows: tuple[int, ...]
    shared_rows: tuple[int, ...]
    global_rows: tuple[int, ...]
    replicated_rows: tuple[int, ...]

    def shared_floats(self, sizes) -> int:
        """Weights of the block's rows in the capacity part of shared memory (not the replica)."""
        return sum(r * n_in for r, n_in in zip(self.shared_rows, sizes[:-1]))


def block_storage(sizes, block: int, blocks: int, shared_capacity_floats: int) -> BlockStorage:
    """The kernel's greedy fill: register rows first (register layer only), then shared memory in
    layer order, row by row while a whole row fits, then global memory; the output layer is
    replicated."""
    reg_layer = register_layer(sizes, blocks)
    registers, shared, global_ = [], [], []
    free = shared_capacity_floats
    for layer in range(len(sizes) - 2):
        begin, end = block_rows(sizes, layer, block, blocks)
        rows = end - begin
        in_registers = min(rows, REGISTER_ROWS) if layer == reg_layer else 0
        rest = rows - in_registers
        in_shared = min(rest, free // sizes[layer]) if free > 0 else 0
        free -= in_shared * sizes[layer]
        registers.append(in_registers)
        shared.append(in_shared)
        global_.append(rest - in_shared)
    hidden = len(sizes) - 2
    return BlockStorage((*registers, 0), (*shared, 0), (*global_, 0), (0,) * hidden + (sizes[-1],))


def shared_weight_floats_needed(sizes, blocks: int) -> int:
    """Shared memory (floats) that holds every non-register row of the busiest block's hidden layers."""
    unlimited = 1 << 62
    return max(block_storage(sizes, b, blocks, unlimited).shared_floats(sizes) for b in range(blocks))


def output_copy_floats(sizes, momentum: bool) -> int:
    """The output layer's copy in every block: W_out and b_out, and their velocities with momentum."""
    return sizes[-1] * (sizes[-2] + 1) * (2 if momentum else 1)


def exchange_floats(sizes, blocks: int) -> int:
    """The kernel's exchange buffer: the partial tile (blocks, rows | 1) of every hidden layer whose
    deltas come from partial sums (all but the last), or the last hidden layer's input."""
    tiles = [blocks * (-(-sizes[layer + 1] // blocks) | 1) for layer in range(len(sizes) - 3)]
    return max([sizes[-3], *tiles])


def image_floats(sizes) -> int:
    """The prefetched image's own buffer in the scratch: none where it fits in x's buffer (max n_in)
    beside layer 0's input, which x holds in layer 0's backward pass, where the image is loaded; with
    one hidden layer it is loaded beside y_0 in the output phase and never fits: n_in of layer 0."""
    return 0 if len(sizes) > 3 and 2 * sizes[0] <= max(sizes[:-1]) else sizes[0]


def scratch_floats(sizes, blocks: int, momentum: bool) -> int:
    """The kernel's other dynamic shared memory, in its order: the layer's input x (max n_in), the
    prefetched image (image_floats: none when it fits in x's buffer), the block's deltas (max rows per block of a hidden layer),
    the forward reduction of the register tile (warps x REGISTER_ROWS), the exchange buffer, the
    logits and delta_out (n_classes each), the output layer's copy, and the biases of the block's
    rows of every hidden layer (max rows per block of each), with momentum their velocities too."""
    rows = [-(-n_out // blocks) for n_out in sizes[1:-1]]
    return (max(sizes[:-1]) + image_floats(sizes) + max(rows) + (THREADS // 32) * REGISTER_ROWS + exchange_floats(sizes, blocks)
            + 2 * sizes[-1] + output_copy_floats(sizes, momentum) + (2 if momentum else 1) * sum(rows))


def partial_floats(sizes, blocks: int) -> int:
    """The partial-sum buffer: for every hidden layer l >= 1, (blocks, n_in_l) floats."""
    return sum(blocks * n_in for n_in in sizes[1:-2])


def grid_syncs_per_image(sizes) -> int:
    """After every hidden layer's forward pass, and after the backward pass of every hidden layer
    but layer 0 (the output layer needs none); a net with one hidden layer has one after layer 0's
    backward pass instead, before the next image rewrites y_0."""
    n_layers = len(sizes) - 1
    return 2 * n_layers - 3 if n_layers > 2 else 2


def unsupported_reason(sizes, batch_size: int) -> str | None:
    """Why the spread kernel cannot train this net (None: it can)."""
    if batch_size != 1:
        return f"it trains online only (batch size 1), not batch size {batch_size}"
    if len(sizes) < 3:
        return "it needs at least one hidden layer"
    if len(sizes) - 1 > MAX_LAYERS:
        return f"it takes at most {MAX_LAYERS} layers, the net has {len(sizes) - 1}"
    if sizes[-1] > MAX_CLASSES:
        return f"the output layer must have at most {MAX_CLASSES} units, the net has {sizes[-1]}"
    return None
