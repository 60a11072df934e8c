"""Training on the CPU (`--device cpu`): the same algorithm as the GPU path, vectorised over a
minibatch, with the float32 operations of the numpy reference (gpumlp/reference.py) done without
temporaries by gpumlp/cpu_fast.py (bit for bit the same results), the BLAS threads chosen on
purpose, and the next epoch's deformation computed on a worker thread while this one trains."""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from gpumlp import cpu_fast, reference, stop_signals

EVAL_BATCH = 1000
# From this batch size on, a layer's matrix products are big enough that a second BLAS thread
# pays for waking it (measured with python -m gpumlp.bench: README, Benchmarks).
MULTITHREAD_BATCH = 16


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose_blas_threads(batch_size: int, cores: int) -> tuple[int, str]:
    """BLAS threads for a batch size on `cores` cores, and why (for the run's header line).

    Online (small batches): one. The step is matrix-vector products plus the elementwise update,
    which numpy runs on one core anyway; a second BLAS thread costs a wake-up per product for a few
    microseconds of work, and the other core is better spent on the next epoch's deformation.
    Larger batches: every core, for the matrix-matrix products."""
    if batch_size < MULTITHREAD_BATCH or cores == 1:
        return 1, f"batch size {batch_size} < {MULTITHREAD_BATCH}" if cores > 1 else "1 core"
    return cores, f"batch size {batch_size} >= {MULTITHREAD_BATCH}, {cores} cores"


def forward_all(params, x: np.ndarray, buffers: cpu_fast.Buffers) -> list[np.ndarray]:
    """reference.forward_all into reused buffers: [x, y1, ..., logits] for x (B, 841)."""
    activations = [x]
    last = len(params) - 1
    for layer, (W, b) in enumerate(params):
        out = buffers.get(f"y{layer}", (len(x), W.shape[0]))
        activations.append(cpu_fast.layer_forward(W, b, activations[-1], layer < last, out))
    return activations


def predict_probs(params, images: np.ndarray, buffers: cpu_fast.Buffers | None = None) -> np.ndarray:
    """Softmax outputs (N, 10) for images (N, 841), in batches to bound memory."""
    buffers = buffers or cpu_fast.Buffers()
    chunks = []
    for start in range(0, len(images), EVAL_BATCH):
        logits = forward_all(params, images[start:start + EVAL_BATCH], buffers)[-1]
        chunks.append(reference.softmax_xent_ref(logits, np.zeros(len(logits), np.int32))["probs"])
    return np.concatenate(chunks) if chunks else np.zeros((0, params[-1][0].shape[0]), np.float32)


class CpuTrainer:
    """Holds the parameters (and momentum velocities) on the host and trains with the reference's
    arithmetic. `threads`: BLAS threads (None: choose_blas_threads). `last_epoch`: no deformation is
    prepared beyond it."""

    device_name = "cpu (numpy reference)"

    def __init__(self, params, train_images, train_labels, batch_size, momentum, deform_config, seed,
                 threads: int | None = None, last_epoch: int | None = None):
        self.params = [(W.copy(), b.copy()) for W, b in params]
        self.velocities = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
        self.train_images = train_images
        self.train_labels = train_labels
        self.batch_size = batch_size
        self.momentum = momentum
        self.deform_config = deform_config
        self.seed = seed
        self.last_epoch = last_epoch
        if threads is None:
            self.blas_threads, why = choose_blas_threads(batch_size, available_cores())
        else:
            self.blas_threads, why = threads, "--threads"
        self.threads_note = f"{self.blas_threads} BLAS thread{'s' * (self.blas_threads > 1)} ({why})"
        # The next epoch is deformed on a worker thread only where a core is left beside the BLAS
        # threads: on 2 cores with 2 BLAS threads, measured, the worker slowed the quick recipe's
        # epochs by 10% against deforming in the critical path on every core.
        self.prefetch = self.blas_threads < available_cores()
        self.buffers = cpu_fast.Buffers()
        self._deformer = ThreadPoolExecutor(1, thread_name_prefix="deform")
        self._next_deformed: tuple[int, Future] | None = None

    def _deform(self, epoch: int, threads: int | None = None, progress=None) -> np.ndarray:
        """Every training image deformed for this epoch, in pieces so `progress` can report (an
        image's deformation depends on its index alone, so the pieces equal one call)."""
        from gpumlp.deform import CHUNK, THREADS, deform_images_ref
        n = len(self.train_images)
        indices = np.arange(n, dtype=np.int32)
        deformed = np.empty_like(self.train_images)
        piece = CHUNK * THREADS
        for start in range(0, n, piece):
            sl = slice(start, start + piece)
            deformed[sl] = deform_images_ref(self.train_images[sl], self.train_labels[sl], indices[sl],
                                             self.seed, epoch, self.deform_config, threads=threads)[0]
            if progress is not None:
                progress(min(start + piece, n), stage="deforming")
        return deformed

    def deformed_training_set(self, epoch: int, progress=None) -> np.ndarray:
        """This epoch's deformed digits (prepared during the last epoch where it ran here), and the
        next epoch's started on the worker thread where a core is spare (self.prefetch)."""
        if self.deform_config is None:
            return self.train_images
        if self._next_deformed is not None and self._next_deformed[0] == epoch:
            images = self._next_deformed[1].result()
        else:
            images = self._deform(epoch, progress=progress)   # nothing else runs: every core
        self._next_deformed = None
        if self.prefetch and (self.last_epoch is None or epoch < self.last_epoch):
            # one thread: the worker runs beside the training, which keeps the other core(s)
            self._next_deformed = (epoch + 1, self._deformer.submit(self._deform, epoch + 1, 1))
        return images

    resumes_mid_epoch = True

    def train_epoch(self, epoch: int, lr: float, order: np.ndarray, progress=None, cursor=None, after_step=None):
        """One pass over the training set in `order`; returns (mean loss, error rate) measured on
        the deformed samples before each update.

        `cursor` (training.EpochCursor): where the epoch starts (a resumed one, mid-way) and, after
        each step, how far it got; a step and its cursor update are one unit (stop signals wait for
        its end), so the parameters always match the cursor. `after_step(cursor)` follows each step."""
        from gpumlp.training import EpochCursor
        cursor = cursor or EpochCursor(epoch)
        images = self.deformed_training_set(epoch, progress)   # a function of (seed, epoch): also on resume
        with threadpool_limits(self.blas_threads, user_api="blas"):
            for start in range(cursor.images, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                x = np.take(images, batch, axis=0, out=self.buffers.get("x", (len(batch), images.shape[1])))
                with stop_signals.held():
                    loss, wrong = self.step(x, self.train_labels[batch], lr)
                    cursor.advance(len(batch), float(loss.astype(np.float64).sum()), int(wrong.sum()))
                if progress is not None:
                    progress(cursor.images)
                if after_step is not None:
                    after_step(cursor)
        return cursor.loss_total / len(order), cursor.wrong_total / len(order)

    def step(self, x, labels, lr):
        """One SGD step on the batch x (B, 841): reference.forward_all, softmax_xent_ref,
        backprop_delta_ref and sgd_update_ref, layer by layer from the top, bit for bit."""
        buffers = self.buffers
        activations = forward_all(self.params, x, buffers)
        out = reference.softmax_xent_ref(activations[-1], labels)
        delta = out["delta"]
        for layer in reversed(range(len(self.params))):
            W, b = self.params[layer]
            delta_below = None
            if layer:
                shape = activations[layer].shape
                # one buffer per layer, so delta_below never overwrites delta
                delta_below = cpu_fast.backprop_delta(W, delta, activations[layer],
                                                      buffers.get(f"delta{layer}", shape),
                                                      buffers.get("derivative", shape))
            vW, vb = self.velocities[layer]
            cpu_fast.sgd_update(W, b, delta, activations[layer], lr, self.momentum, vW, vb, buffers)
            delta = delta_below
        return out["loss"], out["wrong"]

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        with threadpool_limits(self.blas_threads, user_api="blas"):
            return predict_probs(self.params, images, self.buffers)

    def get_state(self) -> dict:
        return {"params": [(W.copy(), b.copy()) for W, b in self.params],
                "velocities": [(vW.copy(), vb.copy()) for vW, vb in self.velocities]}

    def set_state(self, state: dict) -> None:
        self.params = [(W.copy(), b.copy()) for W, b in state["params"]]
        self.velocities = [(vW.copy(), vb.copy()) for vW, vb in state["velocities"]]
