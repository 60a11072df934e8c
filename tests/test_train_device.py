"""The GPU training path end to end on the CPU emulator (`--device emulate`): the same kernels,
launch sequence and graph structure as on a GPU, checked against the numpy reference path."""
import json

import numpy as np
import pytest

from conftest import make_synthetic_mnist
from gpumlp import cli
from gpumlp.device import gpu_available
from gpumlp.rundir import RunDir

TINY = ["--hidden", "32", "--train-images", "256", "--test-images", "256", "--epochs", "2",
        "--lr", "0.002", "--checkpoint-every", "1"]


@pytest.fixture
def data256(monkeypatch):
    data = make_synthetic_mnist(n_train=256, n_test=256, seed=5)
    monkeypatch.setattr("gpumlp.data.load_mnist", lambda *args, **kwargs: data)
    return data


def train(out, *args, device="emulate"):
    code = cli.main(["--device", device, *TINY, *map(str, args), "--out", str(out)])
    assert code == 0
    return RunDir(out)


def summary(run):
    return json.loads((run.path / "summary.json").read_text())


@pytest.mark.parametrize("batch_args", [["--batch-size", "1"], ["--batch-size", "8", "--lr", "0.01"],
                                        ["--batch-size", "8", "--lr", "0.01", "--momentum", "0.5"]],
                         ids=["online", "minibatch", "momentum"])
def test_emulated_gpu_path_matches_numpy_reference(data256, tmp_path, batch_args):
    emulated = train(tmp_path / "emu", *batch_args)
    reference = train(tmp_path / "cpu", *batch_args, device="cpu")
    for e, r in zip(emulated.read_metrics(), reference.read_metrics(), strict=True):
        # Same data, deformations (same Philox draws), order and initial weights; the only
        # differences are float32 summation order and sin/cos rounding, far below 1e-4.
        assert e["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4), (e, r)
        assert e["train_error"] == r["train_error"] and e["test_error"] == r["test_error"]
    with np.load(emulated.path / "predictions.npz") as e, np.load(reference.path / "predictions.npz") as r:
        np.testing.assert_array_equal(e["final_probs"].argmax(1), r["final_probs"].argmax(1))
        np.testing.assert_allclose(e["final_probs"], r["final_probs"], atol=1e-4)


def test_emulated_run_is_repeatable_and_resumable(data256, tmp_path):
    whole = train(tmp_path / "whole")
    again = train(tmp_path / "again")
    assert summary(whole)["weights_sha256"] == summary(again)["weights_sha256"]
    code = cli.main(["--device", "emulate", *TINY[:6], "--epochs", "1", *TINY[8:], "--out", str(tmp_path / "cut")])
    assert code == 0 and RunDir(tmp_path / "cut").load_checkpoint()[0] == 1
    assert cli.main(["--resume", str(tmp_path / "cut"), "--epochs", "2"]) == 0
    assert summary(RunDir(tmp_path / "cut"))["weights_sha256"] == summary(whole)["weights_sha256"]


def test_graph_chunking_does_not_change_the_result(data256, tmp_path):
    """Replaying one captured graph per chunk must equal any other chunking (here 256 = 3*80 + 16)."""
    a = train(tmp_path / "a", "--graph-steps", "80", "--epochs", "1")
    b = train(tmp_path / "b", "--graph-steps", "256", "--epochs", "1")
    assert summary(a)["weights_sha256"] == summary(b)["weights_sha256"]


@pytest.mark.parametrize("device", ["emulate", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs an NVIDIA GPU with CuPy")])])
def test_each_graph_is_captured_once_per_run(data256, tmp_path, monkeypatch, device):
    """3 epochs of 250 images at batch 8 with 10 steps per graph: 31 full steps (3 replays of a
    10-step graph, a 1-step remainder) and a tail of 2 images, i.e. 3 distinct graphs, captured in
    epoch 1 and only replayed after. The learning rate halves every epoch and is read from device
    memory at replay: the per-epoch losses still follow the CPU trainer's."""
    from gpumlp.device import CudaDevice, EmulatedDevice
    device_class = EmulatedDevice if device == "emulate" else CudaDevice
    captured = []
    real_capture = device_class.capture

    def counting_capture(device):
        captured.append(device)
        return real_capture(device)

    monkeypatch.setattr(device_class, "capture", counting_capture)
    args = ["--epochs", "3", "--train-images", "250", "--batch-size", "8", "--graph-steps", "10",
            "--lr", "0.02", "--lr-decay", "0.5", *(["--skip-selfcheck"] if device == "cuda" else [])]
    on_device = train(tmp_path / "device", *args, device=device)
    assert len(captured) == 3
    reference = train(tmp_path / "cpu", *args, device="cpu")
    device_metrics, reference_metrics = on_device.read_metrics(), reference.read_metrics()
    assert [m["lr"] for m in device_metrics] == pytest.approx([0.02, 0.01, 0.005])
    for e, r in zip(device_metrics, reference_metrics, strict=True):
        assert e["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4), (e, r)
        assert e["train_error"] == r["train_error"]


def test_the_bench_captures_before_its_timed_passes(monkeypatch):
    """gpumlp.bench's gpumlp rows (GpumlpCuda, here on the emulator) capture their graph when built,
    as its PyTorch-graph rows do, so no timed pass includes a capture."""
    from gpumlp import bench, nets
    from gpumlp.device import EmulatedDevice
    captured = []
    real_capture = EmulatedDevice.capture
    monkeypatch.setattr(EmulatedDevice, "capture", lambda device: captured.append(device) or real_capture(device))
    images, labels = bench.synthetic_images(10, seed=0)
    workload = bench.Workload(nets.layer_sizes([16]), images, labels, "synthetic", lr=0.01, seed=0, repeats=2)
    on_device = bench.GpumlpCuda(workload, 4, EmulatedDevice())   # a pass: 2 steps of 4 images
    assert len(captured) == 1
    for pass_index in range(3):
        on_device.run_pass(workload.order(pass_index, 4))
    assert len(captured) == 1


def test_emulate_writes_the_run_directory(data256, tmp_path, capsys):
    run = train(tmp_path / "run")
    out = capsys.readouterr().out
    assert "device memory needed" in out and "emulated" in out
    for name in ["config.json", "metrics.jsonl", "metrics.csv", "checkpoint.npz", "best.npz", "summary.json"]:
        assert (run.path / name).is_file(), name
    assert "emulated" in json.loads((run.path / "config.json").read_text())["device"]


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs an NVIDIA GPU with CuPy")
def test_cuda_path_matches_numpy_reference(data256, tmp_path):
    cuda = train(tmp_path / "cuda", device="cuda")
    reference = train(tmp_path / "cpu", device="cpu")
    for c, r in zip(cuda.read_metrics(), reference.read_metrics(), strict=True):
        assert c["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)
    again = train(tmp_path / "cuda2", device="cuda")
    assert summary(cuda)["weights_sha256"] == summary(again)["weights_sha256"]
