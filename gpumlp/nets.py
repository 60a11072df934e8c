"""The paper's five networks, layer sizes and weight initialisation."""
from __future__ import annotations

import math

import numpy as np

N_INPUTS = 29 * 29  # the paper pads MNIST's 28x28 digits to 29x29
N_CLASSES = 10

# Hidden layers of the five nets of the paper's Table 1.
PAPER_NETS = {
    1: (1000, 500),
    2: (1500, 1000, 500),
    3: (2000, 1500, 1000, 500),
    4: (2500, 2000, 1500, 1000, 500),
    5: (1000,) * 9,
}
# Table 1: (test error at best validation %, best test error %, training hours on a GTX 280).
PAPER_RESULTS = {1: (0.49, 0.44, 23.4), 2: (0.46, 0.40, 44.2), 3: (0.41, 0.39, 66.7),
                 4: (0.35, 0.32, 114.5), 5: (0.44, 0.43, 107.7)}

INIT_RANGE = 0.05
INIT_CHUNK = 1 << 22  # numbers drawn per call: bounds the float64 temporary to 32 MB


def layer_sizes(hidden) -> list[int]:
    """[841, *hidden, 10]."""
    return [N_INPUTS, *[int(h) for h in hidden], N_CLASSES]


def count_weights(sizes) -> int:
    """Weights and biases together, as the paper counts them (12.11M for net 4)."""
    return sum(n_out * n_in + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def describe(sizes) -> str:
    return "-".join(str(s) for s in sizes)


def init_params(sizes, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weights and biases uniform in [-0.05, 0.05], drawn on the host so every device starts from
    the same numbers. Returns [(W (n_out, n_in), b (n_out,)), ...] in float32."""
    rng = np.random.default_rng([seed, 0x1417])
    return [(uniform_float32(rng, (n_out, n_in)), uniform_float32(rng, (n_out,)))
            for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def uniform_float32(rng: np.random.Generator, shape) -> np.ndarray:
    """rng.uniform(-INIT_RANGE, INIT_RANGE, size=shape).astype(np.float32), drawn INIT_CHUNK
    numbers at a time: the same values (the generator's stream does not depend on how the draws
    are split) without a float64 copy of the whole matrix."""
    out = np.empty(math.prod(shape), np.float32)
    for start in range(0, out.size, INIT_CHUNK):
        stop = min(start + INIT_CHUNK, out.size)
        out[start:stop] = rng.uniform(-INIT_RANGE, INIT_RANGE, size=stop - start)
    return out.reshape(shape)
