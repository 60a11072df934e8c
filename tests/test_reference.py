"""The numpy reference against finite differences: if back-propagation is right, the analytic
gradient of the mean loss equals its numerical derivative for every layer."""
import numpy as np
import pytest

from gpumlp import nets, reference

SIZES = [13, 9, 7, 5, 4]  # three hidden layers, so every kind of layer is covered


def mean_loss(params, x, labels):
    logits = reference.forward_all(params, x)[-1].astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


def analytic_gradients(params, x, labels):
    """Gradients of the mean loss, by the reference's back-propagation."""
    activations = reference.forward_all(params, x)
    delta = reference.softmax_xent_ref(activations[-1], labels)["delta"]
    grads = [None] * len(params)
    for layer in reversed(range(len(params))):
        W, _ = params[layer]
        grads[layer] = (delta.T @ activations[layer] / len(x), delta.mean(axis=0))
        if layer:
            delta = reference.backprop_delta_ref(W, delta, activations[layer])
    return grads


@pytest.mark.parametrize("batch", [1, 5])
def test_every_layer_gradient_matches_finite_differences(batch):
    rng = np.random.default_rng(1)
    params = [(W * 8, b * 8) for W, b in nets.init_params(SIZES, seed=3)]  # larger weights: non-trivial gradients
    x = rng.uniform(-1, 1, size=(batch, SIZES[0])).astype(np.float32)
    labels = rng.integers(0, SIZES[-1], size=batch).astype(np.int32)
    grads = analytic_gradients(params, x, labels)
    eps = 1e-2
    # Central differences in float64 around float32 weights: truncation error ~eps^2 * f''' plus
    # float32 rounding of the forward pass (~1e-7 / eps); 2e-4 + 2% covers both with margin.
    for layer, (W, b) in enumerate(params):
        for array, grad in ((W, grads[layer][0]), (b, grads[layer][1])):
            flat = array.reshape(-1)
            for index in rng.choice(flat.size, size=min(12, flat.size), replace=False):
                saved = flat[index]
                flat[index] = saved + eps
                plus = mean_loss(params, x, labels)
                flat[index] = saved - eps
                minus = mean_loss(params, x, labels)
                flat[index] = saved
                numeric = (plus - minus) / (2 * eps)
                analytic = grad.reshape(-1)[index]
                assert abs(analytic - numeric) <= 2e-4 + 0.02 * abs(numeric), \
                    f"layer {layer} {'W' if array is W else 'b'}[{index}]: analytic {analytic} vs numeric {numeric}"


def test_scaled_tanh_derivative_matches_finite_differences():
    a = np.linspace(-4, 4, 101).astype(np.float64)
    numeric = (1.7159 * np.tanh(0.6666 * (a + 1e-5)) - 1.7159 * np.tanh(0.6666 * (a - 1e-5))) / 2e-5
    analytic = reference.scaled_tanh_derivative_from_output(reference.scaled_tanh(a.astype(np.float32)))
    np.testing.assert_allclose(analytic, numeric, atol=1e-5)


def test_softmax_xent_loss_and_delta():
    logits = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, -1.0]], np.float32)
    labels = np.array([2, 1], np.int32)
    out = reference.softmax_xent_ref(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["loss"], -np.log(p[[0, 1], labels]), rtol=1e-6)
    np.testing.assert_allclose(out["delta"], p - np.eye(3)[labels], atol=1e-7)
    assert out["prediction"].tolist() == [2, 0]  # first maximum on a tie
    assert out["wrong"].tolist() == [0, 1]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_update_steps_along_the_mean_gradient(momentum):
    rng = np.random.default_rng(2)
    W = rng.normal(size=(4, 6)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    delta = rng.normal(size=(3, 4)).astype(np.float32)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    vW = rng.normal(size=W.shape).astype(np.float32) if momentum else np.zeros_like(W)
    vb = rng.normal(size=b.shape).astype(np.float32) if momentum else np.zeros_like(b)
    expected_vW = momentum * vW - 0.1 * delta.T @ x / 3
    expected_vb = momentum * vb - 0.1 * delta.mean(axis=0)
    W0, b0 = W.copy(), b.copy()
    reference.sgd_update_ref(W, b, delta, x, 0.1, momentum, vW, vb)
    np.testing.assert_allclose(W - W0, expected_vW, atol=1e-6)
    np.testing.assert_allclose(b - b0, expected_vb, atol=1e-6)


def test_paper_net_weight_counts():
    assert nets.count_weights(nets.layer_sizes(nets.PAPER_NETS[4])) == 12_115_010  # the paper's 12.11M
    assert nets.count_weights(nets.layer_sizes(nets.PAPER_NETS[1])) == 1_347_510   # the paper's 1.34M
