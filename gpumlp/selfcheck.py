"""`python -m gpumlp.selfcheck`: every kernel on this machine's device against its numpy reference,
then a few online SGD steps of a small net on the device against the CPU trainer.

For a user who wants to know, before a long run, that the kernels compute the right thing on *their*
GPU (driver, NVRTC, architecture) -- or, with `--device emulate`, that the .cu text in
GPUMLP_KERNEL_DIR does. The bounds are the kernel tests' own (gpumlp/tolerances.py): every result
that is a long float32 sum (the forward products, the backward product and its partials, the
minibatch update) gets the paper-shape tests' per-element bound, which grows with the length of
the sum (sum_tolerance times the slope of what follows, plus PAPER_RTOL |ref|), at the small shapes
too; the rest keep their fixed bounds or compare bit for bit. Prints one table (kernel, shape, max
error, bound -- for a per-element bound its largest value --, used: the largest error / bound, ok)
and one verdict line; exit 1 on any mismatch, naming the kernels. `reproduce_2010.py` runs the
quick part (`quick_check`: small shapes and the training steps) before it trains on a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

from gpumlp import ops_deform, ops_mlp
from gpumlp import reference as R
from gpumlp.errors import UserError
from gpumlp.tolerances import (DEFORM, LOSS, PAPER_RTOL, SOFTMAX, STEP, Comparison, backprop_atol, compare,
                               first_difference, forward_atol, partial_atol, update_atol)

EXIT_MISMATCH = 1
LR, MOMENTUM = 0.01, 0.9          # the updates are checked on their momentum path (the harder one)
TRAINING_STEPS = 20
TRAINING_HIDDEN = [48, 24]


@dataclass(frozen=True)
class Shapes:
    """One set of launch shapes: a layer (n_out, n_in), the minibatch, and the images deformed."""
    name: str
    n_out: int
    n_in: int
    batch: int
    images: int


# Small: sizes that are multiples of nothing (tails in every tile, chunk and warp).
SMALL = Shapes("small", 33, 37, 7, 7)
# The widest layer of the paper's net 4 (2500 -> 2000, the most terms per sum: 2500 in the forward
# products, 2000 in the backward ones) with a minibatch of 32 and 64 digits deformed; the emulator
# takes a few seconds for it.
PAPER = Shapes("paper (net 4, layer 2)", 2000, 2500, 32, 64)


@dataclass
class Check:
    kernel: str
    shape: str
    bound: str
    result: Comparison

    @property
    def ok(self) -> bool:
        return self.result.ok


def _bound(tolerance: dict) -> str:
    return f"{tolerance['atol']:g} + {tolerance['rtol']:g}|ref|"


def _flat(*arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


class Checker:
    """Runs launchers on `device` with host inputs uploaded, and compares what comes back."""

    def __init__(self, device):
        self.device = device
        self.checks: list[Check] = []

    def up(self, array):
        """A device copy (the emulator's asarray may share the host array, which the kernels
        then update in place under the reference's inputs)."""
        return self.device.asarray(np.array(array, copy=True))

    def down(self, array) -> np.ndarray:
        return self.device.to_host(array)

    def unwritten(self, shape, dtype=np.float32):
        """Device memory filled with NaN (or -7): a kernel that leaves part of it unwritten shows."""
        fill = np.nan if np.dtype(dtype).kind == "f" else -7
        return self.up(np.full(shape, fill, dtype))

    def close(self, kernel, shape, actual, ref, tolerance) -> None:
        self.checks.append(Check(kernel, shape, _bound(tolerance), compare(actual, ref, **tolerance)))

    def close_sum(self, kernel, shape, actual, ref, atol) -> None:
        """A long sum: within the per-element `atol` (from sum_tolerance) + PAPER_RTOL |ref|."""
        atol = np.asarray(atol, np.float64).ravel()
        ref = np.asarray(ref).ravel()
        largest = float(np.max(atol + PAPER_RTOL * np.abs(ref.astype(np.float64))))
        self.checks.append(Check(kernel, shape, f"per element, max {largest:.3g}",
                                 compare(np.asarray(actual).ravel(), ref, atol, PAPER_RTOL)))

    def exact(self, kernel, shape, actual, ref) -> None:
        self.checks.append(Check(kernel, shape, "bitwise", first_difference(actual, ref)))

    def failed_to_run(self, kernel, shape, error: Exception) -> None:
        message = " ".join(f"{type(error).__name__}: {error}".split())
        self.checks.append(Check(kernel, shape, "-", Comparison(float("nan"), 0, 0, mismatch=f"raised {message}")))


def _layer(rng, n_out, n_in):
    return (rng.uniform(-0.05, 0.05, (n_out, n_in)).astype(np.float32),
            rng.uniform(-0.05, 0.05, n_out).astype(np.float32))


def _uniform(rng, shape, scale=1.0):
    return rng.uniform(-scale, scale, shape).astype(np.float32)


# -- the kernels -------------------------------------------------------------------------------------
def check_online(ch: Checker, rng, s: Shapes) -> None:
    """mlp_online.cu: layer_forward_mv(_gather), backward_update_partial (momentum), backward_reduce."""
    d, shape = ch.device, f"W {s.n_out}x{s.n_in}"
    W, b = _layer(rng, s.n_out, s.n_in)
    x = _uniform(rng, s.n_in)
    y = ch.unwritten(s.n_out)
    ops_mlp.layer_forward_mv(d, ch.up(W), ch.up(b), ch.up(x), y, activate=True)
    ch.close_sum("layer_forward_mv", shape, ch.down(y), R.layer_forward_ref(W, b, x[None], True)[0],
                 forward_atol(W, b, x))

    delta_out = _uniform(rng, s.n_out, 0.5)
    x = _uniform(rng, s.n_in, 1.7)     # the outputs of a scaled-tanh layer, for f'(x) too
    vW, vb = _uniform(rng, W.shape, 1e-3), _uniform(rng, b.shape, 1e-3)
    dev = [ch.up(a) for a in (W, b, vW, vb)]
    chunks = ops_mlp.partial_rows(s.n_out)
    partial, delta_in = ch.unwritten(chunks * s.n_in), ch.unwritten(s.n_in)
    x_dev, hyper = ch.up(x), ops_mlp.Hyperparameters(d, LR, MOMENTUM)
    ops_mlp.backward_update_partial(d, dev[0], dev[1], ch.up(delta_out), x_dev, partial, hyper, dev[2], dev[3])
    ops_mlp.backward_reduce(d, partial, x_dev, delta_in, s.n_out)
    ref = [a.copy() for a in (W, b, vW, vb)]
    ref_partial = R.backward_update_partial_ref(*ref[:2], delta_out, x, LR, MOMENTUM, *ref[2:],
                                                rows_per_chunk=ops_mlp.BU_ROWS)
    ch.close_sum("backward_update_partial", f"{shape} partials", ch.down(partial).reshape(chunks, s.n_in),
                 ref_partial, partial_atol(W, delta_out, ops_mlp.BU_ROWS))
    ch.exact("backward_update_partial", f"{shape} W, b, velocities", _flat(*map(ch.down, dev)), _flat(*ref))
    ch.close_sum("backward_reduce", f"{shape}, {chunks} chunks -> delta_in", ch.down(delta_in),
                 R.backprop_delta_ref(W, delta_out[None], x[None])[0], backprop_atol(W, delta_out, x))

    # the first layer's fused gather (3 images, the one at position 1 of the order)
    images, labels = _uniform(rng, (3, s.n_in)), np.arange(3, dtype=np.int32)
    order = np.array([2, 0, 1], np.int32)
    X, label, y = ch.unwritten(s.n_in), ch.unwritten(1, np.int32), ch.unwritten(s.n_out)
    ops_mlp.layer_forward_mv_gather(d, ch.up(W), ch.up(b), ch.up(images), ch.up(labels), ch.up(order),
                                    ch.up(np.array([1], np.int32)), X, label, y, activate=True)
    ref_X, ref_label, ref_y = R.layer_forward_mv_gather_ref(W, b, images, labels, order, 1, True)
    ch.close_sum("layer_forward_mv_gather", shape, ch.down(y), ref_y, forward_atol(W, b, ref_X))
    ch.exact("layer_forward_mv_gather", f"{shape} gathered image, label",
             _flat(ch.down(X), ch.down(label).astype(np.float32)), _flat(ref_X, np.float32(ref_label)))


def check_batch(ch: Checker, rng, s: Shapes) -> None:
    """mlp_batch.cu: layer_forward_gemm(_gather), backprop_delta_gemm, sgd_update_gemm (momentum)."""
    d, shape = ch.device, f"B={s.batch}, W {s.n_out}x{s.n_in}"
    W, b = _layer(rng, s.n_out, s.n_in)
    X = _uniform(rng, (s.batch, s.n_in))
    Y = ch.unwritten((s.batch, s.n_out))
    ops_mlp.layer_forward_gemm(d, ch.up(W), ch.up(b), ch.up(X), Y, activate=True)
    ch.close_sum("layer_forward_gemm", shape, ch.down(Y), R.layer_forward_ref(W, b, X, True), forward_atol(W, b, X))

    delta_out = _uniform(rng, (s.batch, s.n_out), 0.5)
    y_in = _uniform(rng, (s.batch, s.n_in), 1.7)
    delta_in = ch.unwritten((s.batch, s.n_in))
    ops_mlp.backprop_delta_gemm(d, ch.up(W), ch.up(delta_out), ch.up(y_in), delta_in)
    ch.close_sum("backprop_delta_gemm", shape, ch.down(delta_in), R.backprop_delta_ref(W, delta_out, y_in),
                 backprop_atol(W, delta_out, y_in))

    vW, vb = _uniform(rng, W.shape, 1e-3), _uniform(rng, b.shape, 1e-3)
    dev = [ch.up(a) for a in (W, b, vW, vb)]
    hyper = ops_mlp.Hyperparameters(d, LR, MOMENTUM)
    ops_mlp.sgd_update_gemm(d, dev[0], dev[1], ch.up(delta_out), ch.up(y_in), hyper, dev[2], dev[3])
    ref = [a.copy() for a in (W, b, vW, vb)]
    R.sgd_update_ref(ref[0], ref[1], delta_out, y_in, LR, MOMENTUM, ref[2], ref[3])
    atol_W, atol_b = update_atol(delta_out, y_in, LR)
    ch.close_sum("sgd_update_gemm", f"{shape} W, b, velocities", _flat(*map(ch.down, dev)), _flat(*ref),
                 _flat(atol_W, atol_b, atol_W, atol_b))

    # the first layer's fused gather, on a 10 x 841 layer (the gather is what is new)
    n, features, cursor = 2 * s.batch + 3, 841, s.batch
    W_first, b_first = _layer(rng, 10, features)
    images = _uniform(rng, (n, features))
    image_labels = rng.integers(0, 10, n).astype(np.int32)
    order = rng.permutation(n).astype(np.int32)
    X_out, labels_out, Y_first = (ch.unwritten((s.batch, features)), ch.unwritten(s.batch, np.int32),
                                  ch.unwritten((s.batch, 10)))
    ops_mlp.layer_forward_gemm_gather(d, ch.up(W_first), ch.up(b_first), ch.up(images), ch.up(image_labels),
                                      ch.up(order), ch.up(np.array([cursor], np.int32)), X_out, labels_out, Y_first,
                                      activate=True)
    ref_X, ref_labels, ref_Y = R.layer_forward_gemm_gather_ref(W_first, b_first, images, image_labels, order, cursor,
                                                               s.batch, True)
    gather_shape = f"B={s.batch}, W 10x{features}"
    ch.close_sum("layer_forward_gemm_gather", gather_shape, ch.down(Y_first), ref_Y,
                 forward_atol(W_first, b_first, ref_X))
    ch.exact("layer_forward_gemm_gather", f"{gather_shape} gathered images, labels",
             _flat(ch.down(X_out), ch.down(labels_out).astype(np.float32)), _flat(ref_X, ref_labels.astype(np.float32)))


def check_step_kernels(ch: Checker, rng, s: Shapes) -> None:
    """train_step.cu: softmax_xent (with the step's totals)."""
    d, B, C = ch.device, s.batch, 10
    logits = _uniform(rng, (B, C), 8.0)
    labels = rng.integers(0, C, B).astype(np.int32)
    outs = [ch.unwritten((B, C)), ch.unwritten(B), ch.unwritten(B, np.int32), ch.unwritten(B, np.int32)]
    totals = [ch.up(np.array([1.25])), ch.up(np.array([3], np.int32)), ch.up(np.array([40], np.int32))]
    ops_mlp.softmax_xent(d, ch.up(logits), ch.up(labels), *outs, *totals)
    delta, loss, wrong, prediction = map(ch.down, outs)
    ref = R.softmax_xent_ref(logits, labels)
    ch.close("softmax_xent", f"{B}x{C} delta, loss", _flat(delta, loss), _flat(ref["delta"], ref["loss"]), SOFTMAX)
    ch.exact("softmax_xent", f"{B}x{C} prediction, wrong", _flat(prediction, wrong),
             _flat(ref["prediction"], ref["wrong"]).astype(np.int32))

    total, errors, moved = R.finish_step_ref(loss, wrong, 1.25, 3, 40)   # the step's bookkeeping, fused in
    ch.exact("softmax_xent", f"B={B} totals, cursor", _flat(*map(ch.down, totals)).astype(np.float64),
             np.array([total, errors, moved], np.float64))


def check_deform(ch: Checker, rng, s: Shapes) -> None:
    """deform.cu: deform_images (parameters bitwise, pixels within DEFORM) and philox_fill."""
    from gpumlp.deform import PIXELS, DeformConfig, deform_images_ref
    from gpumlp.philox import philox_fill_ref
    d, n = ch.device, s.images
    images = np.where(rng.random((n, PIXELS)) < 0.5, -1.0, 1.0).astype(np.float32)   # the steepest case
    labels = (np.arange(n) * 7 % 10).astype(np.int32)                                # 1 and 7 included
    out, params = ch.unwritten((n, PIXELS)), ch.unwritten((n, 4))
    cfg = DeformConfig()
    ops_deform.deform_images(d, ch.up(images), ch.up(labels), None, out, params, 123, 4, cfg)
    ref, ref_params = deform_images_ref(images, labels, None, 123, 4, cfg)
    ch.exact("deform_images", f"{n} images: parameters", ch.down(params), ref_params)
    ch.close("deform_images", f"{n} images: pixels", ch.down(out), ref, DEFORM)

    indices = np.array([0, 7, 59999, 2**31 - 1, 12345, 3, 1][:n], dtype=np.int32)
    blocks = 3
    words = ch.up(np.zeros((len(indices), 4 * blocks), np.uint32))
    ops_deform.philox_fill(d, ch.up(indices), words, blocks, 0xDEADBEEF, 17)
    ch.exact("philox_fill", f"{len(indices)}x{blocks} blocks", ch.down(words),
             philox_fill_ref(0xDEADBEEF, 17, indices, blocks))


KERNEL_CHECKS = {"mlp_online.cu": check_online, "mlp_batch.cu": check_batch, "train_step.cu": check_step_kernels,
                 "deform.cu": check_deform}


def check_kernels(ch: Checker, shapes: Shapes) -> None:
    for source, check in KERNEL_CHECKS.items():
        rng = np.random.default_rng([len(source), shapes.n_out, shapes.n_in])
        try:
            check(ch, rng, shapes)
        except Exception as error:   # a kernel that fails to compile or launch is a failed check
            ch.failed_to_run(source, shapes.name, error)


# -- whole online steps ----------------------------------------------------------------------------
def check_training(ch: Checker, steps: int = TRAINING_STEPS) -> None:
    """`steps` online SGD steps of an 841-48-24-10 net on the device (DeviceTrainer: the captured
    graph, the device counters) against the CPU trainer (the numpy reference), same weights and
    order: the mean loss, the error count and every weight after the last step."""
    from gpumlp import nets
    from gpumlp.config import TrainConfig
    from gpumlp.train_cpu import CpuTrainer
    from gpumlp.train_gpu import DeviceTrainer
    from gpumlp.training import Split
    config = TrainConfig(net=None, hidden=TRAINING_HIDDEN, batch_size=1, lr=LR, augment=False, seed=3)
    rng = np.random.default_rng(20)
    images = _uniform(rng, (steps, nets.N_INPUTS))
    labels = (np.arange(steps) % nets.N_CLASSES).astype(np.int32)
    order = rng.permutation(steps).astype(np.int32)
    params = nets.init_params(config.sizes, config.seed)
    shape = f"{steps} steps, net {nets.describe(config.sizes)}"
    try:
        split = Split(images, labels, images, labels, images[:1], labels[:1])
        # copies: on the emulator the trainer's "device" arrays may be the host arrays themselves
        device = DeviceTrainer(ch.device, [(W.copy(), b.copy()) for W, b in params], split, config,
                               log=lambda _: None)
        device_loss, device_error = device.train_epoch(1, LR, order)
        device_state = device.get_state()
    except Exception as error:
        ch.failed_to_run("DeviceTrainer", shape, error)
        return
    cpu = CpuTrainer(params, images, labels, 1, 0.0, None, config.seed)
    cpu_loss, cpu_error = cpu.train_epoch(1, LR, order)
    ch.close("training steps", f"{shape}: mean loss", np.array([device_loss]), np.array([cpu_loss]), LOSS)
    ch.exact("training steps", f"{shape}: errors", np.array([round(device_error * steps)]),
             np.array([round(cpu_error * steps)]))
    ch.close("training steps", f"{shape}: weights", _flat(*(a for p in device_state["params"] for a in p)),
             _flat(*(a for p in cpu.get_state()["params"] for a in p)), STEP)


# -- the report ------------------------------------------------------------------------------------
def run_checks(device, paper: bool) -> list[Check]:
    ch = Checker(device)
    check_kernels(ch, SMALL)
    if paper:
        check_kernels(ch, PAPER)
    check_training(ch)
    return ch.checks


def failed_kernels(checks: list[Check]) -> list[str]:
    return list(dict.fromkeys(c.kernel for c in checks if not c.ok))


def table(checks: list[Check]) -> str:
    rows = [("kernel", "shape", "max error", "bound", "used", "ok")]
    for c in checks:
        error = "-" if np.isnan(c.result.max_error) else f"{c.result.max_error:.3g}"
        used = "-" if np.isnan(c.result.used) else f"{c.result.used:.2g}"
        rows.append((c.kernel, c.shape, error, c.bound, used, "ok" if c.ok else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    for c in checks:
        if not c.ok:
            r = c.result
            detail = r.mismatch or f"{r.bad} of {r.size} elements out of bounds; {r.worst}"
            lines.append(f"  {c.kernel} ({c.shape}): {detail}")
    return "\n".join(lines)


def verdict(checks: list[Check], device_name: str, seconds: float) -> str:
    failed = failed_kernels(checks)
    if not failed:
        return f"selfcheck passed: {len(checks)} checks on {device_name} in {seconds:.1f} s"
    bad = sum(not c.ok for c in checks)
    return (f"selfcheck FAILED on {device_name}: {', '.join(failed)} ({bad} of {len(checks)} checks "
            f"out of bounds)")


class SelfCheckFailed(UserError):
    """A kernel disagrees with its reference on this device."""

    exit_code = EXIT_MISMATCH


def quick_check(device, log) -> None:
    """The part reproduce_2010.py runs before training on a GPU: small shapes and the training
    steps. Raises SelfCheckFailed naming the kernels that disagree."""
    started = time.perf_counter()
    checks = run_checks(device, paper=False)
    line = verdict(checks, getattr(device, "name", "the device"), time.perf_counter() - started)
    if failed_kernels(checks):
        log(table(checks))
        raise SelfCheckFailed(f"{line}; the GPU does not compute what the reference does: see the table "
                              f"above (or run python -m gpumlp.selfcheck); --skip-selfcheck trains anyway")
    log(line)


def build_parser() -> argparse.ArgumentParser:
    from gpumlp.commands import OneLineErrorParser
    p = OneLineErrorParser(prog="python -m gpumlp.selfcheck",
                           description="Run every kernel on the device against its numpy reference "
                                       "(small and paper shapes, the kernel tests' tolerances), then "
                                       f"{TRAINING_STEPS} online SGD steps of a small net against the CPU "
                                       "trainer; exit 1 on any mismatch.")
    p.add_argument("--device", choices=("cuda", "emulate"),
                   help="cuda: the GPU; emulate: the CPU emulator running the same .cu files "
                        "(default: cuda when a GPU is usable, else emulate)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and the training steps only (what reproduce_2010.py runs)")
    return p


def main(argv=None) -> int:
    from gpumlp.commands import run_command
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


def run(args) -> int:
    from gpumlp.cli import choose_device
    from gpumlp.device import gpu_available
    requested = args.device or ("cuda" if gpu_available() else "emulate")
    device = choose_device(requested, log=print)
    started = time.perf_counter()
    shapes = SMALL.name if args.quick else f"{SMALL.name} and {PAPER.name}: {PAPER.n_in} -> {PAPER.n_out}"
    print(f"selfcheck on {device.name} ({shapes} shapes)", flush=True)
    checks = run_checks(device, paper=not args.quick)
    print(table(checks))
    print(verdict(checks, device.name, time.perf_counter() - started))
    return EXIT_MISMATCH if failed_kernels(checks) else 0


if __name__ == "__main__":
    sys.exit(main())
