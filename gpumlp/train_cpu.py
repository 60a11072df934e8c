"""Training through the numpy reference (`--device cpu`): the same algorithm as the GPU path,
vectorised over a minibatch so it is practical on a CPU."""
from __future__ import annotations

import numpy as np

from gpumlp import reference

EVAL_BATCH = 1000


def predict_probs(params, images: np.ndarray) -> np.ndarray:
    """Softmax outputs (N, 10) for images (N, 841), in batches to bound memory."""
    chunks = []
    for start in range(0, len(images), EVAL_BATCH):
        logits = reference.forward_all(params, images[start:start + EVAL_BATCH])[-1]
        chunks.append(reference.softmax_xent_ref(logits, np.zeros(len(logits), np.int32))["probs"])
    return np.concatenate(chunks) if chunks else np.zeros((0, params[-1][0].shape[0]), np.float32)


class CpuTrainer:
    """Holds the parameters (and momentum velocities) on the host and trains with the reference."""

    device_name = "cpu (numpy reference)"

    def __init__(self, params, train_images, train_labels, batch_size, momentum, deform_config, seed):
        self.params = [(W.copy(), b.copy()) for W, b in params]
        self.velocities = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
        self.train_images = train_images
        self.train_labels = train_labels
        self.batch_size = batch_size
        self.momentum = momentum
        self.deform_config = deform_config
        self.seed = seed

    def deformed_training_set(self, epoch: int, progress=None) -> np.ndarray:
        """Every training image deformed for this epoch, in pieces so `progress` can report (an
        image's deformation depends on its index alone, so the pieces equal one call)."""
        if self.deform_config is None:
            return self.train_images
        from gpumlp.deform import CHUNK, THREADS, deform_images_ref
        n = len(self.train_images)
        indices = np.arange(n, dtype=np.int32)
        deformed = np.empty_like(self.train_images)
        piece = CHUNK * THREADS
        for start in range(0, n, piece):
            sl = slice(start, start + piece)
            deformed[sl] = deform_images_ref(self.train_images[sl], self.train_labels[sl], indices[sl],
                                             self.seed, epoch, self.deform_config)[0]
            if progress is not None:
                progress(min(start + piece, n), stage="deforming")
        return deformed

    def train_epoch(self, epoch: int, lr: float, order: np.ndarray, progress=None):
        """One pass over the training set in `order`; returns (mean loss, error rate) measured on
        the deformed samples before each update."""
        images = self.deformed_training_set(epoch, progress)
        loss_total, wrong_total = 0.0, 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            loss, wrong = self.step(images[batch], self.train_labels[batch], lr)
            loss_total += float(loss.astype(np.float64).sum())
            wrong_total += int(wrong.sum())
            if progress is not None:
                progress(start + len(batch))
        return loss_total / len(order), wrong_total / len(order)

    def step(self, x, labels, lr):
        activations = reference.forward_all(self.params, x)
        out = reference.softmax_xent_ref(activations[-1], labels)
        delta = out["delta"]
        for layer in reversed(range(len(self.params))):
            W, b = self.params[layer]
            delta_below = reference.backprop_delta_ref(W, delta, activations[layer]) if layer else None
            vW, vb = self.velocities[layer]
            reference.sgd_update_ref(W, b, delta, activations[layer], lr, self.momentum, vW, vb)
            delta = delta_below
        return out["loss"], out["wrong"]

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        return predict_probs(self.params, images)

    def get_state(self) -> dict:
        return {"params": [(W.copy(), b.copy()) for W, b in self.params],
                "velocities": [(vW.copy(), vb.copy()) for vW, vb in self.velocities]}

    def set_state(self, state: dict) -> None:
        self.params = [(W.copy(), b.copy()) for W, b in state["params"]]
        self.velocities = [(vW.copy(), vb.copy()) for vW, vb in state["velocities"]]
