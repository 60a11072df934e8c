"""The analytical cost of each kernel launch: bytes that must cross DRAM and floating-point
operations, computed from the launch's own arguments (array shapes and scalars), and the
bandwidth bound of online SGD.

Bytes count every array a kernel touches once (reads plus writes): the traffic a perfect cache
would leave. Re-reads that hit L2 (x of a matrix-vector product, read by every block) are not
counted, so achieved GB/s against this model is the useful bandwidth. FLOPs: a multiply-add
counts two, every other float operation one, as the kernel writes them.

A new kernel needs one `@cost_model("name")` function here; the parameters reach it by the names
of the kernel's own signature in cuda_kernels/.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gpumlp import nets, ops_mlp
from gpumlp.compile_gate import strip_comments
from gpumlp.device import KERNEL_DIR

# Online SGD streams every weight three times per image: read for the forward pass, then read and
# written again by the fused backward+update pass.
BYTES_PER_WEIGHT_ONLINE = 3 * 4


@dataclass(frozen=True)
class Cost:
    bytes: int      # DRAM traffic if every array is moved exactly once (reads + writes)
    flops: int      # multiply-adds count two, every other float operation one, as written
    shape: str      # what the launch works on, for the table


COST_MODELS = {}


def cost_model(kernel_name: str):
    def register(function):
        COST_MODELS[kernel_name] = function
        return function
    return register


F32 = 4   # bytes of a float32, int32 or the cursor


def uses_momentum(p) -> bool:
    """Whether an update kernel's launch takes the momentum path: the momentum itself is in device
    memory (ops_mlp.Hyperparameters), but without it the launchers pass W and b as placeholder
    velocities, so real velocity arrays mean momentum."""
    return p["vW"] is not p["W"]


@cost_model("layer_forward_mv")
def _layer_forward_mv(p) -> Cost:
    n_out, n_in = int(p["n_out"]), int(p["n_in"])
    # read W, b, x; write y. Bias add, then tanh and two scalings when activated. The warps that
    # share a row (warps_per_row) exchange accumulators in shared memory, not DRAM.
    epilogue = 4 if int(p["activate"]) else 1
    return Cost(F32 * (n_out * n_in + n_out + n_in + n_out), 2 * n_out * n_in + epilogue * n_out,
                f"W {n_out}x{n_in}")


@cost_model("layer_forward_mv_gather")
def _layer_forward_mv_gather(p) -> Cost:
    forward = _layer_forward_mv(p)
    # and the gather: read the cursor, one order entry and the label; write the image copy and
    # the label (the image itself is the x that layer_forward_mv reads)
    return Cost(forward.bytes + F32 * (1 + 1 + 1 + int(p["n_in"]) + 1), forward.flops, forward.shape)


@cost_model("backward_update_partial")
def _backward_update_partial(p) -> Cost:
    n_out, n_in = int(p["n_out"]), int(p["n_in"])
    momentum = uses_momentum(p)
    chunks = ops_mlp.partial_rows(n_out)
    weights = n_out * n_in
    # read and write W and b (and their velocities), read delta_out and x, write the partials
    traffic = 2 * (weights + n_out) * (2 if momentum else 1) + n_out + n_in
    traffic += chunks * n_in if int(p["want_partial"]) else 0
    # per weight: old*delta into the partial sum (2), lr*(delta*x) (2), the step (1; 3 with momentum)
    per_weight = 2 + 2 + (3 if momentum else 1)
    per_bias = 1 + (3 if momentum else 1)
    return Cost(F32 * traffic, per_weight * weights + per_bias * n_out, f"W {n_out}x{n_in}")


@cost_model("backward_reduce")
def _backward_reduce(p) -> Cost:
    chunks, n_in = int(p["n_chunks"]), int(p["n_in"])
    # read the partials and y_in, write delta_in; add the chunks, then f'(y) (3) and the product
    return Cost(F32 * (chunks * n_in + 2 * n_in), (chunks - 1 + 4) * n_in, f"{chunks}x{n_in} partials")


@cost_model("layer_forward_gemm")
def _layer_forward_gemm(p) -> Cost:
    batch, n_out, n_in = int(p["batch"]), int(p["n_out"]), int(p["n_in"])
    epilogue = 4 if int(p["activate"]) else 1
    return Cost(F32 * (batch * n_in + n_out * n_in + n_out + batch * n_out),
                2 * batch * n_out * n_in + epilogue * batch * n_out, f"{batch}x{n_in} . W {n_out}x{n_in}")


@cost_model("layer_forward_gemm_gather")
def _layer_forward_gemm_gather(p) -> Cost:
    forward = _layer_forward_gemm(p)
    batch, n_in = int(p["batch"]), int(p["n_in"])
    # and the gather: read the cursor, B order entries and labels; write the batch's copy and its
    # labels (the gathered images themselves are the X that layer_forward_gemm reads)
    return Cost(forward.bytes + F32 * (1 + 2 * batch + batch * n_in + batch), forward.flops, forward.shape)


@cost_model("backprop_delta_gemm")
def _backprop_delta_gemm(p) -> Cost:
    batch, n_out, n_in = int(p["batch"]), int(p["n_out"]), int(p["n_in"])
    # read delta_out, W, y_in; write delta_in; f'(y) (3) and the product per element
    return Cost(F32 * (batch * n_out + n_out * n_in + 2 * batch * n_in),
                2 * batch * n_out * n_in + 4 * batch * n_in, f"{batch}x{n_out} . W {n_out}x{n_in}")


@cost_model("sgd_update_gemm")
def _sgd_update_gemm(p) -> Cost:
    batch, n_out, n_in = int(p["batch"]), int(p["n_out"]), int(p["n_in"])
    momentum = uses_momentum(p)
    weights = n_out * n_in
    traffic = batch * n_out + batch * n_in + 2 * (weights + n_out) * (2 if momentum else 1)
    # the gradient product, then per weight: /B, *lr, the step (1; 3 with momentum); biases alike
    step = 2 + (3 if momentum else 1)
    return Cost(F32 * traffic, 2 * batch * weights + step * weights + (batch + step) * n_out,
                f"W {n_out}x{n_in}, B={batch}")


@cost_model("softmax_xent")
def _softmax_xent(p) -> Cost:
    rows, classes = int(p["n_rows"]), int(p["n_classes"])
    # read logits and labels; write delta, loss, wrong, prediction; read and write the two totals
    # (one double) and the cursor. Per class: max, sub+exp+add, then sub+exp+div (+ the label's
    # sub); per row: log and two subs, and its loss added to the double total.
    return Cost(F32 * (2 * rows * classes + 4 * rows) + 2 * (8 + F32 + F32), 7 * rows * classes + 4 * rows,
                f"{rows}x{classes}")


SIDE = 29


@cost_model("deform_images")
def _deform_images(p) -> Cost:
    n, radius = int(p["n_images"]), int(p["radius"])
    pixels = SIDE * SIDE
    # read each image and label, write the image and 4 parameters (the taps are negligible)
    traffic = n * (2 * pixels + 1 + 1 + 4) + 2 * radius + 1
    # Separable smoothing of the two displacement fields: each pass does a multiply and an add per
    # tap inside the 29-pixel line; then alpha. Resampling: about 18 operations per pixel
    # (affine map, floor, bilinear weights). Philox is integer work and not counted.
    taps_per_line = sum(min(radius, SIDE - 1 - x) + min(radius, x) + 1 for x in range(SIDE))
    elastic = float(p["alpha"]) != 0.0
    smoothing = (2 * 2 * SIDE * taps_per_line * 2 + 2 * pixels) if elastic else 0
    return Cost(F32 * traffic, n * (smoothing + 18 * pixels), f"{n} image{'' if n == 1 else 's'}")


def kernel_parameters(source_text: str, kernel_name: str) -> list[str]:
    """The parameter names of a __global__ function, read from its definition."""
    text = strip_comments(source_text)
    m = re.search(r"__global__\s+[^;{]*?\b" + re.escape(kernel_name) + r"\s*\(([^)]*)\)", text)
    if not m:
        raise ValueError(f"no __global__ {kernel_name} in the source")
    return [re.findall(r"\w+", parameter)[-1] for parameter in m.group(1).split(",")]


def launch_cost(source: str, kernel: str, args) -> Cost | None:
    """The cost of launching `kernel` of cuda_kernels/`source` with `args`; None for a kernel the
    model does not know yet."""
    model = COST_MODELS.get(kernel)
    if model is None:
        return None
    names = kernel_parameters((KERNEL_DIR / source).read_text(), kernel)
    if len(names) != len(args):
        raise ValueError(f"{kernel}: {len(args)} arguments for {len(names)} parameters")
    return model(dict(zip(names, args)))

def online_bytes_per_image(sizes) -> int:
    """Bytes online SGD must move per image: every weight and bias read, read again and written."""
    return BYTES_PER_WEIGHT_ONLINE * nets.count_weights(sizes)


def bound_seconds(sizes, bandwidth: float) -> float:
    """The least time one image of online SGD can take: its weight traffic at peak bandwidth."""
    return online_bytes_per_image(sizes) / bandwidth


