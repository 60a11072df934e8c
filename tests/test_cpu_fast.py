"""The CPU trainer's fast path (gpumlp/cpu_fast.py, gpumlp/train_cpu.py) against the readable
reference (gpumlp/reference.py): equal bit for bit, on every layer shape of the paper's nets and the
quick recipe, online and minibatch, with and without momentum; and the trainer's deformation
worker gives exactly deform_images_ref's digits."""
import numpy as np
import pytest

from gpumlp import cpu_fast, nets, reference, train_cpu
from gpumlp.deform import DeformConfig, deform_images_ref
from gpumlp.train_cpu import CpuTrainer, available_cores, choose_blas_threads
from helpers import assert_bitwise_equal, synthetic_digits


def layer_shapes():
    """(n_out, n_in) of every layer of the five paper nets, the quick recipe and the bench's net."""
    nets_hidden = [*nets.PAPER_NETS.values(), (800,), (300, 100)]
    shapes = set()
    for hidden in nets_hidden:
        sizes = nets.layer_sizes(hidden)
        shapes.update(zip(sizes[1:], sizes[:-1]))
    return sorted(shapes)


def random_layer(shape, batch, seed):
    """Weights, velocities, deltas and inputs of realistic sizes with many exponents, so that every
    rounding step matters."""
    n_out, n_in = shape
    rng = np.random.default_rng([seed, n_out, n_in, batch])
    W = rng.uniform(-0.05, 0.05, size=shape).astype(np.float32)
    b = rng.uniform(-0.05, 0.05, size=n_out).astype(np.float32)
    vW = (rng.standard_normal(shape) * 1e-3).astype(np.float32)
    vb = (rng.standard_normal(n_out) * 1e-3).astype(np.float32)
    delta = (rng.standard_normal((batch, n_out)) * np.exp(rng.uniform(-6, 0, (batch, n_out)))).astype(np.float32)
    x = rng.uniform(-1.7, 1.7, size=(batch, n_in)).astype(np.float32)
    return W, b, vW, vb, delta, x


@pytest.mark.parametrize("shape", layer_shapes(), ids=lambda s: f"{s[0]}x{s[1]}")
def test_sgd_update_is_bitwise_the_reference(shape):
    buffers = cpu_fast.Buffers()
    for batch, momentum, lr in ((1, 0.0, 1e-3), (1, 0.9, 0.02), (32, 0.0, 1e-3), (32, 0.9, 0.02), (7, 0.5, 0.1)):
        W, b, vW, vb, delta, x = random_layer(shape, batch, seed=1)
        ref = [a.copy() for a in (W, b, vW, vb)]
        reference.sgd_update_ref(*ref[:2], delta, x, lr, momentum, *ref[2:])
        cpu_fast.sgd_update(W, b, delta, x, lr, momentum, vW, vb, buffers)
        what = f"{shape}, batch {batch}, momentum {momentum}"
        assert not np.array_equal(W, random_layer(shape, batch, seed=1)[0]), "the step must move W"
        for name, fast, slow in zip(("W", "b", "vW", "vb"), (W, b, vW, vb), ref):
            assert_bitwise_equal(fast, slow, f"{name}: {what}")


def test_update_blocks_cover_every_row(monkeypatch):
    """A block size that divides nothing evenly: the last partial block is updated too."""
    monkeypatch.setattr(cpu_fast, "BLOCK_FLOATS", 3 * 841 + 5)
    W, b, vW, vb, delta, x = random_layer((10, 841), 1, seed=2)
    ref = [a.copy() for a in (W, b, vW, vb)]
    reference.sgd_update_ref(*ref[:2], delta, x, 0.01, 0.9, *ref[2:])
    cpu_fast.sgd_update(W, b, delta, x, 0.01, 0.9, vW, vb, cpu_fast.Buffers())
    assert_bitwise_equal(W, ref[0], "W with blocks of 3 rows")
    assert_bitwise_equal(vW, ref[2], "vW with blocks of 3 rows")


@pytest.mark.parametrize("shape", [(2500, 841), (1000, 1500), (10, 500)], ids=str)
@pytest.mark.parametrize("batch", [1, 32])
def test_forward_and_backprop_are_bitwise_the_reference(shape, batch):
    W, b, _, _, delta, x = random_layer(shape, batch, seed=3)
    buffers = cpu_fast.Buffers()
    for activate in (True, False):
        out = cpu_fast.layer_forward(W, b, x, activate, buffers.get("y", (batch, shape[0])))
        assert_bitwise_equal(out, reference.layer_forward_ref(W, b, x, activate), f"forward {activate}")
    y_in = np.tanh(x).astype(np.float32) * np.float32(1.7159)
    fast = cpu_fast.backprop_delta(W, delta, y_in, buffers.get("d", x.shape), buffers.get("f", x.shape))
    assert_bitwise_equal(fast, reference.backprop_delta_ref(W, delta, y_in), "backprop_delta")


def reference_step(params, velocities, x, labels, lr, momentum):
    """The trainer's step composed from the reference functions alone (the specification)."""
    activations = reference.forward_all(params, x)
    out = reference.softmax_xent_ref(activations[-1], labels)
    delta = out["delta"]
    for layer in reversed(range(len(params))):
        W, b = params[layer]
        below = reference.backprop_delta_ref(W, delta, activations[layer]) if layer else None
        reference.sgd_update_ref(W, b, delta, activations[layer], lr, momentum, *velocities[layer])
        delta = below
    return out["loss"]


@pytest.mark.parametrize("batch, momentum", [(1, 0.0), (1, 0.9), (4, 0.9)])
def test_trainer_epoch_is_bitwise_the_reference_steps(batch, momentum):
    sizes = nets.layer_sizes([24, 16])
    params = nets.init_params(sizes, seed=5)
    images = synthetic_digits(14, seed=5)
    labels = (np.arange(14) % 10).astype(np.int32)
    trainer = CpuTrainer(params, images, labels, batch, momentum, None, seed=0)
    order = np.random.default_rng(0).permutation(14).astype(np.int32)
    loss, _ = trainer.train_epoch(1, 0.05, order)

    ref_params = [(W.copy(), b.copy()) for W, b in params]
    ref_velocities = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    losses = [reference_step(ref_params, ref_velocities, images[order[s:s + batch]],
                             labels[order[s:s + batch]], 0.05, momentum) for s in range(0, 14, batch)]
    assert loss == float(np.concatenate(losses).astype(np.float64).sum()) / 14
    for (W, b), (rW, rb) in zip(trainer.params, ref_params):
        assert_bitwise_equal(W, rW, "W after an epoch")
        assert_bitwise_equal(b, rb, "b after an epoch")
    probs = trainer.predict_probs(images)
    logits = reference.forward_all(ref_params, images)[-1]
    assert_bitwise_equal(probs, reference.softmax_xent_ref(logits, labels)["probs"], "predict_probs")


def test_deformation_worker_gives_the_reference_digits(monkeypatch):
    monkeypatch.setattr(train_cpu, "available_cores", lambda: 2)   # one BLAS thread, one spare core
    images = synthetic_digits(30, seed=6)
    labels = (np.arange(30) % 10).astype(np.int32)
    cfg = DeformConfig()
    trainer = CpuTrainer(nets.init_params(nets.layer_sizes([8]), 0), images, labels, 1, 0.0, cfg,
                         seed=3, last_epoch=2)
    first = trainer.deformed_training_set(1)          # computed here; epoch 2 starts on the worker
    assert trainer._next_deformed[0] == 2
    second = trainer.deformed_training_set(2)         # the worker's, and nothing beyond last_epoch
    assert trainer._next_deformed is None
    for epoch, got in ((1, first), (2, second)):
        assert_bitwise_equal(got, deform_images_ref(images, labels, None, 3, epoch, cfg)[0], f"epoch {epoch}")
    assert not np.array_equal(first, second)


def test_blas_threads_follow_batch_size_and_cores():
    assert choose_blas_threads(1, 2)[0] == 1
    assert choose_blas_threads(64, 2)[0] == 2
    assert choose_blas_threads(64, 1)[0] == 1
    trainer = CpuTrainer(nets.init_params(nets.layer_sizes([8]), 0), synthetic_digits(2), np.zeros(2, np.int32),
                         64, 0.0, None, seed=0, threads=3)
    assert trainer.blas_threads == 3 and "3 BLAS threads (--threads)" == trainer.threads_note


def test_threads_flag_is_in_the_header_and_config(synthetic_mnist, tmp_path, capsys):
    import json

    from gpumlp import cli
    out = tmp_path / "run"
    args = ["--device", "cpu", "--hidden", "12", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    assert cli.main([*args, "--threads", "2"]) == 0
    assert "BLAS threads: 2 BLAS threads (--threads)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["blas_threads"] == 2 and config["settings"]["threads"] == 2
    assert cli.main([*args, "--out", str(tmp_path / "auto")]) == 0
    threads, why = choose_blas_threads(4, available_cores())
    assert f"{threads} BLAS thread{'s' * (threads > 1)} ({why})" in capsys.readouterr().out
    assert cli.main([*args, "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --threads must be at least 1"


def test_no_deformation_worker_without_a_spare_core(monkeypatch):
    """With as many BLAS threads as cores the next epoch is deformed in the critical path (on 2
    cores the worker slowed the quick recipe by 10%), still to the reference's bits."""
    monkeypatch.setattr(train_cpu, "available_cores", lambda: 2)
    images = synthetic_digits(30, seed=6)
    labels = (np.arange(30) % 10).astype(np.int32)
    trainer = CpuTrainer(nets.init_params(nets.layer_sizes([8]), 0), images, labels, 16, 0.0,
                         DeformConfig(), seed=3, last_epoch=2)
    assert trainer.blas_threads == 2 and not trainer.prefetch
    got = trainer.deformed_training_set(1)
    assert trainer._next_deformed is None
    assert_bitwise_equal(got, deform_images_ref(images, labels, None, 3, 1, DeformConfig())[0], "epoch 1")
