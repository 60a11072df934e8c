"""Numpy reference of the network: the specification every CUDA kernel is checked against.

One function per operation a kernel implements, in float32, written for clarity. A batch of B
samples is a 2-D array (B, n); the paper's online mode is B = 1. Layer l maps n_in -> n_out with
W of shape (n_out, n_in) and b of shape (n_out,).

Hidden units use the paper's scaled tanh y = A tanh(B a) (LeCun's 1.7159 tanh(2/3 a)); the output
layer is linear and feeds a softmax with cross-entropy loss.
"""
from __future__ import annotations

import numpy as np

TANH_A = np.float32(1.7159)
TANH_B = np.float32(0.6666)
F32 = np.float32


def scaled_tanh(a: np.ndarray) -> np.ndarray:
    """y = A tanh(B a), any shape."""
    return (TANH_A * np.tanh(TANH_B * a)).astype(F32)


def scaled_tanh_derivative_from_output(y: np.ndarray) -> np.ndarray:
    """dy/da expressed through y itself (so backward needs no stored pre-activation):
    dy/da = A B (1 - tanh^2) = (B / A) (A^2 - y^2)."""
    return ((TANH_B / TANH_A) * (TANH_A * TANH_A - y * y)).astype(F32)


def layer_forward_ref(W: np.ndarray, b: np.ndarray, x: np.ndarray, activate: bool = True) -> np.ndarray:
    """a = x W^T + b, then y = A tanh(B a) for hidden layers (activate=True) or y = a (output).

    W (n_out, n_in), b (n_out,), x (B, n_in) -> y (B, n_out)."""
    a = (x @ W.T + b).astype(F32)
    return scaled_tanh(a) if activate else a


def forward_all(params, x: np.ndarray) -> list[np.ndarray]:
    """Activations (a composition of layer_forward_ref, no kernel of its own) of every layer for a batch x (B, 841): [x, y1, ..., logits]."""
    activations = [x]
    last = len(params) - 1
    for layer, (W, b) in enumerate(params):
        activations.append(layer_forward_ref(W, b, activations[-1], activate=layer < last))
    return activations


def softmax_xent_ref(logits: np.ndarray, labels: np.ndarray):
    """Softmax, cross-entropy loss, output delta and error count for a batch.

    logits (B, n_classes), labels (B,) ints -> dict with
      probs (B, n_classes); loss (B,) = -log p[label]; delta (B, n_classes) = p - onehot(label),
      the gradient of the loss with respect to the logits; prediction (B,) int32 = argmax (first
      maximum on ties); wrong (B,) int32 = prediction != label."""
    logits = logits.astype(F32)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    probs = (exp / total).astype(F32)
    rows = np.arange(len(labels))
    loss = (np.log(total[:, 0]) - shifted[rows, labels]).astype(F32)
    delta = probs.copy()
    delta[rows, labels] -= F32(1)
    prediction = logits.argmax(axis=1).astype(np.int32)
    wrong = (prediction != labels).astype(np.int32)
    return {"probs": probs, "loss": loss, "delta": delta, "prediction": prediction, "wrong": wrong}


def backprop_delta_ref(W: np.ndarray, delta_out: np.ndarray, y_in: np.ndarray) -> np.ndarray:
    """Delta of the layer below: (delta_out W) * f'(y_in), using W before its update.

    W (n_out, n_in), delta_out (B, n_out), y_in (B, n_in) the scaled-tanh outputs of the layer
    below -> delta_in (B, n_in)."""
    return ((delta_out @ W) * scaled_tanh_derivative_from_output(y_in)).astype(F32)


def sgd_update_ref(W, b, delta_out, x, lr, momentum=0.0, velocity_W=None, velocity_b=None):
    """One SGD step on the mean gradient of the batch, in place.

    W (n_out, n_in), b (n_out,), delta_out (B, n_out), x (B, n_in) the layer's input.
    grad_W = delta_out^T x / B, grad_b = mean of delta_out over the batch.
    Without momentum: W -= lr grad. With momentum mu: v = mu v - lr grad; W += v (velocities
    (n_out, n_in) and (n_out,) updated in place)."""
    batch = F32(delta_out.shape[0])
    # np.outer for one sample: a matrix product with inner size 1 is ~3x slower in BLAS, and one
    # product per element is the same number either way.
    product = np.outer(delta_out[0], x[0]) if len(delta_out) == 1 else delta_out.T @ x
    grad_W = (product / batch).astype(F32)
    grad_b = (delta_out.sum(axis=0) / batch).astype(F32)
    lr = F32(lr)
    if momentum:
        velocity_W *= F32(momentum)
        velocity_W -= lr * grad_W
        velocity_b *= F32(momentum)
        velocity_b -= lr * grad_b
        W += velocity_W
        b += velocity_b
    else:
        W -= lr * grad_W
        b -= lr * grad_b


# ---- references of the fused / bookkeeping kernels (cuda_kernels/mlp_online.cu, train_step.cu) ----

def backward_update_partial_ref(W, b, delta_out, x, lr, momentum=0.0, velocity_W=None, velocity_b=None,
                                rows_per_chunk: int = 32) -> np.ndarray:
    """The online backward product and SGD step of one layer in one pass (batch of one sample).

    W (n_out, n_in), b (n_out,), delta_out (n_out,), x (n_in,) the layer's input; velocities as in
    sgd_update_ref. Returns partial (ceil(n_out / rows_per_chunk), n_in): row c is
    delta_out[rows of chunk c] @ W[rows of chunk c] with the weights BEFORE the update; then
    updates W, b (and the velocities) in place exactly as sgd_update_ref on the batch (1, .)."""
    n_out = W.shape[0]
    partial = np.stack([delta_out[s:s + rows_per_chunk] @ W[s:s + rows_per_chunk]
                        for s in range(0, n_out, rows_per_chunk)]).astype(F32)
    sgd_update_ref(W, b, delta_out[None, :], x[None, :], lr, momentum, velocity_W, velocity_b)
    return partial


def backward_reduce_ref(partial: np.ndarray, y_in: np.ndarray) -> np.ndarray:
    """delta_in (n_in,) = (sum over chunks of partial) * f'(y_in).

    partial (n_chunks, n_in) from backward_update_partial_ref, y_in (n_in,). Together the two
    equal backprop_delta_ref(W_old, delta_out[None], y_in[None])[0] up to summation order."""
    return (partial.sum(axis=0, dtype=F32) * scaled_tanh_derivative_from_output(y_in)).astype(F32)


def layer_forward_mv_gather_ref(W, b, images, labels, order, cursor: int, activate: bool = True):
    """The first layer of an online step with its gather (a composition of gather_batch_ref and
    layer_forward_ref): the sample at position `cursor` of the epoch and the layer's output on it.

    W (n_out, n_in), b (n_out,), images (N, n_in), labels (N,), order (N,) a permutation ->
    X (n_in,) the gathered image, label (int), y (n_out,)."""
    X, label = gather_batch_ref(images, labels, order, cursor, 1)
    return X[0], int(label[0]), layer_forward_ref(W, b, X, activate)[0]


def layer_forward_gemm_gather_ref(W, b, images, labels, order, cursor: int, batch: int, activate: bool = True):
    """The first layer of a minibatch step with its gather (a composition of gather_batch_ref and
    layer_forward_ref): the `batch` samples from position `cursor` of the epoch and the layer's
    output on them.

    W (n_out, n_in), b (n_out,), images (N, n_in), labels (N,), order (N,) a permutation ->
    X (batch, n_in), labels (batch,) int32, Y (batch, n_out)."""
    X, picked_labels = gather_batch_ref(images, labels, order, cursor, batch)
    return X, picked_labels, layer_forward_ref(W, b, X, activate)


def gather_batch_ref(images: np.ndarray, labels: np.ndarray, order: np.ndarray, cursor: int, batch: int):
    """The next `batch` samples of the epoch: rows order[cursor : cursor + batch].

    images (N, n_features), labels (N,), order (N,) a permutation -> X (batch, n_features),
    labels (batch,) int32."""
    picked = np.asarray(order[cursor:cursor + batch])
    return images[picked].astype(F32), labels[picked].astype(np.int32)


def finish_step_ref(loss: np.ndarray, wrong: np.ndarray, loss_total: float, wrong_total: int, cursor: int):
    """Epoch bookkeeping after a step of B samples: loss (B,) float32, wrong (B,) int.

    Returns (loss_total + the B losses added one by one in double, wrong_total + sum(wrong),
    cursor + B)."""
    total = float(loss_total)
    for value in np.asarray(loss, dtype=F32):
        total += float(value)
    return total, int(wrong_total) + int(np.sum(wrong)), int(cursor) + len(loss)


def train_online_ref(params, velocities, images, labels, order, cursor: int, steps: int, lr, momentum=0.0):
    """`steps` online SGD steps (batch size 1) on images[order[cursor]], images[order[cursor + 1]],
    ..., in place: what one launch of the cooperative kernels train_online_persistent
    (mlp_persistent.cu) and train_online_spread (mlp_spread.cu) does, up to summation order (a
    composition of forward_all, softmax_xent_ref, backprop_delta_ref with the weights before the
    step, sgd_update_ref and finish_step_ref).

    params [(W (n_out, n_in), b (n_out,)) per layer] and velocities alike (used only with momentum),
    images (N, n_in), labels (N,), order (N,) a permutation -> (the steps' losses summed in double,
    their error count)."""
    loss_total, wrong_total = 0.0, 0
    for position in range(cursor, min(cursor + steps, len(order))):
        X, label = gather_batch_ref(images, labels, order, position, 1)
        activations = forward_all(params, X)
        soft = softmax_xent_ref(activations[-1], label)
        delta = soft["delta"]
        for layer in reversed(range(len(params))):
            W, b = params[layer]
            below = backprop_delta_ref(W, delta, activations[layer]) if layer else None
            sgd_update_ref(W, b, delta, activations[layer], lr, momentum, *velocities[layer])
            delta = below
        loss_total, wrong_total, _ = finish_step_ref(soft["loss"], soft["wrong"], loss_total, wrong_total, position)
    return loss_total, wrong_total
