"""The persistent engine (`--engine persistent`, cuda_kernels/mlp_persistent.cu) on the emulator:
the same weights as the graph engine, bit for bit, for a net of odd layer sizes, online, with
deformation and momentum, whole or stopped and resumed; and `--engine auto` chooses and records."""
import json

import numpy as np
import pytest

from conftest import make_synthetic_mnist
from gpumlp import cli
from gpumlp.rundir import RunDir

# 841-37-29-23-10: three hidden layers of odd sizes; 37 rows make two chunks (32 + 5).
ODD_NET = ["--hidden", "37", "29", "23", "--train-images", "100", "--test-images", "40", "--lr", "0.01",
           "--momentum", "0.5", "--checkpoint-every", "1", "--batch-size", "1"]


@pytest.fixture
def data100(monkeypatch):
    data = make_synthetic_mnist(n_train=100, n_test=40, seed=7)
    monkeypatch.setattr("gpumlp.data.load_mnist", lambda *args, **kwargs: data)
    return data


def train(out, *args):
    assert cli.main(["--device", "emulate", *ODD_NET, *map(str, args), "--out", str(out)]) == 0
    return RunDir(out)


def weights_sha(run):
    return json.loads((run.path / "summary.json").read_text())["weights_sha256"]


def test_persistent_engine_ends_with_the_graph_engines_weights(data100, tmp_path, capsys):
    graph = train(tmp_path / "graph", "--engine", "graph", "--epochs", "2")
    persistent = train(tmp_path / "persistent", "--engine", "persistent", "--epochs", "2")
    assert "engine: persistent (requested)" in capsys.readouterr().out
    assert weights_sha(graph) == weights_sha(persistent)
    for g, p in zip(graph.read_metrics(), persistent.read_metrics(), strict=True):
        assert g["train_loss"] == p["train_loss"] and g["train_error"] == p["train_error"], (g, p)
    assert json.loads((persistent.path / "config.json").read_text())["engine"] == "persistent"


def test_persistent_engine_stopped_and_resumed_ends_with_the_same_weights(data100, tmp_path):
    whole = train(tmp_path / "whole", "--engine", "graph", "--epochs", "2")
    train(tmp_path / "cut", "--engine", "persistent", "--epochs", "1")
    assert cli.main(["--resume", str(tmp_path / "cut"), "--epochs", "2"]) == 0
    cut = RunDir(tmp_path / "cut")
    assert weights_sha(cut) == weights_sha(whole)
    assert json.loads((cut.path / "config.json").read_text())["engine"] == "persistent"
