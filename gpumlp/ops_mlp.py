"""Typed launchers of the network kernels: cuda_kernels/mlp_online.cu (batch size 1),
cuda_kernels/mlp_batch.cu (minibatches, evaluation) and cuda_kernels/train_step.cu (softmax head
and bookkeeping). References: gpumlp/reference.py.

Each launcher checks shapes and dtypes, computes grid and block, and wraps every scalar as
np.int32 / np.float32 so its C type is right on both devices. Arrays are device arrays of the
`device` (numpy for the emulator, CuPy on a GPU), float32 unless said otherwise, C-contiguous.

A training step (the trainer composes it; see tests/test_mlp_kernels.py for the full sequence):
  gather + layer_forward for each layer -> softmax_xent (which also adds up the step's loss and
  errors and advances the cursor) -> backward_update for each layer, top first.
With B = 1 the first layer is layer_forward_mv_gather (the gather fused in), the others
layer_forward_mv, and backward_update is backward_update_partial (+ backward_reduce except for
the first layer): 3 L launches for L layers (net 4: 6 + 1 + 6 + 5 = 18, where gather_batch and
finish_step made it 20). With B > 1 they are the GEMM kernels, the first layer_forward_gemm_gather.
"""
from __future__ import annotations

import numpy as np

from gpumlp.device import check_array

ONLINE = "mlp_online.cu"
BATCH = "mlp_batch.cu"
STEP = "train_step.cu"

# Must match the #defines of the .cu files.
BU_ROWS = 32          # rows of W per chunk of backward_update_partial (mlp_online.cu)
BU_COLS = 128         # columns per block of backward_update_partial = its blockDim.x
GEMM_TILE = 64        # output tile of the GEMM kernels (mlp_batch.cu TILE_M = TILE_N)
GEMM_THREADS = 256    # mlp_batch.cu THREADS: the kernels assume exactly this block size

MV_THREADS = 256      # 8 warps = 8 output rows per block of layer_forward_mv (mlp_online.cu
                      # MV_THREADS, its __launch_bounds__: a bigger block would fail to launch)
MV_WARPS_PER_ROW = (1, 2, 4)   # the warps_per_row layer_forward_mv accepts (mlp_online.cu)
MV_TARGET_WARPS = 2000  # layer_forward_mv shares rows among warps until a layer has about this
                        # many (~15 per SM of an H100, what its widest layers run with)
REDUCE_COLUMNS = 32    # mlp_online.cu BR_COLUMNS x BR_LOADERS: backward_reduce's 2-D block
REDUCE_LOADERS = 8
SOFTMAX_THREADS = 128  # 4 warps, one block (softmax_xent adds up the step's totals in order)


def _blocks(n: int, per_block: int) -> int:
    return max(1, -(-int(n) // per_block))


class Hyperparameters:
    """The learning rate and momentum in device memory, `array` = float32 [lr, momentum], which the
    update kernels read through a pointer: a graph captured once then replays with whatever lr was
    last written (set_lr, queued on the device's stream before the replays). The momentum is fixed
    for the object's life, so a launcher can tell on the host whether velocities are needed."""

    def __init__(self, device, lr=0.0, momentum=0.0):
        self.device = device
        self.momentum = float(np.float32(momentum))
        self.array = device.asarray(np.array([lr, momentum], np.float32))

    def set_lr(self, lr) -> None:
        with self.device.on_stream():
            self.array[0] = np.float32(lr)


def _velocities(kernel, W, b, hyper: Hyperparameters, velocity_W, velocity_b):
    """The velocity arrays to pass: the real ones with momentum, else W and b as placeholders
    (the kernels never touch them when momentum == 0)."""
    check_array(kernel, "hyper", hyper.array, (2,))
    if hyper.momentum == 0.0:
        return W, b
    if velocity_W is None or velocity_b is None:
        raise ValueError(f"{kernel}: momentum {hyper.momentum} needs velocity_W and velocity_b")
    check_array(kernel, "velocity_W", velocity_W, tuple(W.shape))
    check_array(kernel, "velocity_b", velocity_b, tuple(b.shape))
    return velocity_W, velocity_b


# ---- workspace sizes -------------------------------------------------------------------------

def partial_rows(n_out: int) -> int:
    """Rows (chunks) of the partial-sum buffer that backward_update_partial writes for a layer
    with n_out outputs; the buffer must hold partial_rows(n_out) * n_in floats. Increasing in
    n_out, so one buffer of partial_rows(max n_out) * max n_in serves every layer."""
    return _blocks(n_out, BU_ROWS)


def partial_elements(n_out: int, n_in: int) -> int:
    return partial_rows(n_out) * int(n_in)


# ---- online (B = 1): mlp_online.cu -----------------------------------------------------------

def mv_warps_per_row(n_out: int) -> int:
    """Warps per output row for layer_forward_mv: the fewest of 1, 2, 4 that give the layer
    MV_TARGET_WARPS warps (short layers: 10 rows -> 4, 500 -> 4, 1000 -> 2, 2000 -> 1). Any choice
    gives the same bits (the warps split accumulators, not sums); this one only sets the speed."""
    for warps in MV_WARPS_PER_ROW:
        if int(n_out) * warps >= MV_TARGET_WARPS:
            return warps
    return MV_WARPS_PER_ROW[-1]


def _mv_launch(n_out: int, warps_per_row: int | None):
    warps = mv_warps_per_row(n_out) if warps_per_row is None else int(warps_per_row)
    if warps not in MV_WARPS_PER_ROW:
        raise ValueError(f"layer_forward_mv: warps_per_row must be one of {MV_WARPS_PER_ROW}, got {warps}")
    return (_blocks(n_out, MV_THREADS // 32 // warps),), (MV_THREADS,), np.int32(warps)


def layer_forward_mv(device, W, b, x, y, activate: bool, warps_per_row: int | None = None) -> None:
    """y = act(W x + b) for one sample. W (n_out, n_in), b (n_out,), x (n_in,) or (1, n_in),
    y (n_out,) or (1, n_out); activate: scaled tanh, else linear (the output layer);
    warps_per_row 1, 2 or 4 (default mv_warps_per_row(n_out)): the same bits for each."""
    n_out, n_in = (int(s) for s in W.shape)
    check_array("layer_forward_mv", "b", b, (n_out,))
    check_array("layer_forward_mv", "x", x, n_in)
    check_array("layer_forward_mv", "y", y, n_out)
    check_array("layer_forward_mv", "W", W, (n_out, n_in))
    grid, block, warps = _mv_launch(n_out, warps_per_row)
    kernel = device.kernel(ONLINE, "layer_forward_mv")
    device.launch(kernel, grid, block,
                  (W, b, x, y, np.int32(n_out), np.int32(n_in), np.int32(bool(activate)), warps))


def layer_forward_mv_gather(device, W, b, images, labels, order, cursor, X, label_out, y, activate: bool,
                            warps_per_row: int | None = None) -> None:
    """The first layer of an online step with its gather: sample = order[cursor] (the cursor read
    ON THE DEVICE at run time), X = images[sample], label_out = labels[sample],
    y = act(W X + b) as layer_forward_mv computes it.
    W (n_out, n_in), b (n_out,), images (N, n_in), labels (N,) int32, order (N,) int32,
    cursor (1,) int32, X (n_in,) or (1, n_in), label_out (1,) int32, y (n_out,) or (1, n_out)."""
    name = "layer_forward_mv_gather"
    n_out, n_in = (int(s) for s in W.shape)
    n_samples = int(images.shape[0])
    check_array(name, "W", W, (n_out, n_in))
    check_array(name, "b", b, (n_out,))
    check_array(name, "images", images, (n_samples, n_in))
    check_array(name, "labels", labels, (n_samples,), np.int32)
    check_array(name, "order", order, (n_samples,), np.int32)
    check_array(name, "cursor", cursor, 1, np.int32)
    check_array(name, "X", X, n_in)
    check_array(name, "label_out", label_out, 1, np.int32)
    check_array(name, "y", y, n_out)
    grid, block, warps = _mv_launch(n_out, warps_per_row)
    kernel = device.kernel(ONLINE, name)
    device.launch(kernel, grid, block,
                  (W, b, images, labels, order, cursor, X, label_out, y, np.int32(n_out), np.int32(n_in),
                   np.int32(bool(activate)), warps, np.int32(n_samples)))


def backward_update_partial(device, W, b, delta_out, x, partial, hyper: Hyperparameters,
                            velocity_W=None, velocity_b=None, want_partial: bool = True) -> None:
    """One pass over W: partial[c] = delta_out[chunk c] @ W_old[chunk c] (if want_partial), and
    W, b (and velocities) take the SGD step for the sample with hyper's lr and momentum.
    W (n_out, n_in), b (n_out,), delta_out (n_out,) or (1, n_out), x (n_in,) or (1, n_in) the
    layer's input, partial: at least partial_elements(n_out, n_in) floats (only the first are
    written, as (chunks, n_in))."""
    name = "backward_update_partial"
    n_out, n_in = (int(s) for s in W.shape)
    check_array(name, "W", W, (n_out, n_in))
    check_array(name, "b", b, (n_out,))
    check_array(name, "delta_out", delta_out, n_out)
    check_array(name, "x", x, n_in)
    if partial.dtype != np.float32 or not partial.flags.c_contiguous or partial.size < partial_elements(n_out, n_in):
        raise ValueError(f"{name}: partial must be a C-contiguous float32 array of at least "
                         f"{partial_elements(n_out, n_in)} elements, got {partial.dtype} {tuple(partial.shape)}")
    vW, vb = _velocities(name, W, b, hyper, velocity_W, velocity_b)
    kernel = device.kernel(ONLINE, name)
    device.launch(kernel, (_blocks(n_in, BU_COLS), partial_rows(n_out)), (BU_COLS,),
                  (W, b, delta_out, x, partial, vW, vb, hyper.array, np.int32(n_out), np.int32(n_in),
                   np.int32(bool(want_partial))))


def backward_reduce(device, partial, y_in, delta_in, n_out: int) -> None:
    """delta_in = (sum of the partial_rows(n_out) chunk rows of partial) * f'(y_in), for the
    layer below one with n_out outputs. y_in, delta_in: n_in floats ((n_in,) or (1, n_in))."""
    n_in = int(y_in.size)
    check_array("backward_reduce", "delta_in", delta_in, n_in)
    check_array("backward_reduce", "y_in", y_in, n_in)
    chunks = partial_rows(n_out)
    if partial.dtype != np.float32 or not partial.flags.c_contiguous or partial.size < chunks * n_in:
        raise ValueError(f"backward_reduce: partial must be a C-contiguous float32 array of at least "
                         f"{chunks * n_in} elements, got {partial.dtype} {tuple(partial.shape)}")
    kernel = device.kernel(ONLINE, "backward_reduce")
    device.launch(kernel, (_blocks(n_in, REDUCE_COLUMNS),), (REDUCE_COLUMNS, REDUCE_LOADERS),
                  (partial, y_in, delta_in, np.int32(chunks), np.int32(n_in)))


# ---- minibatch: mlp_batch.cu -----------------------------------------------------------------

def layer_forward_gemm(device, W, b, X, Y, activate: bool) -> None:
    """Y (B, n_out) = act(X (B, n_in) W^T + b). W (n_out, n_in), b (n_out,)."""
    n_out, n_in = (int(s) for s in W.shape)
    batch = int(X.shape[0])
    check_array("layer_forward_gemm", "W", W, (n_out, n_in))
    check_array("layer_forward_gemm", "b", b, (n_out,))
    check_array("layer_forward_gemm", "X", X, (batch, n_in))
    check_array("layer_forward_gemm", "Y", Y, (batch, n_out))
    if batch == 0:
        return
    kernel = device.kernel(BATCH, "layer_forward_gemm")
    device.launch(kernel, (_blocks(n_out, GEMM_TILE), _blocks(batch, GEMM_TILE)), (GEMM_THREADS,),
                  (X, W, b, Y, np.int32(batch), np.int32(n_out), np.int32(n_in), np.int32(bool(activate))))


def layer_forward_gemm_gather(device, W, b, images, labels, order, cursor, X, labels_out, Y, activate: bool) -> None:
    """The first layer of a minibatch step with its gather: rows r < B of X are
    images[order[cursor + r]] (the cursor read ON THE DEVICE at run time), labels_out their
    labels, Y = act(X W^T + b) as layer_forward_gemm computes it.
    W (n_out, n_in), b (n_out,), images (N, n_in), labels (N,) int32, order (N,) int32,
    cursor (1,) int32, X (B, n_in), labels_out (B,) int32, Y (B, n_out)."""
    name = "layer_forward_gemm_gather"
    n_out, n_in = (int(s) for s in W.shape)
    n_samples, batch = int(images.shape[0]), int(X.shape[0])
    check_array(name, "W", W, (n_out, n_in))
    check_array(name, "b", b, (n_out,))
    check_array(name, "images", images, (n_samples, n_in))
    check_array(name, "labels", labels, (n_samples,), np.int32)
    check_array(name, "order", order, (n_samples,), np.int32)
    check_array(name, "cursor", cursor, 1, np.int32)
    check_array(name, "X", X, (batch, n_in))
    check_array(name, "labels_out", labels_out, (batch,), np.int32)
    check_array(name, "Y", Y, (batch, n_out))
    if batch == 0:
        return
    kernel = device.kernel(BATCH, name)
    device.launch(kernel, (_blocks(n_out, GEMM_TILE), _blocks(batch, GEMM_TILE)), (GEMM_THREADS,),
                  (W, b, images, labels, order, cursor, X, labels_out, Y, np.int32(batch), np.int32(n_out),
                   np.int32(n_in), np.int32(bool(activate)), np.int32(n_samples)))


def backprop_delta_gemm(device, W, delta_out, y_in, delta_in) -> None:
    """delta_in (B, n_in) = (delta_out (B, n_out) W) * f'(y_in (B, n_in)), W (n_out, n_in) not yet
    updated: launch before sgd_update_gemm of the same layer."""
    n_out, n_in = (int(s) for s in W.shape)
    batch = int(delta_out.shape[0])
    check_array("backprop_delta_gemm", "W", W, (n_out, n_in))
    check_array("backprop_delta_gemm", "delta_out", delta_out, (batch, n_out))
    check_array("backprop_delta_gemm", "y_in", y_in, (batch, n_in))
    check_array("backprop_delta_gemm", "delta_in", delta_in, (batch, n_in))
    kernel = device.kernel(BATCH, "backprop_delta_gemm")
    device.launch(kernel, (_blocks(n_in, GEMM_TILE), _blocks(batch, GEMM_TILE)), (GEMM_THREADS,),
                  (delta_out, W, y_in, delta_in, np.int32(batch), np.int32(n_out), np.int32(n_in)))


def sgd_update_gemm(device, W, b, delta_out, X, hyper: Hyperparameters, velocity_W=None, velocity_b=None) -> None:
    """W, b (and velocities) take the SGD step on the batch-mean gradient delta_out^T X / B, with
    hyper's lr and momentum.
    W (n_out, n_in), b (n_out,), delta_out (B, n_out), X (B, n_in) the layer's input."""
    name = "sgd_update_gemm"
    n_out, n_in = (int(s) for s in W.shape)
    batch = int(delta_out.shape[0])
    check_array(name, "W", W, (n_out, n_in))
    check_array(name, "b", b, (n_out,))
    check_array(name, "delta_out", delta_out, (batch, n_out))
    check_array(name, "X", X, (batch, n_in))
    vW, vb = _velocities(name, W, b, hyper, velocity_W, velocity_b)
    kernel = device.kernel(BATCH, name)
    device.launch(kernel, (_blocks(n_in, GEMM_TILE), _blocks(n_out, GEMM_TILE)), (GEMM_THREADS,),
                  (delta_out, X, W, b, vW, vb, hyper.array, np.int32(batch), np.int32(n_out), np.int32(n_in)))


# ---- shared: train_step.cu -------------------------------------------------------------------

def softmax_xent(device, logits, labels, delta, loss, wrong, prediction, loss_total, wrong_total, cursor) -> None:
    """Per row: delta = softmax - onehot(label), loss = -log p[label], prediction = first argmax,
    wrong = prediction != label; then the step's bookkeeping: loss_total += the losses in row
    order (in double), wrong_total += sum(wrong), cursor += B. logits, delta (B, C) float32;
    labels, wrong, prediction (B,) int32; loss (B,) float32; loss_total (1,) float64,
    wrong_total (1,) int32, cursor (1,) int32. Launch it after every kernel of the step that
    reads the cursor."""
    batch, n_classes = (int(s) for s in logits.shape)
    check_array("softmax_xent", "logits", logits, (batch, n_classes))
    check_array("softmax_xent", "labels", labels, (batch,), np.int32)
    check_array("softmax_xent", "delta", delta, (batch, n_classes))
    check_array("softmax_xent", "loss", loss, (batch,))
    check_array("softmax_xent", "wrong", wrong, (batch,), np.int32)
    check_array("softmax_xent", "prediction", prediction, (batch,), np.int32)
    check_array("softmax_xent", "loss_total", loss_total, 1, np.float64)
    check_array("softmax_xent", "wrong_total", wrong_total, 1, np.int32)
    check_array("softmax_xent", "cursor", cursor, 1, np.int32)
    if batch == 0:
        return
    kernel = device.kernel(STEP, "softmax_xent")
    device.launch(kernel, (1,), (SOFTMAX_THREADS,),
                  (logits, labels, delta, loss, wrong, prediction, loss_total, wrong_total, cursor,
                   np.int32(batch), np.int32(n_classes)))


# ---- dispatch on the batch size (what the trainer calls) ---------------------------------------

def layer_forward(device, W, b, x, y, activate: bool) -> None:
    """y = act(x W^T + b) for x (B, n_in) or (n_in,): matrix-vector for one sample, else GEMM."""
    if x.ndim == 1 or int(x.shape[0]) == 1:
        layer_forward_mv(device, W, b, x, y, activate)
    else:
        layer_forward_gemm(device, W, b, x, y, activate)


def backward_update(device, W, b, delta_out, x, delta_below, partial, hyper: Hyperparameters,
                    velocity_W=None, velocity_b=None) -> None:
    """The backward pass and SGD step of one layer: delta_below = (delta_out W_old) * f'(x) unless
    delta_below is None (the first layer), and W, b take the step on the mean gradient.
    delta_out (B, n_out), x (B, n_in) the layer's input (the scaled-tanh outputs of the layer
    below), delta_below (B, n_in) or None, partial the online workspace (see partial_rows)."""
    batch = 1 if delta_out.ndim == 1 else int(delta_out.shape[0])
    if batch == 1:
        backward_update_partial(device, W, b, delta_out, x, partial, hyper, velocity_W, velocity_b,
                                want_partial=delta_below is not None)
        if delta_below is not None:
            backward_reduce(device, partial, x, delta_below, int(W.shape[0]))
    else:
        if delta_below is not None:
            backprop_delta_gemm(device, W, delta_out, x, delta_below)
        sgd_update_gemm(device, W, b, delta_out, x, hyper, velocity_W, velocity_b)


KERNELS = {ONLINE: ("layer_forward_mv", "layer_forward_mv_gather", "backward_update_partial", "backward_reduce"),
           BATCH: ("layer_forward_gemm", "layer_forward_gemm_gather", "backprop_delta_gemm", "sgd_update_gemm"),
           STEP: ("softmax_xent",)}


def preload(device) -> None:
    """Compile and load every network kernel now: call it before capturing a graph, so no module
    load (NVRTC, cuModuleLoad) happens inside stream capture."""
    for filename, names in KERNELS.items():
        for name in names:
            device.kernel(filename, name)
