from pathlib import Path

import numpy as np
import pytest

from gpumlp.data import SHARED_MNIST_DIR, load_mnist


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST from ../shared/mnist, verified; skipped where that folder is absent (a fresh
    clone). A folder that is there but broken fails, as that is a fault to see."""
    if not SHARED_MNIST_DIR.is_dir():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST_DIR}")
    return load_mnist(SHARED_MNIST_DIR, download=False)


def make_synthetic_mnist(n_train=120, n_test=60, seed=0):
    """A small learnable stand-in for MNIST: each class is a fixed random 29x29 pattern plus noise,
    in [-1, 1], shaped like gpumlp.data.MNIST. For tests of mechanics, not of accuracy."""
    from gpumlp.data import MNIST
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(-1, 1, size=(10, 841)).astype(np.float32)

    def draw(n):
        labels = (np.arange(n) % 10).astype(np.int32)
        rng.shuffle(labels)
        noise = rng.normal(scale=0.6, size=(n, 841)).astype(np.float32)
        return np.clip(prototypes[labels] + noise, -1, 1).astype(np.float32), labels

    train_images, train_labels = draw(n_train)
    test_images, test_labels = draw(n_test)
    return MNIST(train_images=train_images, train_labels=train_labels, test_images=test_images,
                 test_labels=test_labels, source=Path("synthetic"))


@pytest.fixture
def synthetic_mnist(monkeypatch):
    """Makes `load_mnist` (and so the command) return a small synthetic set."""
    data = make_synthetic_mnist()
    monkeypatch.setattr("gpumlp.data.load_mnist", lambda *args, **kwargs: data)
    return data


@pytest.fixture
def data100(monkeypatch):
    """100 training and 40 test images of the synthetic set (seed 7), which `load_mnist` returns."""
    data = make_synthetic_mnist(n_train=100, n_test=40, seed=7)
    monkeypatch.setattr("gpumlp.data.load_mnist", lambda *args, **kwargs: data)
    return data


def pytest_collection_modifyitems(items):
    """A test that asks for real digits is an `mnist` test, marked or not (so `-m "not mnist"` works)."""
    for item in items:
        if "mnist" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mnist)
