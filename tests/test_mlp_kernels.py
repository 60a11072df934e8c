"""The network kernels (cuda_kernels/mlp_online.cu, mlp_batch.cu, train_step.cu) against the numpy
reference, run by the CPU emulator, plus an NVRTC compile check (sm_75, sm_90, no spills).

Tolerances (|actual - ref| <= atol + rtol |ref|; the values live in gpumlp/tolerances.py, which
the self-check uses too), and why:
  * Dot products (layer_forward_*: the pre-activation; backprop_delta_* / backward_reduce: the
    delta_out W product; backward_update_partial: the per-chunk partials): float32 sums of up to
    n_in (n_out) terms in another order than numpy's BLAS (and the kernels use fmaf, one rounding
    where numpy may use two). With weights in +-0.05 and inputs in +-1 the sums of |terms| stay
    below ~25, so reordering costs at most a few 1e-6: FORWARD 2e-5 / 1e-5, BACKPROP 1e-6 / 1e-5.
    The scaled tanh adds tanhf against numpy's float32 tanh (a few ulp) times A B < 1.2.
  * Softmax: expf/logf against numpy's (a few ulp each) and a 10-term sum in another order:
    SOFTMAX 1e-6 / 1e-5 on delta and loss.
  * The online weight update (backward_update_partial): bit-identical to sgd_update_ref for normal
    values, because the kernel rounds lr * (delta x), mu v and the add/subtract separately exactly
    like the reference (the batch of one makes the division by B exact): compared bitwise. With
    subnormal values it is bit-identical to a reference that flushes every operand and result to
    zero as CuPy's -ftz=true does (test_online_update_flushes_subnormals_like_cuda).
  * At the trainer's shapes (2000x2500 and 2500x841 layers, batch 32) the atol of a sum grows with
    its length: 2 sqrt(n) u sum|terms| (see "the trainer's shapes" below).
  * The minibatch update (sgd_update_gemm): the gradient is a B-term sum (numpy's order differs),
    so W differs by lr * (a few ulp of the gradient): UPDATE 1e-7 / 1e-6.
  * Integers (prediction, wrong, gathered labels, cursor, error counts) and gathered images: exact.
  * Composite steps (3-layer tiny net): a few ulp of the deltas feed the updates, times lr:
    STEP 1e-6 / 1e-5 on weights, 1e-5 / 1e-5 on the loss.
Every kernel runs on a plain emulator and on one that poisons shared memory with NaN, runs threads
in reverse order (a missing barrier or an uninitialised read then shows) and runs every launch with
its blocks in launch, reversed and seeded random order, whose results must agree bit for bit. Both
have the emulator's memcheck (out-of-bounds accesses raise), flush-to-zero and initcheck (arrays
from device.empty hold NaN) on.
"""
import re
import zlib

import numpy as np
import pytest

from gpumlp import ops_mlp
from gpumlp import reference as R
from gpumlp.device import KERNEL_DIR, EmulatedDevice
from helpers import assert_bitwise_equal, flush_subnormals, flushed
from helpers import assert_close as _assert_close

from gpumlp.tolerances import BACKPROP, FORWARD, LOSS, SOFTMAX, STEP, UPDATE  # shared with gpumlp.selfcheck
from gpumlp.tolerances import PAPER_RTOL, TANH_SLOPE, abs_products, sum_tolerance

DEVICES = {
    "plain": lambda: EmulatedDevice(),
    # every launch also runs with its blocks in reverse and in a seeded random order, and the
    # results of the three orders must agree bit for bit
    "poison+reverse+block-orders": lambda: EmulatedDevice(poison_shared=True, reverse_threads=True,
                                                          compare_block_orders=True),
}

# (n_out, n_in): the paper's input width, odd small sizes, a single input, more than a tile
SHAPES = [(10, 841), (33, 37), (500, 1), (70, 130)]


# Largest error seen per check (the first word of `what`), with its bound; printed at the end of the
# module (pytest -s) so the margins of the tolerances stay visible.
MEASURED: dict = {}


def assert_close(actual, ref, atol, rtol, what):
    error = _assert_close(actual, ref, atol, rtol, what)
    key = what.split()[0]
    atol = f"{atol:g}" if np.isscalar(atol) else "2 sqrt(n) u sum|t|"
    MEASURED[key] = max(MEASURED.get(key, (0.0,))[0], error), atol, rtol
    return error


@pytest.fixture(scope="module", autouse=True)
def report_measured_errors():
    yield
    for key, (error, atol, rtol) in sorted(MEASURED.items()):
        print(f"\n  max |error| {error:9.3g}  (atol {atol}, rtol {rtol:g})  {key}", end="")


@pytest.fixture(scope="module", params=list(DEVICES))
def device(request):
    return DEVICES[request.param]()


def rng_for(*key):
    """A generator keyed by the test's parameters (strings through crc32: hash() varies per run)."""
    return np.random.default_rng([zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key])


def layer(rng, n_out, n_in):
    W = rng.uniform(-0.05, 0.05, (n_out, n_in)).astype(np.float32)
    b = rng.uniform(-0.05, 0.05, n_out).astype(np.float32)
    return W, b


def uniform(rng, shape, scale=1.0):
    return rng.uniform(-scale, scale, shape).astype(np.float32)


def tanh_outputs(rng, shape):
    """Values a scaled-tanh layer can output, (-A, A)."""
    return uniform(rng, shape, 1.7)


def nan_like(shape, dtype=np.float32):
    return np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.full(shape, -7, dtype)


# ---- online: mlp_online.cu -------------------------------------------------------------------

@pytest.mark.parametrize("n_out, n_in", SHAPES + [(1, 65)])
@pytest.mark.parametrize("activate", [True, False])
def test_layer_forward_mv(device, n_out, n_in, activate):
    rng = rng_for(n_out, n_in, activate)
    W, b = layer(rng, n_out, n_in)
    x = uniform(rng, n_in)
    y = nan_like(n_out)
    ops_mlp.layer_forward_mv(device, W, b, x, y, activate)
    ref = R.layer_forward_ref(W, b, x[None], activate)[0]
    assert_close(y, ref, **FORWARD, what=f"layer_forward_mv {n_out}x{n_in} activate={activate}")


@pytest.mark.parametrize("n_out, n_in", [(10, 500), (33, 37), (9, 1100), (3, 1)])
def test_layer_forward_mv_gives_the_same_bits_for_every_warps_per_row(device, n_out, n_in):
    """Sharing a row among 2 or 4 warps splits the lane's accumulators, not a sum: every split
    gives one warp's bits (and 1100 > 2 x 512 inputs: several iterations per accumulator)."""
    rng = rng_for("split", n_out, n_in)
    W, b = layer(rng, n_out, n_in)
    x = uniform(rng, n_in)
    outputs = {}
    for warps in ops_mlp.MV_WARPS_PER_ROW:
        outputs[warps] = nan_like(n_out)
        ops_mlp.layer_forward_mv(device, W, b, x, outputs[warps], True, warps_per_row=warps)
    assert_close(outputs[1], R.layer_forward_ref(W, b, x[None], True)[0], **FORWARD,
                 what=f"layer_forward_mv(split) {n_out}x{n_in}")
    for warps in ops_mlp.MV_WARPS_PER_ROW[1:]:
        assert_bitwise_equal(outputs[warps], outputs[1], f"{n_out}x{n_in} with {warps} warps per row")


def test_mv_warps_per_row_shares_only_short_layers():
    assert [ops_mlp.mv_warps_per_row(n) for n in (10, 500, 1000, 1500, 2000, 2500)] == [4, 4, 2, 2, 1, 1]


@pytest.mark.parametrize("n_out, n_in, cursor", [(10, 841, 0), (33, 37, 5), (70, 130, 19)])
def test_layer_forward_mv_gather(device, n_out, n_in, cursor):
    """The fused gather: X and the label bit for bit, y within FORWARD of layer_forward_mv_gather_ref
    and bit for bit what layer_forward_mv computes on the gathered image."""
    rng = rng_for("mv-gather", n_out, n_in, cursor)
    n = 20
    W, b = layer(rng, n_out, n_in)
    images = uniform(rng, (n, n_in))
    labels = rng.integers(0, 10, n).astype(np.int32)
    order = rng.permutation(n).astype(np.int32)
    X, label, y = nan_like(n_in), nan_like(1, np.int32), nan_like(n_out)
    ops_mlp.layer_forward_mv_gather(device, W, b, images, labels, order, np.array([cursor], np.int32), X, label, y,
                                    activate=True)
    ref_X, ref_label, ref_y = R.layer_forward_mv_gather_ref(W, b, images, labels, order, cursor, True)
    assert_bitwise_equal(X, ref_X, "gathered image")
    assert int(label[0]) == ref_label
    assert_close(y, ref_y, **FORWARD, what=f"layer_forward_mv_gather {n_out}x{n_in}")
    plain = nan_like(n_out)
    ops_mlp.layer_forward_mv(device, W, b, ref_X, plain, True)
    assert_bitwise_equal(y, plain, "layer_forward_mv_gather vs layer_forward_mv")


def test_layer_forward_mv_gather_past_the_epoch_leaves_everything(device):
    rng = rng_for("mv-gather-end")
    W, b = layer(rng, 10, 37)
    images, labels = uniform(rng, (4, 37)), np.arange(4, dtype=np.int32)
    X, label, y = nan_like(37), nan_like(1, np.int32), nan_like(10)
    ops_mlp.layer_forward_mv_gather(device, W, b, images, labels, np.arange(4, dtype=np.int32),
                                    np.array([4], np.int32), X, label, y, activate=True)
    assert np.isnan(X).all() and np.isnan(y).all() and label[0] == -7


@pytest.mark.parametrize("chunks, n_in", [(1, 33), (16, 500), (70, 45)])
def test_backward_reduce_adds_the_chunks_in_order(device, chunks, n_in):
    """backward_reduce's sum per column is one float32 chain in chunk order, (p0 + p1) + p2 ...,
    however its loads are spread over threads (70 chunks: two groups of the shared tile): bit for
    bit that chain times f'(y_in)."""
    rng = rng_for("reduce-order", chunks, n_in)
    partial = uniform(rng, (chunks, n_in))
    y_in = tanh_outputs(rng, n_in)
    delta_in = nan_like(n_in)
    ops_mlp.backward_reduce(device, partial, y_in, delta_in, chunks * ops_mlp.BU_ROWS)
    in_order = np.add.accumulate(partial, axis=0, dtype=np.float32)[-1]   # sequential, in row order
    assert_bitwise_equal(delta_in, in_order * R.scaled_tanh_derivative_from_output(y_in), f"{chunks}x{n_in}")
    assert_close(delta_in, R.backward_reduce_ref(partial, y_in), **BACKPROP, what=f"backward_reduce {chunks}x{n_in}")


@pytest.mark.parametrize("n_out, n_in", SHAPES + [(64, 300)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_backward_update_partial_and_reduce(device, n_out, n_in, momentum):
    rng = rng_for(n_out, n_in, int(momentum * 10))
    W, b = layer(rng, n_out, n_in)
    delta_out = uniform(rng, n_out, 0.5)
    x = tanh_outputs(rng, n_in)     # the input is the layer below's output (for f'(x) too)
    lr = 0.01
    vW = uniform(rng, W.shape, 1e-3) if momentum else None
    vb = uniform(rng, b.shape, 1e-3) if momentum else None
    chunks = ops_mlp.partial_rows(n_out)
    partial = nan_like(chunks * n_in)
    dev = [a.copy() if a is not None else None for a in (W, b, vW, vb)]
    ops_mlp.backward_update_partial(device, dev[0], dev[1], delta_out, x, partial,
                                    ops_mlp.Hyperparameters(device, lr, momentum), dev[2], dev[3])
    delta_in = nan_like(n_in)
    ops_mlp.backward_reduce(device, partial, x, delta_in, n_out)

    ref = [a.copy() if a is not None else None for a in (W, b, vW, vb)]
    ref_partial = R.backward_update_partial_ref(ref[0], ref[1], delta_out, x, lr, momentum, ref[2], ref[3],
                                                rows_per_chunk=ops_mlp.BU_ROWS)
    what = f"{n_out}x{n_in} momentum={momentum}"
    assert_close(partial.reshape(chunks, n_in), ref_partial, **BACKPROP, what=f"backward_update_partial.partial {what}")
    assert_close(delta_in, R.backward_reduce_ref(ref_partial, x), **BACKPROP, what=f"backward_reduce.delta_in {what}")
    assert_close(delta_in, R.backprop_delta_ref(W, delta_out[None], x[None])[0], **BACKPROP,
                 what=f"backward_reduce.delta_in(vs_backprop_delta_ref) {what}")
    for name, got, want in zip(("W", "b", "velocity_W", "velocity_b"), dev, ref):
        if want is not None:
            assert_bitwise_equal(got, want, f"{name} {what}")


def test_backward_update_without_partial_leaves_the_workspace(device):
    rng = rng_for("no-partial")
    W, b = layer(rng, 40, 37)
    partial = nan_like(ops_mlp.partial_elements(40, 37) + 5)
    ref_W, ref_b = W.copy(), b.copy()
    delta_out, x = uniform(rng, 40), uniform(rng, 37)
    ops_mlp.backward_update_partial(device, W, b, delta_out, x, partial, ops_mlp.Hyperparameters(device, 0.05),
                                    want_partial=False)
    R.sgd_update_ref(ref_W, ref_b, delta_out[None], x[None], 0.05)
    assert np.isnan(partial).all()
    assert_bitwise_equal(W, ref_W, "W")
    assert_bitwise_equal(b, ref_b, "b")


def test_net4_widest_layer_gives_enough_blocks():
    """The 2000 x 2500 layer of net 4 must fill a big GPU several times over."""
    blocks = ops_mlp._blocks(2500, ops_mlp.BU_COLS) * ops_mlp.partial_rows(2000)
    assert blocks > 1000


# ---- minibatch: mlp_batch.cu -----------------------------------------------------------------

BATCH_CASES = [(1, 10, 841), (7, 33, 37), (16, 500, 1), (16, 10, 841), (67, 70, 130)]


@pytest.mark.parametrize("batch, n_out, n_in", BATCH_CASES)
@pytest.mark.parametrize("activate", [True, False])
def test_layer_forward_gemm(device, batch, n_out, n_in, activate):
    rng = rng_for(batch, n_out, n_in, activate)
    W, b = layer(rng, n_out, n_in)
    X = uniform(rng, (batch, n_in))
    Y = nan_like((batch, n_out))
    ops_mlp.layer_forward_gemm(device, W, b, X, Y, activate)
    assert_close(Y, R.layer_forward_ref(W, b, X, activate), **FORWARD,
                 what=f"layer_forward_gemm B={batch} {n_out}x{n_in} activate={activate}")


@pytest.mark.parametrize("cursor, batch, n_out", [(0, 1, 10), (5, 7, 33), (3, 16, 70), (19, 1, 10), (15, 8, 10)])
def test_layer_forward_gemm_gather(device, cursor, batch, n_out):
    """The fused gather of a minibatch: X and the labels bit for bit (rows past the end of the
    epoch, as at cursor 15 of 20 with B = 8, left untouched), Y within FORWARD of
    layer_forward_gemm_gather_ref and bit for bit what layer_forward_gemm computes on the batch."""
    rng = rng_for("gemm-gather", cursor, batch, n_out)
    n, n_in = 20, 841
    W, b = layer(rng, n_out, n_in)
    images = uniform(rng, (n, n_in))
    labels = rng.integers(0, 10, n).astype(np.int32)
    order = rng.permutation(n).astype(np.int32)
    X, labels_out, Y = nan_like((batch, n_in)), nan_like(batch, np.int32), nan_like((batch, n_out))
    ops_mlp.layer_forward_gemm_gather(device, W, b, images, labels, order, np.array([cursor], np.int32), X,
                                      labels_out, Y, activate=True)
    ref_X, ref_labels, ref_Y = R.layer_forward_gemm_gather_ref(W, b, images, labels, order, cursor, batch, True)
    valid = len(ref_labels)
    assert_bitwise_equal(X[:valid], ref_X, "gathered images")
    np.testing.assert_array_equal(labels_out[:valid], ref_labels)
    assert np.isnan(X[valid:]).all() and (labels_out[valid:] == -7).all()
    assert_close(Y[:valid], ref_Y, **FORWARD, what=f"layer_forward_gemm_gather B={batch} {n_out}x{n_in}")
    plain = nan_like((valid, n_out))
    ops_mlp.layer_forward_gemm(device, W, b, ref_X, plain, True)
    assert_bitwise_equal(Y[:valid], plain, "layer_forward_gemm_gather vs layer_forward_gemm")


@pytest.mark.parametrize("batch, n_out, n_in", BATCH_CASES)
def test_backprop_delta_gemm(device, batch, n_out, n_in):
    rng = rng_for("bp", batch, n_out, n_in)
    W, _ = layer(rng, n_out, n_in)
    delta_out = uniform(rng, (batch, n_out), 0.5)
    y_in = tanh_outputs(rng, (batch, n_in))
    delta_in = nan_like((batch, n_in))
    ops_mlp.backprop_delta_gemm(device, W, delta_out, y_in, delta_in)
    assert_close(delta_in, R.backprop_delta_ref(W, delta_out, y_in), **BACKPROP,
                 what=f"backprop_delta_gemm B={batch} {n_out}x{n_in}")


@pytest.mark.parametrize("batch, n_out, n_in", BATCH_CASES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_update_gemm(device, batch, n_out, n_in, momentum):
    rng = rng_for("sgd", batch, n_out, n_in, int(momentum * 10))
    W, b = layer(rng, n_out, n_in)
    delta_out = uniform(rng, (batch, n_out), 0.5)
    X = tanh_outputs(rng, (batch, n_in))
    vW = uniform(rng, W.shape, 1e-3) if momentum else None
    vb = uniform(rng, b.shape, 1e-3) if momentum else None
    dev = [a.copy() if a is not None else None for a in (W, b, vW, vb)]
    ref = [a.copy() if a is not None else None for a in (W, b, vW, vb)]
    ops_mlp.sgd_update_gemm(device, dev[0], dev[1], delta_out, X, ops_mlp.Hyperparameters(device, 0.01, momentum),
                            dev[2], dev[3])
    R.sgd_update_ref(ref[0], ref[1], delta_out, X, 0.01, momentum, ref[2], ref[3])
    for name, got, want in zip(("W", "b", "velocity_W", "velocity_b"), dev, ref):
        if want is not None:
            assert_close(got, want, **UPDATE, what=f"sgd_update_gemm.{name} B={batch} {n_out}x{n_in} mu={momentum}")


# ---- shared: train_step.cu -------------------------------------------------------------------

@pytest.mark.parametrize("batch, n_classes", [(1, 10), (7, 10), (16, 3), (33, 45), (5, 1), (32, 10)])
def test_softmax_xent(device, batch, n_classes):
    rng = rng_for("sm", batch, n_classes)
    logits = uniform(rng, (batch, n_classes), 8.0)
    labels = rng.integers(0, n_classes, batch).astype(np.int32)
    if batch > 2 and n_classes > 2:
        logits[1, :] = 3.0                    # all tied: the first class wins
        logits[2, [0, n_classes - 1]] = 20.0  # tie between the ends
        labels[1] = 0
    outs = dict(delta=nan_like((batch, n_classes)), loss=nan_like(batch),
                wrong=nan_like(batch, np.int32), prediction=nan_like(batch, np.int32))
    totals = np.array([1.25]), np.array([3], np.int32), np.array([40], np.int32)
    ops_mlp.softmax_xent(device, logits, labels, outs["delta"], outs["loss"], outs["wrong"], outs["prediction"],
                         *totals)
    ref = R.softmax_xent_ref(logits, labels)
    what = f"B={batch} C={n_classes}"
    # the fused bookkeeping: the step's own losses, added in row order, and its errors and cursor
    loss_total, wrong_total, cursor = R.finish_step_ref(outs["loss"], outs["wrong"], 1.25, 3, 40)
    assert_bitwise_equal(totals[0], np.array([loss_total]), f"softmax_xent.loss_total {what}")
    assert (int(totals[1][0]), int(totals[2][0])) == (wrong_total, cursor), what
    assert_close(outs["delta"], ref["delta"], **SOFTMAX, what=f"softmax_xent.delta {what}")
    assert_close(outs["loss"], ref["loss"], **SOFTMAX, what=f"softmax_xent.loss {what}")
    np.testing.assert_array_equal(outs["prediction"], ref["prediction"], err_msg=f"{what} prediction")
    np.testing.assert_array_equal(outs["wrong"], ref["wrong"], err_msg=f"{what} wrong")


def test_softmax_xent_accumulates_the_totals_over_steps(device):
    """The bookkeeping that finish_step did before it was fused into softmax_xent: over steps of
    B = 1, 7, 16 the totals and the cursor move on exactly as finish_step_ref says."""
    rng = rng_for("finish")
    totals = np.array([1.25]), np.array([3], np.int32), np.array([40], np.int32)
    expected = (1.25, 3, 40)
    for batch in (1, 7, 16, 32):
        logits = uniform(rng, (batch, 10), 8.0)
        labels = rng.integers(0, 10, batch).astype(np.int32)
        loss, wrong = nan_like(batch), nan_like(batch, np.int32)
        ops_mlp.softmax_xent(device, logits, labels, nan_like((batch, 10)), loss, wrong, nan_like(batch, np.int32),
                             *totals)
        ref = R.softmax_xent_ref(logits, labels)
        np.testing.assert_array_equal(wrong, ref["wrong"])
        expected = R.finish_step_ref(loss, wrong, *expected)
        assert_bitwise_equal(totals[0], np.array([expected[0]]), "loss_total")
        assert (int(totals[1][0]), int(totals[2][0])) == expected[1:]


# ---- whole steps on a tiny net ---------------------------------------------------------------

SIZES = [841, 37, 33, 10]


def reference_step(params, velocities, images, labels, order, cursor, batch, lr, momentum):
    """One training step composed from the reference functions; updates params in place."""
    x, y = R.gather_batch_ref(images, labels, order, cursor, batch)
    activations = R.forward_all(params, x)
    head = R.softmax_xent_ref(activations[-1], y)
    delta = head["delta"]
    for layer in reversed(range(len(params))):
        W, b = params[layer]
        vW, vb = velocities[layer] if momentum else (None, None)
        below = R.backprop_delta_ref(W, delta, activations[layer]) if layer else None
        R.sgd_update_ref(W, b, delta, activations[layer], lr, momentum, vW, vb)
        delta = below
    return head["loss"], head["wrong"]


class DeviceNet:
    """The trainer's buffers and launch sequence, reduced to what one step needs."""

    def __init__(self, device, params, momentum, batch, images, labels, order):
        self.d, self.batch, self.momentum = device, batch, np.float32(momentum)
        self.params = [(W.copy(), b.copy()) for W, b in params]
        self.velocities = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
        self.images, self.labels, self.order = images, labels, order
        self.cursor = np.zeros(1, np.int32)
        self.loss_total, self.wrong_total = np.zeros(1, np.float64), np.zeros(1, np.int32)
        self.x = nan_like((batch, SIZES[0]))
        self.y = nan_like(batch, np.int32)
        self.activations = [nan_like((batch, n)) for n in SIZES[1:]]
        self.deltas = [nan_like((batch, n)) for n in SIZES[1:]]
        self.partial = nan_like((ops_mlp.partial_rows(max(SIZES[1:])), max(SIZES)))
        self.loss, self.wrong = nan_like(batch), nan_like(batch, np.int32)
        self.prediction = nan_like(batch, np.int32)

    def launch_step(self, lr):
        d = self.d
        inputs = [self.x, *self.activations[:-1]]
        last = len(self.params) - 1
        for layer, (W, b) in enumerate(self.params):
            if layer == 0:   # the first forward kernel gathers the step's samples itself
                gather_forward = (ops_mlp.layer_forward_mv_gather if self.batch == 1
                                  else ops_mlp.layer_forward_gemm_gather)
                gather_forward(d, W, b, self.images, self.labels, self.order, self.cursor, self.x, self.y,
                               self.activations[0], activate=True)
                continue
            ops_mlp.layer_forward(d, W, b, inputs[layer], self.activations[layer], activate=layer < last)
        ops_mlp.softmax_xent(d, self.activations[-1], self.y, self.deltas[-1], self.loss, self.wrong,
                             self.prediction, self.loss_total, self.wrong_total, self.cursor)
        for layer in reversed(range(len(self.params))):
            W, b = self.params[layer]
            vW, vb = self.velocities[layer] if self.momentum else (None, None)
            below = self.deltas[layer - 1] if layer else None
            ops_mlp.backward_update(d, W, b, self.deltas[layer], inputs[layer], below, self.partial,
                                    ops_mlp.Hyperparameters(d, lr, self.momentum), vW, vb)


@pytest.mark.parametrize("batch, momentum", [(1, 0.0), (1, 0.9), (8, 0.0), (8, 0.9)])
def test_whole_steps_match_the_reference(device, batch, momentum):
    """gather -> forward -> softmax (+ totals) -> backward/update, for 3 steps: the first launched
    directly, the next two by replaying ONE captured step (the cursor on the device moves on)."""
    from gpumlp.nets import init_params
    rng = rng_for("step", batch, int(momentum * 10))
    n = 3 * batch + 2
    images = uniform(rng, (n, SIZES[0]))
    labels = rng.integers(0, 10, n).astype(np.int32)
    order = rng.permutation(n).astype(np.int32)
    params = init_params(SIZES, seed=batch)
    lr = 0.02
    net = DeviceNet(device, params, momentum, batch, images, labels, order)
    net.launch_step(lr)
    with device.capture() as graph:
        net.launch_step(lr)
    graph.replay()
    graph.replay()

    ref_params = [(W.copy(), b.copy()) for W, b in params]
    ref_velocities = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    total, errors = 0.0, 0
    for step in range(3):
        loss, wrong = reference_step(ref_params, ref_velocities, images, labels, order, step * batch, batch,
                                     lr, momentum)
        total, errors, _ = R.finish_step_ref(loss, wrong, total, errors, 0)
    what = f"B={batch} momentum={momentum}"
    assert int(net.cursor[0]) == 3 * batch
    assert int(net.wrong_total[0]) == errors
    assert_close(net.loss_total, np.array([total]), **LOSS, what=f"step.loss_total {what}")
    for layer, ((W, b), (ref_W, ref_b)) in enumerate(zip(net.params, ref_params)):
        assert_close(W, ref_W, **STEP, what=f"step.W {layer} {what}")
        assert_close(b, ref_b, **STEP, what=f"step.b {layer} {what}")
        # the step really moved the weights (by far more than the tolerance)
        assert np.abs(ref_W - params[layer][0]).max() > 100 * STEP["atol"]
    if momentum:
        for layer, ((vW, _), (ref_vW, _)) in enumerate(zip(net.velocities, ref_velocities)):
            assert_close(vW, ref_vW, **STEP, what=f"step.velocity_W {layer} {what}")


@pytest.mark.parametrize("batch", [1, 8])
def test_steps_are_bitwise_repeatable_across_schedules(batch):
    """No atomics: the same step on a plain emulator and on one with reversed threads and poisoned
    shared memory gives identical bits."""
    from gpumlp.nets import init_params
    rng = rng_for("repeat", batch)
    images = uniform(rng, (batch, SIZES[0]))
    labels = rng.integers(0, 10, batch).astype(np.int32)
    order = np.arange(batch, dtype=np.int32)
    results = []
    for make in DEVICES.values():
        net = DeviceNet(make(), init_params(SIZES, seed=3), 0.9, batch, images, labels, order)
        net.launch_step(0.05)
        results.append(net)
    a, b = results
    for layer in range(len(SIZES) - 1):
        assert_bitwise_equal(a.params[layer][0], b.params[layer][0], f"W{layer}")
        assert_bitwise_equal(a.deltas[layer], b.deltas[layer], f"delta{layer}")
    assert_bitwise_equal(a.loss_total, b.loss_total, "loss total")


# ---- the trainer's shapes: layers of paper net 4 (841-2500-2000-1500-1000-500-10) ---------------
# Tolerance atol + rtol |ref| with a per-element atol that grows with the length n of the sum:
# sum_tolerance = 2 sqrt(n) u sum|terms| (gpumlp/tolerances.py says why), times the largest slope of what
# follows the sum (A B for the scaled tanh, |f'(y_in)| for the backward product, lr for an update),
# and rtol PAPER_RTOL = 8 u for the roundings after the sum (tanhf against numpy's tanh: a few ulp).
# Measured (this machine, the emulator): the worst element uses at most 0.29 of its bound, 0.04 for
# the sums of 2000 and 2500 terms.
PAPER_LAYERS = [(2500, 841), (2000, 2500)]   # the widest input; the longest sums (2500 and 2000 terms)
PAPER_BATCH = 32


@pytest.mark.parametrize("n_out, n_in", PAPER_LAYERS)
def test_layer_forward_mv_at_paper_shapes(device, n_out, n_in):
    rng = rng_for("paper-mv", n_out, n_in)
    W, b = layer(rng, n_out, n_in)
    x = tanh_outputs(rng, n_in)
    y = device.empty(n_out)
    ops_mlp.layer_forward_mv(device, W, b, x, y, True)
    atol = TANH_SLOPE * sum_tolerance(abs_products(W, x) + np.abs(b), n_in)
    assert_close(y, R.layer_forward_ref(W, b, x[None], True)[0], atol, PAPER_RTOL,
                 what=f"paper.layer_forward_mv {n_out}x{n_in}")


@pytest.mark.parametrize("n_out, n_in, momentum", [(2500, 841, 0.9), (2000, 2500, 0.0)])
def test_backward_update_partial_and_reduce_at_paper_shapes(device, n_out, n_in, momentum):
    rng = rng_for("paper-bu", n_out, n_in)
    W, b = layer(rng, n_out, n_in)
    delta_out = uniform(rng, n_out, 0.5)
    x = tanh_outputs(rng, n_in)
    vW = uniform(rng, W.shape, 1e-3) if momentum else None
    vb = uniform(rng, b.shape, 1e-3) if momentum else None
    chunks = ops_mlp.partial_rows(n_out)
    partial = device.empty(chunks * n_in)
    dev = [a.copy() if a is not None else None for a in (W, b, vW, vb)]
    ops_mlp.backward_update_partial(device, dev[0], dev[1], delta_out, x, partial,
                                    ops_mlp.Hyperparameters(device, 0.01, momentum), dev[2], dev[3])
    delta_in = device.empty(n_in)
    ops_mlp.backward_reduce(device, partial, x, delta_in, n_out)
    ref = [a.copy() if a is not None else None for a in (W, b, vW, vb)]
    ref_partial = R.backward_update_partial_ref(ref[0], ref[1], delta_out, x, 0.01, momentum, ref[2], ref[3],
                                                rows_per_chunk=ops_mlp.BU_ROWS)
    what = f"{n_out}x{n_in} momentum={momentum}"
    terms = np.abs(delta_out).astype(np.float64)[:, None] * np.abs(W)
    chunk_terms = np.pad(terms, ((0, chunks * ops_mlp.BU_ROWS - n_out), (0, 0))).reshape(chunks, -1, n_in).sum(1)
    assert_close(partial.reshape(chunks, n_in), ref_partial, sum_tolerance(chunk_terms, ops_mlp.BU_ROWS),
                 PAPER_RTOL, what=f"paper.backward_update_partial.partial {what}")
    slope = np.abs(R.scaled_tanh_derivative_from_output(x))
    assert_close(delta_in, R.backprop_delta_ref(W, delta_out[None], x[None])[0],
                 slope * sum_tolerance(terms.sum(0), n_out), PAPER_RTOL, what=f"paper.backward_reduce {what}")
    for name, got, want in zip(("W", "b", "velocity_W", "velocity_b"), dev, ref):
        if want is not None:
            assert_bitwise_equal(got, want, f"{name} {what}")


@pytest.fixture(scope="module")
def paper_gemm_layer():
    """The 2000 x 2500 layer of net 4 and a batch of 32 (inputs, deltas), shared by the GEMM tests."""
    rng = rng_for("paper-gemm")
    W, b = layer(rng, 2000, 2500)
    return W, b, tanh_outputs(rng, (PAPER_BATCH, 2500)), uniform(rng, (PAPER_BATCH, 2000), 0.5)


def test_layer_forward_gemm_at_the_paper_shape(device, paper_gemm_layer):
    W, b, X, _ = paper_gemm_layer
    Y = device.empty((PAPER_BATCH, W.shape[0]))
    ops_mlp.layer_forward_gemm(device, W, b, X, Y, True)
    atol = TANH_SLOPE * sum_tolerance(abs_products(X, W.T) + np.abs(b), W.shape[1])
    assert_close(Y, R.layer_forward_ref(W, b, X, True), atol, PAPER_RTOL, what="paper.layer_forward_gemm B=32 2000x2500")


def test_backprop_delta_gemm_at_the_paper_shape(device, paper_gemm_layer):
    W, _, y_in, delta_out = paper_gemm_layer
    delta_in = device.empty(y_in.shape)
    ops_mlp.backprop_delta_gemm(device, W, delta_out, y_in, delta_in)
    atol = np.abs(R.scaled_tanh_derivative_from_output(y_in)) * sum_tolerance(abs_products(delta_out, W), W.shape[0])
    assert_close(delta_in, R.backprop_delta_ref(W, delta_out, y_in), atol, PAPER_RTOL,
                 what="paper.backprop_delta_gemm B=32 2000x2500")


def test_sgd_update_gemm_at_the_paper_shape(device, paper_gemm_layer):
    W, b, X, delta_out = paper_gemm_layer
    rng = rng_for("paper-sgd")
    vW, vb = uniform(rng, W.shape, 1e-3), uniform(rng, b.shape, 1e-3)
    dev = [a.copy() for a in (W, b, vW, vb)]
    ref = [a.copy() for a in (W, b, vW, vb)]
    lr = 0.01
    ops_mlp.sgd_update_gemm(device, *dev[:2], delta_out, X, ops_mlp.Hyperparameters(device, lr, 0.9), *dev[2:])
    R.sgd_update_ref(*ref[:2], delta_out, X, lr, 0.9, *ref[2:])
    # the gradient is a sum of B terms divided by B, then scaled by lr
    grad_W = lr * sum_tolerance(abs_products(delta_out.T, X) / PAPER_BATCH, PAPER_BATCH)
    grad_b = lr * sum_tolerance(np.abs(delta_out).sum(0) / PAPER_BATCH, PAPER_BATCH)
    for name, got, want, atol in zip(("W", "b", "velocity_W", "velocity_b"), dev, ref, (grad_W, grad_b) * 2):
        assert_close(got, want, atol, PAPER_RTOL, what=f"paper.sgd_update_gemm.{name} B=32 2000x2500")


def test_layer_forward_gemm_gather_at_the_paper_batch(device):
    """The fused gather of net 4's first layer (2500x841) at B = 32: X and the labels bit for bit,
    Y bit for bit what layer_forward_gemm computes on the gathered batch (whose own tolerance the
    paper-shape GEMM test states)."""
    rng = rng_for("paper-gather")
    W, b = layer(rng, 2500, SIZES[0])
    images = uniform(rng, (1000, SIZES[0]))
    labels = rng.integers(0, 10, 1000).astype(np.int32)
    order = rng.permutation(1000).astype(np.int32)
    X, labels_out = device.empty((PAPER_BATCH, SIZES[0])), device.empty(PAPER_BATCH, np.int32)
    Y = device.empty((PAPER_BATCH, 2500))
    ops_mlp.layer_forward_gemm_gather(device, W, b, images, labels, order, np.array([968], np.int32), X,
                                      labels_out, Y, activate=True)
    ref_X, ref_labels = R.gather_batch_ref(images, labels, order, 968, PAPER_BATCH)
    assert_bitwise_equal(X, ref_X, "gathered images")
    assert_bitwise_equal(labels_out, ref_labels, "gathered labels")
    plain = device.empty((PAPER_BATCH, 2500))
    ops_mlp.layer_forward_gemm(device, W, b, ref_X, plain, True)
    assert_bitwise_equal(Y, plain, "layer_forward_gemm_gather vs layer_forward_gemm at 2500x841")


# ---- subnormals: the emulator flushes them as CuPy's -ftz=true compiles ------------------------

def online_update_ftz_ref(W, b, vW, vb, delta_out, x, lr, momentum):
    """backward_update_partial's update (kernel order: step = lr (d x); v = mu v - step; W += v),
    every operation flushed as -ftz=true does; returns new W, b, vW, vb."""
    mul, add, sub = flushed(np.multiply), flushed(np.add), flushed(np.subtract)
    lr, momentum = np.float32(lr), np.float32(momentum)
    vW = sub(mul(momentum, vW), mul(lr, mul(delta_out[:, None], x[None, :])))
    vb = sub(mul(momentum, vb), mul(lr, delta_out))
    return add(W, vW), add(b, vb), vW, vb


def test_online_update_flushes_subnormals_like_cuda():
    """A softmax whose logits are 95 apart gives deltas ~e^-95, subnormal in float32; the first step
    (zero velocities) then makes subnormal velocities. With -ftz=true (the emulator's default)
    they are zero: the kernels must match a reference that flushes, bit for bit, and without the
    flush they match numpy's IEEE reference bit for bit."""
    n_out, n_in, lr, momentum = 10, 500, 0.01, 0.9
    rng = rng_for("ftz")
    logits = np.zeros((1, n_out), np.float32)
    logits[0, 3] = 95.0
    labels = np.array([3], np.int32)
    softmax = R.softmax_xent_ref(logits, labels)
    delta_out = softmax["delta"][0].copy()
    assert ((delta_out != 0) & (np.abs(delta_out) < np.finfo(np.float32).tiny)).sum() == n_out - 1
    delta_out[[0, 9]] = (0.3, -0.2)          # two normal deltas meet subnormal inputs and weights
    W, b = layer(rng, n_out, n_in)
    W[:, :20] *= np.float32(1e-37)           # subnormal weights (DAZ)
    x = tanh_outputs(rng, n_in)
    x[20:40] *= np.float32(1e-38)            # subnormal inputs (DAZ)
    zeros = (np.zeros_like(W), np.zeros_like(b))
    ieee = [a.copy() for a in (W, b, *zeros)]
    R.sgd_update_ref(ieee[0], ieee[1], delta_out[None], x[None], lr, momentum, ieee[2], ieee[3])
    ftz = online_update_ftz_ref(W, b, *zeros, delta_out, x, lr, momentum)
    # the references differ in 3365 of the 5000 velocities (7 rows of subnormal deltas times 480
    # normal inputs, and the subnormal inputs of the 2 normal rows): the test tells them apart
    assert (ftz[2] != ieee[2]).sum() > 3000
    for flush, want in ((True, ftz), (False, ieee)):
        device = EmulatedDevice(flush_to_zero=flush)
        got = [a.copy() for a in (W, b, *zeros)]
        partial = device.empty(ops_mlp.partial_elements(n_out, n_in))
        ops_mlp.backward_update_partial(device, got[0], got[1], delta_out, x, partial,
                                        ops_mlp.Hyperparameters(device, lr, momentum), got[2], got[3])
        for name, g, w in zip(("W", "b", "velocity_W", "velocity_b"), got, want):
            assert_bitwise_equal(g, w, f"{name} flush_to_zero={flush}")
        delta = device.empty((1, n_out))
        loss, wrong, prediction = device.empty(1), device.empty(1, np.int32), device.empty(1, np.int32)
        totals = device.zeros(1, np.float64), device.zeros(1, np.int32), device.zeros(1, np.int32)
        ops_mlp.softmax_xent(device, logits, labels, delta, loss, wrong, prediction, *totals)
        if flush:   # exp(-95) is flushed to 0 before the division
            assert_bitwise_equal(delta, flush_subnormals(softmax["delta"]), "softmax delta, flushed")
        else:
            assert_close(delta, softmax["delta"], 0.0, 1e-5, "softmax delta, IEEE subnormals")


# ---- launcher argument checks ------------------------------------------------------------------

def test_launchers_refuse_wrong_shapes_and_types():
    d = EmulatedDevice()
    W, b = np.zeros((4, 6), np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="x must have 6 elements"):
        ops_mlp.layer_forward_mv(d, W, b, np.zeros(5, np.float32), np.zeros(4, np.float32), True)
    with pytest.raises(ValueError, match="must be float32"):
        ops_mlp.layer_forward_gemm(d, W, b, np.zeros((2, 6)), np.zeros((2, 4), np.float32), True)
    with pytest.raises(ValueError, match="partial"):
        ops_mlp.backward_update_partial(d, W, b, np.zeros(4, np.float32), np.zeros(6, np.float32),
                                        np.zeros(5, np.float32), ops_mlp.Hyperparameters(d, 0.1))
    with pytest.raises(ValueError, match="velocity"):
        ops_mlp.sgd_update_gemm(d, W, b, np.zeros((2, 4), np.float32), np.zeros((2, 6), np.float32),
                                ops_mlp.Hyperparameters(d, 0.1, 0.9))


# ---- NVRTC -----------------------------------------------------------------------------------

@pytest.mark.parametrize("filename", ["mlp_online.cu", "mlp_batch.cu", "train_step.cu"])
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_compiles_with_nvrtc_without_spills(filename, arch):
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    source = (KERNEL_DIR / filename).read_text()
    program = nvrtc.createProgram(source, filename, [], [])
    try:
        nvrtc.compileProgram(program, [f"-arch={arch}", "-std=c++17", f"-I{KERNEL_DIR}", "-Xptxas=-v"])
    except nvrtc.NVRTCError as error:
        pytest.fail(f"NVRTC ({arch}): {error}\n{nvrtc.getProgramLog(program)}")
    log = nvrtc.getProgramLog(program)
    log = log.decode() if isinstance(log, bytes) else log
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and not any(spills), f"{filename} ({arch}) spills registers:\n{log}"
    assert len(re.findall(r"Compiling entry function", log)) == len(ops_mlp.KERNELS[filename]), log


def test_preload_finds_every_kernel():
    d = EmulatedDevice()
    ops_mlp.preload(d)
    for filename, names in ops_mlp.KERNELS.items():
        source = (KERNEL_DIR / filename).read_text()
        assert sorted(re.findall(r'extern "C" __global__ void (\w+)', source)) == sorted(names)
