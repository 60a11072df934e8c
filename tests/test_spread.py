"""The spread engine (`--engine spread`, cuda_kernels/mlp_spread.cu) on the emulator. It sums in
another order than the graph engine, so it is held to the numpy reference within sum-length bounds
(one online step) and to the graph engine's loss and error over a few epochs; its own result is the
same bits in every block order and wherever its weights are kept (registers, shared memory, L2);
stopped and resumed it ends as a whole run does; planted faults show."""
import json

import numpy as np
import pytest

from gpumlp import cli, nets, spread_plan
from gpumlp import reference as R
from gpumlp.config import TrainConfig
from gpumlp.device import KERNEL_DIR, EmulatedDevice
from gpumlp.emulator import load_module_source
from gpumlp.errors import UserError
from gpumlp.rundir import RunDir
from gpumlp.tolerances import LOSS, PAPER_RTOL, SOFTMAX, TANH_SLOPE, abs_products, compare, sum_tolerance
from gpumlp.train_gpu import DeviceTrainer
from gpumlp.train_spread import KERNEL, SOURCE, SpreadTrainer
from gpumlp.training import epoch_order, make_split
from helpers import assert_close, first_state_difference, weights_sha

ODD = [37, 29, 23]    # 841-37-29-23-10: every layer smaller than a register tile's 16 rows per block
MIXED = [70, 40]      # 841-70-40-10 on 2 blocks: 35 rows of layer 0 per block, 16 of them in registers
# 10 rows of 841 in shared memory: block 0 keeps layer 0's rows 16..25 there and rows 26..34 and all
# of layer 1 in global memory; every block keeps its copy of the output layer in its scratch.
MIXED_CAPACITY = 10 * 841
QUIET = lambda line: None  # noqa: E731
CLI_NET = ["--hidden", "70", "40", "--train-images", "20", "--test-images", "20", "--lr", "0.01",
           "--momentum", "0.5", "--checkpoint-every", "1", "--batch-size", "1"]


def config_for(hidden, momentum=0.5, train_images=70, augment=True):
    return TrainConfig(hidden=hidden, train_images=train_images, test_images=10, momentum=momentum,
                       device="emulate", augment=augment)


def spread_trainer(data, config, **options):
    return SpreadTrainer(EmulatedDevice(), nets.init_params(config.sizes, config.seed), make_split(data, config),
                         config, QUIET, **options)


def test_the_plan_puts_rows_in_registers_shared_memory_and_global_memory():
    """The MIXED launch of the tests below really uses all three places (spread_plan's mirror)."""
    sizes = nets.layer_sizes(MIXED)
    assert spread_plan.register_layer(sizes, 2) == 0
    assert spread_plan.block_storage(sizes, 0, 2, MIXED_CAPACITY) == spread_plan.BlockStorage(
        (16, 0, 0), (10, 0, 0), (9, 20, 0), (0, 0, 10))
    assert spread_plan.block_storage(sizes, 1, 2, MIXED_CAPACITY) == spread_plan.BlockStorage(
        (16, 0, 0), (10, 0, 0), (9, 20, 0), (0, 0, 10))


def test_grid_barriers_per_image_are_the_ones_the_kernel_passes(data100):
    """spread_plan.grid_syncs_per_image (2 L - 3: none after the replicated output layer; 2 for one
    hidden layer) against the emulator's count of a launch's grid barriers: per image, plus the
    one at the end of the launch."""
    assert [spread_plan.grid_syncs_per_image(nets.layer_sizes(h)) for h in ([1000, 500], nets.PAPER_NETS[4])] == [3, 9]
    for hidden, expected in (([37], 2), (MIXED, 3), (ODD, 5)):
        trainer = spread_trainer(data100, config_for(hidden, 0.5, train_images=20), blocks=3)
        assert spread_plan.grid_syncs_per_image(trainer.sizes) == expected
        trainer.begin_epoch(1, 0.01, epoch_order(0, 1, trainer.n_train))
        for steps in (1, 4):
            trainer.launch(steps)
            assert trainer.kernel.grid_barriers == steps * expected + 1, (hidden, steps)


def test_an_output_layer_whose_copy_does_not_fit_shared_memory_is_refused(data100):
    """841-3000-10 with momentum: W_out, b_out and their velocities (240 KiB) in every block exceed
    the 227 KiB a block may have; without momentum (120 KiB) the same net is planned."""
    with pytest.raises(UserError, match=r"^--engine spread: every block keeps a copy of the output layer "
                                        r"\(10 x 3000 and its velocities, 234\.5 KiB"):
        spread_trainer(data100, config_for([3000], 0.5, train_images=10), blocks=2)
    assert spread_trainer(data100, config_for([3000], 0.0, train_images=10), blocks=2).plan.blocks == 2


def test_the_kernels_scratch_layout_is_spread_plans():
    """The kernel lays its scratch out as x (max n_in), the prefetched image (n_in of layer 0; none
    where it fits in x's buffer beside layer 0's input, with two or more hidden layers),
    delta (ceil(n_out / G) rows of a hidden layer: the largest of the integer-division ranges), the
    register reduction, the exchange buffer (the partial tile (G, ceil(n_out / G) | 1) of every
    hidden layer but the top one, or the top one's input), logits and delta_out, and the output
    layer's copy (with its velocities under momentum), the biases of the block's rows of every hidden
    layer (ceil(n_out / G) each; with momentum their velocities too), the weights after it: spread_plan.
    scratch_floats must be that sum, else the weights would overrun the shared memory the launch
    gives (which no emulator check would see)."""
    source = (KERNEL_DIR / SOURCE).read_text()
    for line in ("int max_in = 0, max_rows = 0, exchange = sizes[last - 1];",
                 "const int rows = (sizes[l + 1] + grid - 1) / grid;",
                 "exchange = max(exchange, grid * (rows | 1));",
                 "next += output_velocities ? n_classes * out_in : 0;",
                 "next += output_velocities ? n_classes : 0;\n        s.bias = next;\n        next += bias_rows;",
                 "bias_rows += rows;",
                 "const bool image_in_x = n_layers > 2 && 2 * sizes[0] <= max_in;",
                 "next += image_in_x ? 0 : sizes[0];",
                 "next += output_velocities ? bias_rows : 0;\n        float* weights = next;"):
        assert line in source, line
    for hidden, image in (([37], 841), ([2000], 841), (ODD, 841), (MIXED, 841), ([1000, 500], 841),
                          ([1682, 20], 0), ([1681, 20], 841), ([2500, 2000, 1500, 1000, 500], 0)):
        sizes = nets.layer_sizes(hidden)
        for blocks in (1, 2, 7, 64, 132):
            rows = [-(-n_out // blocks) for n_out in sizes[1:-1]]   # of each hidden layer
            exchange = max([sizes[-3]] + [blocks * (r | 1) for r in rows[:-1]])
            for momentum in (False, True):
                copy = (2 if momentum else 1) * sizes[-1] * (sizes[-2] + 1)
                biases = (2 if momentum else 1) * sum(rows)
                expected = (max(sizes[:-1]) + image + max(rows) + 8 * 16 + exchange + 2 * sizes[-1] + copy
                            + biases)
                assert spread_plan.scratch_floats(sizes, blocks, momentum) == expected, (hidden, blocks, momentum)


# ---- one online step against the numpy reference -----------------------------------------------

def carried(W, errors, c: float = 2.0) -> np.ndarray:
    """What input errors (bounds `errors`, (n_in,)) carry through the sums W @ x, W (n_out, n_in):
    they come from independent roundings, so they add like a random walk, as sum_tolerance assumes
    of the sums' own roundings: c sqrt(sum_k W_ik^2 e_k^2) (the worst case sum_k |W_ik| e_k grows
    with every layer's width and is ~30 times looser at net 1's)."""
    return c * np.sqrt((W.astype(np.float64) ** 2) @ (errors ** 2))


def online_step_bounds(params, x, label, lr):
    """The bound of every quantity one online step (R.train_online_ref) from `params` on image x
    (n_in,) computes, where the spread kernel sums in another order. Why each term:
      * a layer's pre-activation is an n_in-term sum in another order than numpy's BLAS:
        sum_tolerance(|W||x| + |b|, n_in), plus what the input's own errors carry through W
        (`carried`); the scaled tanh multiplies both by at most A B and adds a few ulp
        (PAPER_RTOL |y|);
      * delta_out = softmax - onehot moves by at most half the largest logit error (the softmax's
        row of derivatives sums to 2 p (1 - p) <= 1/2 in absolute value), plus SOFTMAX's expf ulps;
        the loss by at most twice it (its derivatives p - onehot sum to <= 2 in absolute value);
      * a hidden delta (delta_above W) f'(y) is an n_out-term sum in another order (spread: a chain
        per block, then a tree over blocks): sum_tolerance(|delta_above||W|, n_out) plus what
        delta_above's errors carry through W, times |f'(y)|, plus |delta_above W| times y's bound
        times max |f''| = 2 B;
      * the step lr (delta_i x_j) carries delta's and x's bounds (the rounding of W + step is the
        rtol PAPER_RTOL |W| the comparison adds); the velocities start at 0, so they carry the same.
    Returns (activations [x, y_1, ..., logits], their bounds, loss bound, [(W bound, b bound)])."""
    f64 = np.float64
    activations = R.forward_all(params, x[None])
    bounds = [np.zeros(x.shape, f64)]
    last = len(params) - 1
    for layer, (W, b) in enumerate(params):
        x_in, e_in = activations[layer][0], bounds[-1]
        pre = sum_tolerance(abs_products(x_in, W.T) + np.abs(b), W.shape[1]) + carried(W, e_in)
        bounds.append((TANH_SLOPE if layer < last else 1.0) * pre + PAPER_RTOL * np.abs(activations[layer + 1][0]))
    worst_logit = bounds[-1].max()
    delta = R.softmax_xent_ref(activations[-1], np.array([label]))["delta"][0]
    delta_bound = 0.5 * worst_logit + SOFTMAX["atol"] + SOFTMAX["rtol"] * np.abs(delta)
    update_bounds = [None] * len(params)
    for layer in range(last, -1, -1):
        W = params[layer][0]
        x_in, e_in = activations[layer][0], bounds[layer]
        update_bounds[layer] = (lr * (delta_bound[:, None] * np.abs(x_in)[None] + np.abs(delta)[:, None] * e_in[None]),
                                lr * delta_bound)
        if layer:
            g = (delta @ W).astype(f64)
            slope = np.abs(R.scaled_tanh_derivative_from_output(x_in)).astype(f64)
            g_bound = sum_tolerance(np.abs(delta).astype(f64) @ np.abs(W), W.shape[0]) + carried(W.T, delta_bound)
            delta = R.backprop_delta_ref(W, delta[None], x_in[None])[0]
            delta_bound = slope * g_bound + np.abs(g) * 2 * float(R.TANH_B) * e_in + PAPER_RTOL * np.abs(delta)
    return [a[0] for a in activations], bounds, 2 * worst_logit + LOSS["atol"], update_bounds


@pytest.mark.parametrize("hidden, options, momentum", [
    (ODD, dict(blocks=3), 0.5),
    (ODD, dict(blocks=30), 0.0),
    (MIXED, dict(blocks=2, shared_weight_floats=MIXED_CAPACITY), 0.5),
    ([1000, 500], dict(blocks=8), 0.5),
], ids=["odd-3-blocks", "odd-30-blocks-some-own-nothing", "mixed-registers-shared-global", "net-1-8-blocks"])
def test_one_online_step_matches_the_reference_within_sum_length_bounds(data100, hidden, options, momentum):
    """train_online_spread against its numpy reference (reference.train_online_ref): forward
    outputs, loss and every layer's W and b after one step from the same weights, each
    within its bound (reference_step_with_bounds says why) + PAPER_RTOL |ref|; the step must move
    the weights by far more than the bound (else the test would prove nothing)."""
    config = config_for(hidden, momentum, augment=False)
    trainer = spread_trainer(data100, config, **options)
    d = trainer.device
    if config.sizes[1] == 1000:   # net 1 on 8 blocks: 125 rows of 841 per block fill the opt-in shared memory
        assert trainer.plan.shared_bytes > 48 * 1024
        assert trainer.kernel.max_dynamic_shared_size_bytes >= trainer.plan.shared_bytes
    lr = 0.05
    order = epoch_order(0, 1, trainer.n_train)
    trainer.begin_epoch(1, lr, order)
    trainer.launch(1)
    params = nets.init_params(config.sizes, config.seed)
    initial = [W.copy() for W, _ in params]
    images, labels = d.to_host(trainer.epoch_images), d.to_host(trainer.train_labels)
    sample = int(order[0])
    acts, act_bounds, loss_bound, update_bounds = online_step_bounds(params, images[sample], int(labels[sample]), lr)
    velocities = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    loss, _ = R.train_online_ref(params, velocities, images, labels, order, 0, 1, lr, momentum)
    device_acts = [d.to_host(a).reshape(-1) for a in trainer.buffers[1]["activations"]]   # (1, n_out) each
    checks = [(f"forward y_{layer}", got, ref, bound)
              for layer, (got, ref, bound) in enumerate(zip(device_acts, acts[1:], act_bounds[1:]))]
    checks.append(("loss", d.to_host(trainer.loss_total), np.array([loss]), loss_bound))
    state = trainer.get_state()
    for layer, ((W, b), (vW, vb), (ref_W, ref_b), (ref_vW, ref_vb), (bound_W, bound_b)) in enumerate(
            zip(state["params"], state["velocities"], params, velocities, update_bounds)):
        checks += [(f"W_{layer} after the step", W, ref_W, bound_W), (f"b_{layer} after the step", b, ref_b, bound_b)]
        if momentum:
            checks += [(f"velocity of W_{layer}", vW, ref_vW, bound_W), (f"velocity of b_{layer}", vb, ref_vb, bound_b)]
        assert np.abs(ref_W - initial[layer]).max() > 100 * bound_W.max()   # the step moved W
    for what, got, ref, bound in checks:
        assert_close(got, ref, bound, PAPER_RTOL, what=what)
    used = {what: compare(got, ref, bound, PAPER_RTOL).used for what, got, ref, bound in checks}
    print("largest |spread - reference| / bound: " + ", ".join(f"{what} {u:.3g}" for what, u in used.items()))


def test_a_few_epochs_track_the_graph_engines_loss_and_error(data100):
    """Three epochs with momentum (undeformed: deformation scrambles the synthetic set's patterns,
    which then do not learn in three epochs): the rounding differences of the other summation order
    grow through training but stay tiny next to what training changes: every epoch's mean loss
    within 1e-4 relative of the graph engine's (measured: a few 1e-7), the error count within one
    image."""
    config = config_for(MIXED, 0.5, augment=False)
    split = make_split(data100, config)
    graph = DeviceTrainer(EmulatedDevice(), nets.init_params(config.sizes, config.seed), split, config, QUIET)
    spread = SpreadTrainer(EmulatedDevice(), nets.init_params(config.sizes, config.seed), split, config, QUIET,
                           blocks=2, shared_weight_floats=MIXED_CAPACITY)
    losses = []
    for epoch in range(1, 4):
        order = epoch_order(0, epoch, graph.n_train)
        (g_loss, g_error), (s_loss, s_error) = graph.train_epoch(epoch, 0.05, order), spread.train_epoch(epoch, 0.05, order)
        assert s_loss == pytest.approx(g_loss, rel=1e-4), epoch
        assert abs(s_error - g_error) * graph.n_train <= 1, epoch
        losses.append(g_loss)
        print(f"epoch {epoch}: graph {g_loss!r} {g_error!r}, spread {s_loss!r} {s_error!r}, relative {abs(s_loss - g_loss) / g_loss:.2g}")
    assert losses[-1] < 0.9 * losses[0]   # it trained: the comparison is of a moving loss


# ---- the same bits in every block order and wherever the weights are kept -----------------------

def train_spread_epoch(data, hidden, block_order="launch", reverse_threads=False, split_barrier="arrive", **options):
    trainer = spread_trainer(data, config_for(hidden, 0.5, train_images=30), **options)
    module = trainer.kernel.module
    module.block_order, module.block_order_seed = block_order, 3
    module.split_barrier = split_barrier
    module.reverse_threads = module.poison_shared = reverse_threads
    trainer.partial[...] = np.nan   # what fresh device memory may hold
    trainer.train_epoch(1, 0.01, epoch_order(0, 1, trainer.n_train))
    return trainer.get_state()


@pytest.mark.parametrize("hidden, blocks, capacities", [
    (MIXED, 2, (MIXED_CAPACITY, 0, None)),
    (ODD, 5, (0, None)),
    ([37], 3, (0, None)),
], ids=["mixed-2-blocks", "odd-5-blocks", "one-hidden-layer-3-blocks"])
def test_every_block_order_and_weight_place_gives_the_same_bits(data100, hidden, blocks, capacities):
    """Between grid barriers blocks run in launch, reverse and shuffled order (the split barriers'
    one grid barrier at the arrive, and in shuffled order also at the wait), threads of a block
    last to first on poisoned shared memory, and the weights sit in shared memory, partly in global
    memory or all there (None: every non-register row in shared memory): where a weight is kept must not change an operation, so every run ends
    with identical weights and velocities."""
    expected = train_spread_epoch(data100, hidden, blocks=blocks, shared_weight_floats=capacities[0])
    runs = [dict(block_order="reverse"), dict(block_order="random"), dict(reverse_threads=True),
            dict(block_order="random", split_barrier="wait")]
    runs += [dict(shared_weight_floats=c) for c in capacities[1:]]
    for run in runs:
        options = dict(blocks=blocks, shared_weight_floats=capacities[0]) | run
        assert first_state_difference(expected, train_spread_epoch(data100, hidden, **options)) is None, run


def test_the_prefetched_image_in_xs_buffer_or_its_own_gives_the_same_bits(data100, monkeypatch):
    """841-1700-20-10: x's buffer (1700 floats) holds layer 0's input and the next image side by
    side, so the kernel keeps no buffer of its own for the image; kept in one of its own instead
    (the kernel's choice planted to false, the plan's scratch made as large), 2 launches of 5 images
    with the weights partly in shared and partly in global memory end with the same bits."""
    source = (KERNEL_DIR / SOURCE).read_text()
    choice = "        const bool image_in_x = n_layers > 2 && 2 * sizes[0] <= max_in;\n"
    assert source.count(choice) == 1
    sizes = nets.layer_sizes([1700, 20])
    assert spread_plan.image_floats(sizes) == 0
    states = []
    for name, text in (("in_x", source), ("own_buffer", source.replace(choice, choice.replace("n_layers > 2", "false")))):
        if name == "own_buffer":
            monkeypatch.setattr(spread_plan, "image_floats", lambda sizes: sizes[0])
        trainer = spread_trainer(data100, config_for([1700, 20], 0.5, train_images=10), blocks=8,
                                 shared_weight_floats=20 * 841)
        trainer.kernel = planted_module(text, name).get_function(KERNEL)
        trainer.launch_steps = 5
        trainer.train_epoch(1, 0.01, epoch_order(0, 1, trainer.n_train))
        states.append(trainer.get_state())
    assert first_state_difference(*states) is None


def planted_module(text, name):
    return load_module_source(text, name=name, include_dirs=[KERNEL_DIR], poison_shared=True)


def assert_planted_fault_shows(data, source, planted):
    """One epoch of ODD on 4 blocks from partial sums poisoned to NaN: the kernel as it is gives the
    same bits in launch and shuffled block order; the planted one differs from it in both."""
    states = {}
    for name, text in (("as_is", source), ("planted", planted)):
        module = planted_module(text, name)
        for block_order in ("launch", "random"):
            trainer = spread_trainer(data, config_for(ODD, 0.5, train_images=20), blocks=4)
            trainer.kernel = module.get_function(KERNEL)
            module.block_order, module.block_order_seed = block_order, 5
            trainer.partial[...] = np.nan
            trainer.train_epoch(1, 0.01, epoch_order(0, 1, trainer.n_train))
            states[name, block_order] = trainer.get_state()
    expected = states["as_is", "launch"]
    assert first_state_difference(expected, states["as_is", "random"]) is None
    assert first_state_difference(expected, states["planted", "launch"]) is not None
    assert first_state_difference(expected, states["planted", "random"]) is not None


def test_a_planted_missing_grid_sync_is_caught(data100):
    """Without the grid barrier after the backward partials of the hidden layers below the top one
    (ODD: layer 1; its arrive and wait become block barriers), the owners of the layer below read
    partial sums before their writers have run (poisoned to NaN, as fresh memory may hold anything):
    in launch and in shuffled block order the weights differ from the kernel as it is, which gives
    the same bits in both orders."""
    source = (KERNEL_DIR / SOURCE).read_text()
    arrive = "                GridArrival arrival = grid_arrive(barrier);\n"
    wait = "                grid_wait(barrier, arrival);\n"
    assert source.count(arrive) == 1 and source.count(wait) == 1
    planted = source.replace(arrive, "                GridArrival arrival = top ? grid_arrive(barrier) : GridArrival{};\n")
    planted = planted.replace(wait, "                if (top)\n    " + wait + "                else\n"
                              "                    __syncthreads();\n")
    # planted: only the barrier after the top hidden layer's backward pass is left
    assert_planted_fault_shows(data100, source, planted)


def test_partials_published_after_the_arrive_are_caught(data100):
    """The partial row is written before the split barrier's arrive, because other blocks read it
    right after the barrier. Planted after the arrive (the emulator's grid barrier is at the arrive),
    the other blocks' next phase runs before it in some block order: launch and shuffled order end
    with other weights than the kernel as it is."""
    source = (KERNEL_DIR / SOURCE).read_text()
    partials = "                if (l > 0 && p.rows > 0)\n                    hidden_partials(wreg, p, tiled, s.delta);\n"
    arrive = "                GridArrival arrival = grid_arrive(barrier);\n"
    assert source.count(partials + arrive) == 1
    planted = source.replace(partials + arrive, arrive + partials)
    assert_planted_fault_shows(data100, source, planted)


def test_every_blocks_copy_of_the_output_layer_holds_the_same_bits(data100):
    """Block 0 writes its copy of the output layer back at the end of each launch: written back by
    any other block instead, in launch and in shuffled block order, over several launches (each
    starting from the copy written back), the run ends with the same weights and velocities."""
    source = (KERNEL_DIR / SOURCE).read_text()
    writer = "    if (blockIdx.x == 0)   // every block's copy of the output layer holds the same bits\n"
    assert source.count(writer) == 1
    blocks = 3
    states = []
    for block in range(blocks):
        module = planted_module(source.replace(writer, writer.replace("== 0", f"== {block}")), f"writer_{block}")
        for block_order in ("launch", "random"):
            trainer = spread_trainer(data100, config_for(ODD, 0.5, train_images=20), blocks=blocks)
            trainer.kernel = module.get_function(KERNEL)
            trainer.launch_steps = 7
            module.block_order, module.block_order_seed = block_order, 11
            trainer.train_epoch(1, 0.01, epoch_order(0, 1, trainer.n_train))
            states.append(trainer.get_state())
    for state in states[1:]:
        assert first_state_difference(states[0], state) is None

def test_a_planted_missing_syncthreads_is_caught_by_reversed_threads(data100):
    """Without the __syncthreads after a layer's input is copied to shared memory, warps read
    inputs other threads have not written yet: with threads run last to first on poisoned shared
    memory the weights differ from the kernel's as it is."""
    source = (KERNEL_DIR / SOURCE).read_text()
    planted = "                        s.x[j] = __ldcg(plan[l - 1].y + j);\n                    __syncthreads();\n"
    assert source.count(planted) == 1
    states = []
    for name, text in (("as_is", source), ("missing_syncthreads", source.replace(planted, planted.split("\n")[0] + "\n"))):
        module = planted_module(text, name)
        module.reverse_threads = True
        trainer = spread_trainer(data100, config_for(MIXED, 0.5, train_images=10), blocks=2,
                                 shared_weight_floats=MIXED_CAPACITY)
        trainer.kernel = module.get_function(KERNEL)
        trainer.train_epoch(1, 0.01, epoch_order(0, 1, trainer.n_train))
        states.append(trainer.get_state())
    assert first_state_difference(*states) is not None


def test_a_grid_larger_than_the_resident_blocks_is_refused(data100):
    with pytest.raises(UserError, match=r"spread engine's grid must have 1 to \d+ blocks, got 100000"):
        spread_trainer(data100, config_for(ODD), blocks=100000)


# ---- the command line -----------------------------------------------------------------------------

def train(out, *args):
    assert cli.main(["--device", "emulate", *CLI_NET, "--engine", "spread", *map(str, args), "--out", str(out)]) == 0
    return RunDir(out)


def test_stopped_and_resumed_ends_with_the_same_weights(data100, tmp_path, capsys):
    """Deformed, with momentum, on the emulator's default grid: two epochs whole, or one and a
    resume (which keeps the engine) to two, end with the same weights; config.json says spread."""
    whole = train(tmp_path / "whole", "--epochs", "2")
    out = capsys.readouterr().out
    assert "engine: spread (requested)" in out and "spread engine: " in out
    train(tmp_path / "cut", "--epochs", "1")
    capsys.readouterr()
    argv = ["--resume", str(tmp_path / "cut"), "--epochs", "2"]
    assert cli.main(argv) == 0
    assert "engine: spread (requested)" in capsys.readouterr().out
    cut = RunDir(tmp_path / "cut")
    assert weights_sha(cut) == weights_sha(whole)
    assert json.loads((cut.path / "config.json").read_text())["engine"] == "spread"


def test_resume_may_move_a_run_between_spread_and_the_other_engines(data100, tmp_path):
    """--engine is resumable: a run begun on spread goes on with graph, then back on spread; the
    log names each engine and config.json the engine of the latest session."""
    train(tmp_path / "run", "--epochs", "1")
    assert cli.main(["--resume", str(tmp_path / "run"), "--epochs", "2", "--engine", "graph"]) == 0
    assert cli.main(["--resume", str(tmp_path / "run"), "--epochs", "3", "--engine", "spread"]) == 0
    run = RunDir(tmp_path / "run")
    log = run.log_path().read_text()
    assert log.count("engine: spread (requested)") == 2 and log.count("engine: graph (requested)") == 1
    assert [m["epoch"] for m in run.read_metrics()] == [1, 2, 3]
    config = json.loads((run.path / "config.json").read_text())
    assert (config["engine"], config["settings"]["engine"]) == ("spread", "spread")


def test_engine_spread_refuses_minibatches(data100, tmp_path, capsys):
    assert cli.main(["--device", "emulate", *CLI_NET, "--engine", "spread", "--batch-size", "4",
                     "--out", str(tmp_path / "x")]) == 2
    assert "error: --engine spread: it trains online only" in capsys.readouterr().err


def test_engine_spread_needs_a_device(data100, tmp_path, capsys):
    assert cli.main(["--device", "cpu", *CLI_NET, "--engine", "spread", "--out", str(tmp_path / "x")]) == 2
    assert "error: --engine spread needs --device cuda or emulate" in capsys.readouterr().err


def test_auto_never_takes_spread(data100, tmp_path, capsys):
    """Spread sums in another order: auto keeps choosing persistent for an online run."""
    assert cli.main(["--device", "emulate", *CLI_NET, "--epochs", "1", "--out", str(tmp_path / "auto")]) == 0
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["engine"] == "persistent"


@pytest.mark.gpu
def test_cuda_spread_engine_keeps_its_bits_wherever_the_weights_are(data100):
    """On a GPU (never run yet: no GPU was available where this was written): weights partly in
    shared memory or all in global memory give the same bits, and the loss tracks the graph engine's."""
    from gpumlp.device import CudaDevice, gpu_available
    if not gpu_available():
        pytest.skip("needs an NVIDIA GPU with CuPy")
    config = config_for(MIXED, 0.5, train_images=30)
    split = make_split(data100, config)
    order = epoch_order(0, 1, len(split.train_labels))
    graph = DeviceTrainer(CudaDevice(), nets.init_params(config.sizes, config.seed), split, config, QUIET)
    graph_loss, _ = graph.train_epoch(1, 0.01, order)
    states = []
    for capacity in (MIXED_CAPACITY, 0):
        trainer = SpreadTrainer(CudaDevice(), nets.init_params(config.sizes, config.seed), split, config, QUIET,
                                blocks=2, shared_weight_floats=capacity)
        loss, _ = trainer.train_epoch(1, 0.01, order)
        assert loss == pytest.approx(graph_loss, rel=1e-4)
        states.append(trainer.get_state())
    assert first_state_difference(*states) is None
