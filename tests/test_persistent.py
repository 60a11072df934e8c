"""The persistent engine (`--engine persistent`, cuda_kernels/mlp_persistent.cu) on the emulator:
the same weights as the graph engine, bit for bit, for a net of odd layer sizes, online, with
deformation and momentum, whole or stopped and resumed; and `--engine auto` chooses and records."""
import json

import numpy as np
import pytest

from helpers import first_state_difference, weights_sha
from gpumlp import cli
from gpumlp.rundir import RunDir
from gpumlp.training import epoch_order

# 841-37-29-23-10: three hidden layers of odd sizes; 37 rows make two chunks (32 + 5).
ODD_NET = ["--hidden", "37", "29", "23", "--train-images", "100", "--test-images", "40", "--lr", "0.01",
           "--momentum", "0.5", "--checkpoint-every", "1", "--batch-size", "1"]


def train(out, *args):
    assert cli.main(["--device", "emulate", *ODD_NET, *map(str, args), "--out", str(out)]) == 0
    return RunDir(out)


@pytest.mark.parametrize("momentum", ["0.5", "0"], ids=["momentum", "plain-sgd"])
def test_persistent_engine_ends_with_the_graph_engines_weights(data100, tmp_path, capsys, momentum):
    graph = train(tmp_path / "graph", "--engine", "graph", "--epochs", "2", "--momentum", momentum)
    persistent = train(tmp_path / "persistent", "--engine", "persistent", "--epochs", "2", "--momentum", momentum)
    assert "engine: persistent (requested)" in capsys.readouterr().out
    assert weights_sha(graph) == weights_sha(persistent)
    for g, p in zip(graph.read_metrics(), persistent.read_metrics(), strict=True):
        assert g["train_loss"] == p["train_loss"] and g["train_error"] == p["train_error"], (g, p)
    assert json.loads((persistent.path / "config.json").read_text())["engine"] == "persistent"


def test_persistent_engine_stopped_and_resumed_ends_with_the_same_weights(data100, tmp_path, capsys):
    whole = train(tmp_path / "whole", "--engine", "graph", "--epochs", "2")
    train(tmp_path / "cut", "--engine", "persistent", "--epochs", "1")
    capsys.readouterr()
    assert cli.main(["--resume", str(tmp_path / "cut"), "--epochs", "2"]) == 0
    assert "engine: persistent (requested)" in capsys.readouterr().out   # --resume keeps the engine
    cut = RunDir(tmp_path / "cut")
    assert weights_sha(cut) == weights_sha(whole)
    assert json.loads((cut.path / "config.json").read_text())["engine"] == "persistent"


def test_resume_may_change_the_engine_and_the_weights_stay_the_same(data100, tmp_path, capsys):
    """--engine is resumable (config.RESUMABLE): both engines give the same bits, so a run begun
    on one and finished on the other ends as a whole run does; config.json and train.log say so."""
    whole = train(tmp_path / "whole", "--engine", "persistent", "--epochs", "3")
    train(tmp_path / "cut", "--engine", "persistent", "--epochs", "1")
    assert cli.main(["--resume", str(tmp_path / "cut"), "--epochs", "2", "--engine", "graph"]) == 0
    assert cli.main(["--resume", str(tmp_path / "cut"), "--epochs", "3", "--engine", "auto"]) == 0
    cut = RunDir(tmp_path / "cut")
    assert weights_sha(cut) == weights_sha(whole)
    config = json.loads((cut.path / "config.json").read_text())
    assert (config["engine"], config["settings"]["engine"]) == ("persistent", "auto")
    log = cut.log_path().read_text()
    assert log.count("engine: persistent (requested)") == 1 and log.count("engine: graph (requested)") == 1
    assert "engine: persistent (the device launches cooperatively" in log


# ---- the trainers side by side: grids, block orders, weights on or off chip ---------------------

def trainers(data, **persistent_options):
    from gpumlp import nets
    from gpumlp.config import TrainConfig
    from gpumlp.device import EmulatedDevice
    from gpumlp.train_gpu import DeviceTrainer
    from gpumlp.train_persistent import PersistentTrainer
    from gpumlp.training import make_split
    config = TrainConfig(hidden=[37, 29, 23], train_images=70, test_images=10, momentum=0.5, device="emulate")
    split = make_split(data, config)
    quiet = lambda line: None  # noqa: E731
    # Each trainer its own initial weights: the emulator's arrays may be the host arrays themselves.
    return (DeviceTrainer(EmulatedDevice(), nets.init_params(config.sizes, config.seed), split, config, quiet),
            PersistentTrainer(EmulatedDevice(), nets.init_params(config.sizes, config.seed), split, config, quiet,
                              **persistent_options))


def train_both(graph, persistent, epochs=1):
    for epoch in range(1, epochs + 1):
        order = epoch_order(0, epoch, graph.n_train)
        assert graph.train_epoch(epoch, 0.01, order) == persistent.train_epoch(epoch, 0.01, order)
    return graph.get_state(), persistent.get_state()


@pytest.mark.parametrize("options", [dict(blocks=1), dict(blocks=2), dict(blocks=7, weights_in_shared=False),
                                     dict(blocks=3, block_order="random"), dict(block_order="reverse"),
                                     dict(blocks=2, reverse_threads=True)],
                         ids=["1-block", "2-blocks", "7-blocks-global", "3-blocks-shuffled", "reversed",
                              "2-blocks-reversed-threads"])
def test_any_grid_block_order_and_weight_place_gives_the_graph_engines_bits(data100, options):
    """Ownership moves rows between blocks, not operations between orders: every grid (fewer
    blocks than chunks, more than chunks), weights on or off chip and every block order between
    grid barriers must give identical weights and velocities (exact: the same operations)."""
    block_order = options.pop("block_order", "launch")
    reverse_threads = options.pop("reverse_threads", False)
    graph, persistent = trainers(data100, **options)
    persistent.kernel.module.block_order, persistent.kernel.module.block_order_seed = block_order, 11
    # threads of a block last to first, shared memory poisoned: what a missing __syncthreads shows in
    persistent.kernel.module.reverse_threads = persistent.kernel.module.poison_shared = reverse_threads
    assert persistent.plan.blocks == options.get("blocks", 5)
    assert first_state_difference(*train_both(graph, persistent)) is None


def test_a_planted_missing_grid_sync_is_caught(data100):
    """The kernel with the grid barrier after the backward partials removed: the owners of the
    layer below then read partial sums before they are written (poisoned here, as fresh device
    memory may hold anything), in the launch order of blocks and in a shuffled one; the kernel as
    it is, with the same poisoned memory, gives the graph engine's bits in both."""
    from gpumlp.device import KERNEL_DIR
    from gpumlp.emulator import load_module_source
    from gpumlp.train_persistent import KERNEL, SOURCE
    source = (KERNEL_DIR / SOURCE).read_text()
    planted = "            if (l)\n                grid_sync(barrier);\n"
    assert source.count(planted) == 1
    differs = {}
    for name, text in (("as is", source), ("planted", source.replace(planted, ""))):
        module = load_module_source(text, name=name.replace(" ", "_"), include_dirs=[KERNEL_DIR], poison_shared=True)
        for block_order in ("launch", "random"):
            graph, persistent = trainers(data100, blocks=5)
            persistent.kernel = module.get_function(KERNEL)
            persistent.partial[...] = np.nan
            module.block_order, module.block_order_seed = block_order, 5
            order = epoch_order(0, 1, graph.n_train)
            graph.train_epoch(1, 0.01, order)
            persistent.train_epoch(1, 0.01, order)
            differs[name, block_order] = first_state_difference(graph.get_state(), persistent.get_state()) is not None
    assert differs == {("as is", "launch"): False, ("as is", "random"): False,
                       ("planted", "launch"): True, ("planted", "random"): True}


def test_a_planted_missing_syncthreads_is_caught_by_reversed_threads(data100):
    """Without the __syncthreads after a layer's input is copied to shared memory, warps read
    inputs other threads have not written yet: with threads run last to first on poisoned shared
    memory the weights differ (and NaN shows)."""
    from gpumlp.device import KERNEL_DIR
    from gpumlp.emulator import load_module_source
    from gpumlp.train_persistent import KERNEL, SOURCE
    source = (KERNEL_DIR / SOURCE).read_text()
    planted = "                    x_shared[j] = __ldcg(x + j);\n                __syncthreads();\n"
    assert source.count(planted) == 1
    module = load_module_source(source.replace(planted, "                    x_shared[j] = __ldcg(x + j);\n"),
                                name="missing_syncthreads", include_dirs=[KERNEL_DIR], poison_shared=True,
                                reverse_threads=True)
    graph, persistent = trainers(data100, blocks=5)
    persistent.kernel = module.get_function(KERNEL)
    order = epoch_order(0, 1, graph.n_train)
    graph.train_epoch(1, 0.01, order)
    persistent.train_epoch(1, 0.01, order)
    assert first_state_difference(graph.get_state(), persistent.get_state()) is not None


def test_a_grid_larger_than_the_resident_blocks_is_refused(data100):
    from gpumlp.errors import UserError
    with pytest.raises(UserError, match=r"grid must have 1 to \d+ blocks, got 100000"):
        trainers(data100, blocks=100000)


def test_auto_takes_persistent_online_and_graph_for_minibatches(data100, tmp_path, capsys):
    online = train(tmp_path / "online", "--epochs", "1")
    assert "engine: persistent (the device launches cooperatively" in capsys.readouterr().out
    assert json.loads((online.path / "config.json").read_text())["engine"] == "persistent"
    batch = train(tmp_path / "batch", "--epochs", "1", "--batch-size", "4")
    assert "engine: graph (the persistent engine does not apply: it trains online only" in capsys.readouterr().out
    assert json.loads((batch.path / "config.json").read_text())["engine"] == "graph"


def test_engine_persistent_refuses_what_it_cannot_train(data100, tmp_path, capsys):
    assert cli.main(["--device", "emulate", *ODD_NET, "--batch-size", "4", "--engine", "persistent",
                     "--out", str(tmp_path / "x")]) == 2
    assert "error: --engine persistent: it trains online only" in capsys.readouterr().err


def test_engine_persistent_needs_a_device(data100, tmp_path, capsys):
    assert cli.main(["--device", "cpu", *ODD_NET, "--engine", "persistent", "--out", str(tmp_path / "x")]) == 2
    assert "error: --engine persistent needs --device cuda or emulate" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_persistent_engine_ends_with_the_graph_engines_weights(data100, tmp_path):
    """On a GPU (never run yet: no GPU was available where this was written)."""
    from gpumlp.device import gpu_available
    if not gpu_available():
        pytest.skip("needs an NVIDIA GPU with CuPy")
    runs = []
    for engine in ("graph", "persistent"):
        out = tmp_path / engine
        assert cli.main(["--device", "cuda", *ODD_NET, "--epochs", "2", "--engine", engine, "--out", str(out)]) == 0
        runs.append(weights_sha(RunDir(out)))
    assert runs[0] == runs[1]


def test_net_1_keeps_its_weights_in_more_than_48_kib_of_shared_memory_with_the_opt_in(data100):
    """Net 1's 49 blocks each hold 125 KiB of weights: beyond the 48 KiB a launch may have without
    the opt-in, which the device sets (as on a GPU); the emulator refuses the launch without it.
    Four images give the graph engine's bits."""
    from gpumlp import nets
    from gpumlp.config import TrainConfig
    from gpumlp.device import EmulatedDevice
    from gpumlp.emulator import EmulatorError
    from gpumlp.train_gpu import DeviceTrainer
    from gpumlp.train_persistent import PERSISTENT_THREADS, PersistentTrainer
    from gpumlp.training import make_split
    config = TrainConfig(net=1, train_images=4, test_images=2, device="emulate")
    split = make_split(data100, config)
    quiet = lambda line: None  # noqa: E731
    graph = DeviceTrainer(EmulatedDevice(), nets.init_params(config.sizes, 0), split, config, quiet)
    persistent = PersistentTrainer(EmulatedDevice(), nets.init_params(config.sizes, 0), split, config, quiet)
    assert persistent.plan.weights_in_shared and persistent.plan.shared_bytes > 48 * 1024
    assert persistent.kernel.max_dynamic_shared_size_bytes >= persistent.plan.shared_bytes
    assert first_state_difference(*train_both(graph, persistent)) is None
    persistent.kernel.max_dynamic_shared_size_bytes = 0
    with pytest.raises(EmulatorError, match=rf"invalid launch: {persistent.plan.shared_bytes} bytes of dynamic shared"):
        persistent.kernel.launch_cooperative(persistent.plan.blocks, PERSISTENT_THREADS, (), persistent.plan.shared_bytes)
