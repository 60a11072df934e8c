"""Training on a device (`--device cuda` or `--device emulate`): everything resident on the device.

The dataset is uploaded once. Each epoch the deformation kernel makes every deformed image on the
device; then the per-sample launch sequence (gather+forward, forward, softmax+bookkeeping, backward+update) for
`graph_steps` consecutive steps is captured into a graph and replayed for every chunk of the
epoch. The kernels read the position in the epoch from a device counter that the softmax head of
a step advances, and the learning rate from device memory written before each epoch's replays, so
each distinct graph (the full chunk, the remainder, the tail batch) is captured once per run and
replayed in every epoch; only two numbers per epoch (the summed loss and error count) come back to
the host. On the emulator the same launches are recorded and replayed.
"""
from __future__ import annotations

import numpy as np

from gpumlp import nets, ops_deform, ops_mlp
from gpumlp.errors import UserError

GRAPH_STEPS_CUDA = 1000     # ~20k nodes for net 4 online: capture cost is amortised over the epoch
GRAPH_STEPS_EMULATED = 64   # smaller graphs keep emulated test runs quick
EVAL_BATCH_CUDA = 2000
EVAL_BATCH_EMULATED = 128


class DeviceMemoryError(UserError):
    """The run does not fit in the GPU's free memory."""


class DeviceTrainer:
    engine = "graph"

    def __init__(self, device, params, split, config, log=print):
        self.device = device
        self.config = config
        self.batch_size = config.batch_size
        self.deform_config = config.deform_config()
        self.seed = config.seed
        self.sizes = config.sizes
        self.device_name = "emulated GPU path (CPU emulator)" if device.is_emulated else device.name
        self.graph_steps = config.graph_steps or (GRAPH_STEPS_EMULATED if device.is_emulated else GRAPH_STEPS_CUDA)
        self.eval_batch = EVAL_BATCH_EMULATED if device.is_emulated else EVAL_BATCH_CUDA

        needed = self.memory_needed(len(split.train_labels), len(split.val_labels) if split.val_images is not split.train_images else 0,
                                    len(split.test_labels))
        self.check_memory(needed, log)

        d = device
        self.train_images_host = split.train_images
        self.train_images = d.asarray(split.train_images, np.float32)
        self.train_labels = d.asarray(split.train_labels, np.int32)
        self.n_train = len(split.train_labels)
        self.epoch_images = d.empty(self.train_images.shape) if self.deform_config else self.train_images
        self.deform_params = d.empty((self.n_train, 4)) if self.deform_config else None
        self.order = d.zeros(self.n_train, np.int32)
        self.cursor = d.zeros(1, np.int32)
        self.loss_total = d.zeros(1, np.float64)
        self.wrong_total = d.zeros(1, np.int32)
        self._eval_cache = {}
        self.eval_activations = [d.empty((self.eval_batch, n)) for n in self.sizes[1:]]

        self.hyper = ops_mlp.Hyperparameters(d, config.lr, config.momentum)
        self.graphs = {}   # (steps, B) -> Graph, captured at first use
        self.params = [(d.asarray(W), d.asarray(b)) for W, b in params]
        self.velocities = [(d.zeros(W.shape), d.zeros(b.shape)) for W, b in params] if config.momentum else None
        self.buffers = {B: self.step_buffers(B) for B in {self.batch_size, self.n_train % self.batch_size} if B}
        ops_mlp.preload(d)  # no module load may happen inside a stream capture

    # -- memory ----------------------------------------------------------------------------------
    def memory_needed(self, n_train, n_val_separate, n_test) -> int:
        """Bytes of device memory the run allocates (params, velocities, images, workspaces)."""
        sizes, B = self.sizes, self.batch_size
        params = 4 * nets.count_weights(sizes) * (2 if self.config.momentum else 1)
        images = 4 * sizes[0] * (n_train * (2 if self.deform_config else 1) + n_val_separate + n_test)
        per_sample = 4 * n_train * (1 + 1 + 4)  # labels, order, deformation parameters
        activations = 4 * B * sum(sizes) * 2 + 4 * ops_mlp.partial_rows(max(sizes[1:])) * max(sizes)
        evaluation = 4 * self.eval_batch * sum(sizes)
        return params + images + per_sample + activations + evaluation

    def check_memory(self, needed: int, log) -> None:
        if self.device.is_emulated:
            log(f"device memory needed: {needed / 2**20:,.0f} MiB (emulated in host memory)")
            return
        cupy = self.device.cupy
        free, total = cupy.cuda.runtime.memGetInfo()
        # Blocks CuPy's pool keeps from earlier runs in this process count as free: the pool hands
        # them back to the driver when an allocation would otherwise fail.
        free += cupy.get_default_memory_pool().free_bytes()
        log(f"device memory needed: {needed / 2**20:,.0f} MiB of {free / 2**20:,.0f} MiB free "
            f"({total / 2**20:,.0f} MiB total)")
        if needed > 0.95 * free:
            raise DeviceMemoryError(
                f"the run needs {needed / 2**20:,.0f} MiB of device memory but only {free / 2**20:,.0f} MiB "
                f"is free: use a smaller net, fewer --train-images, or a larger GPU")

    def step_buffers(self, B: int) -> dict:
        d, sizes = self.device, self.sizes
        return {
            "x": d.empty((B, sizes[0])),
            "labels": d.empty(B, np.int32),
            "activations": [d.empty((B, n)) for n in sizes[1:]],
            "deltas": [d.empty((B, n)) for n in sizes[1:]],
            "partial": d.empty((ops_mlp.partial_rows(max(sizes[1:])), max(sizes))),
            "loss": d.empty(B),
            "wrong": d.empty(B, np.int32),
            "prediction": d.empty(B, np.int32),
        }

    # -- training --------------------------------------------------------------------------------
    def launch_step(self, B: int) -> None:
        """The launch sequence of one training step on the next B samples of the epoch: the first
        forward kernel gathers its samples itself; softmax_xent adds up the step's loss and errors
        and advances the cursor (nothing after it reads the cursor)."""
        d, buf = self.device, self.buffers[B]
        inputs = [buf["x"], *buf["activations"][:-1]]
        last = len(self.params) - 1
        for layer, (W, b) in enumerate(self.params):
            if layer:
                ops_mlp.layer_forward(d, W, b, inputs[layer], buf["activations"][layer], activate=layer < last)
            else:
                gather_forward = ops_mlp.layer_forward_mv_gather if B == 1 else ops_mlp.layer_forward_gemm_gather
                gather_forward(d, W, b, self.epoch_images, self.train_labels, self.order, self.cursor, buf["x"],
                               buf["labels"], buf["activations"][0], activate=layer < last)
        ops_mlp.softmax_xent(d, buf["activations"][-1], buf["labels"], buf["deltas"][-1],
                             buf["loss"], buf["wrong"], buf["prediction"], self.loss_total, self.wrong_total,
                             self.cursor)
        for layer in reversed(range(len(self.params))):
            W, b = self.params[layer]
            vW, vb = self.velocities[layer] if self.velocities else (None, None)
            delta_below = buf["deltas"][layer - 1] if layer else None
            ops_mlp.backward_update(d, W, b, buf["deltas"][layer], inputs[layer], delta_below,
                                    buf["partial"], self.hyper, vW, vb)

    def capture_steps(self, steps: int, B: int):
        with self.device.capture() as graph:
            for _ in range(steps):
                self.launch_step(B)
        return graph

    def graph(self, steps: int, B: int):
        """The graph of `steps` steps of batch size B, captured the first time it is asked for."""
        if (steps, B) not in self.graphs:
            self.graphs[steps, B] = self.capture_steps(steps, B)
        return self.graphs[steps, B]

    def epoch_plan(self, n_samples: int) -> list[tuple[int, int, int]]:
        """(steps, B, replays) of the graphs that train an epoch of n_samples: full chunks of
        graph_steps steps, the remaining full steps, and a tail step of the last n_samples mod B."""
        B = self.batch_size
        full_steps, tail = divmod(n_samples, B)
        chunk = min(self.graph_steps, full_steps)
        plan = [(chunk, B, full_steps // chunk)] if chunk else []
        if chunk and full_steps % chunk:
            plan.append((full_steps % chunk, B, 1))
        if tail:
            plan.append((1, tail, 1))
        return plan

    def capture_graphs(self, n_samples: int) -> None:
        """Capture now every graph an epoch of n_samples replays (train_epoch would at first use),
        e.g. to keep the capture out of a timed region."""
        for steps, B, _ in self.epoch_plan(n_samples):
            self.graph(steps, B)

    def begin_epoch(self, epoch: int, lr: float, order: np.ndarray) -> None:
        """The epoch's deformed images, its order, the cursor and totals set to zero and its
        learning rate, all queued before the epoch's training launches."""
        d = self.device
        if self.deform_config is not None:
            ops_deform.deform_images(d, self.train_images, self.train_labels, None, self.epoch_images,
                                     self.deform_params, self.seed, epoch, self.deform_config)
        with d.on_stream():  # on a GPU: queued on the stream the graphs replay on, before them
            self.order[...] = d.asarray(order, np.int32)
            self.cursor.fill(0)
            self.loss_total.fill(0)
            self.wrong_total.fill(0)
        self.hyper.set_lr(lr)

    def epoch_totals(self, n_images: int) -> tuple[float, float]:
        """(mean loss, error rate) of the epoch just trained, from the device totals."""
        d = self.device
        d.synchronize()
        loss = float(d.to_host(self.loss_total)[0]) / n_images
        wrong = int(d.to_host(self.wrong_total)[0])
        return loss, wrong / n_images

    def train_epoch(self, epoch: int, lr: float, order: np.ndarray, progress=None):
        self.begin_epoch(epoch, lr, order)
        done = 0
        for steps, B, replays in self.epoch_plan(len(order)):
            graph = self.graph(steps, B)
            for _ in range(replays):
                graph.replay()
                done += steps * B
                if progress is not None:
                    progress(done)
        return self.epoch_totals(len(order))

    # -- evaluation ------------------------------------------------------------------------------
    def device_images(self, images: np.ndarray):
        """The device copy of an evaluation set, uploaded once (the training set is reused)."""
        key = id(images)
        if key not in self._eval_cache:
            self._eval_cache[key] = (images, self.device.asarray(images, np.float32))
        return self._eval_cache[key][1]

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        """Softmax outputs (N, 10): the forward kernels run on the device over batches; the logits
        (10 numbers an image) come back and are normalised on the host."""
        d = self.device
        if len(images) == 0:
            return np.zeros((0, self.sizes[-1]), np.float32)
        source = self.train_images if images is self.train_images_host else self.device_images(images)
        E = self.eval_batch
        logits = []
        last = len(self.params) - 1
        for start in range(0, len(images), E):
            x = source[start:start + E]
            n = len(x)
            outs = [a[:n] for a in self.eval_activations]
            inputs = [x, *outs[:-1]]
            for layer, (W, b) in enumerate(self.params):
                ops_mlp.layer_forward(d, W, b, inputs[layer], outs[layer], activate=layer < last)
            logits.append(d.to_host(outs[-1]))
        logits = np.concatenate(logits).astype(np.float64)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)

    # -- state -----------------------------------------------------------------------------------
    def get_state(self) -> dict:
        d = self.device
        host = lambda pairs: [(d.to_host(W), d.to_host(b)) for W, b in pairs]  # noqa: E731
        velocities = host(self.velocities) if self.velocities else [(np.zeros(W.shape, np.float32), np.zeros(b.shape, np.float32)) for W, b in self.params]
        return {"params": host(self.params), "velocities": velocities}

    def set_state(self, state: dict) -> None:
        d = self.device
        with d.on_stream():
            for (W, b), (W_host, b_host) in zip(self.params, state["params"]):
                W[...] = d.asarray(W_host)
                b[...] = d.asarray(b_host)
            if self.velocities:
                for (vW, vb), (vW_host, vb_host) in zip(self.velocities, state["velocities"]):
                    vW[...] = d.asarray(vW_host)
                    vb[...] = d.asarray(vb_host)
