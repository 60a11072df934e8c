"""`python -m gpumlp.profile --engine spread`: the model of the spread kernel (nothing in it is
measured) for the paper's nets, and how its figures follow from spread_plan's placement and the
kernel's phases (2 L - 3 grid barriers, the output layer replicated in every block)."""
import dataclasses

import pytest

from gpumlp import gpu_limits, nets, profile, spread_model, spread_plan
from gpumlp.engine_model import F32, H100_SXM
from gpumlp.spread_model import LAUNCH_START_WAITS, SECTOR, WAVEFRONT, column_walk_waits, model, partial_tile_sectors

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")   # registers come from the compile gate


def paper_net(n):
    return nets.layer_sizes(nets.PAPER_NETS[n])


@pytest.mark.parametrize("net", [1, 4, 5])
def test_every_weight_is_stored_once(net):
    sizes = paper_net(net)
    m = model(sizes)
    stored = (m["floats_in_registers"] + m["floats_in_shared"] + m["floats_in_global"] + m["output_layer_floats"]
              + m["hidden_biases"])
    assert stored == nets.count_weights(sizes)
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        kept = sum(s.register_rows[l] + s.shared_rows[l] + s.global_rows[l] for s in m["storages"])
        # a hidden layer's rows once over the grid; the output layer's in every block
        assert kept == (0 if l == len(sizes) - 2 else n_out)
        assert all(s.replicated_rows[l] == (n_out if l == len(sizes) - 2 else 0) for s in m["storages"])
    # every block's shared rows fit the capacity the launch leaves beside the scratch
    assert max(s.shared_floats(sizes) for s in m["storages"]) <= m["shared_capacity_floats"]


def test_net_4_keeps_most_of_its_weights_on_chip_and_net_1_all():
    m1, m4 = model(paper_net(1)), model(paper_net(4))
    assert m1["floats_in_global"] == 0 and m1["register_layer"] == 0
    assert m4["register_layer"] == 1 and m4["floats_in_registers"] == 2000 * 2500   # 15-16 rows per block
    # the scratch (partial tile, prefetched image, output copy) leaves less room for hidden rows
    assert 0 < m4["floats_in_global"] < 0.1 * m4["weights"]
    assert m4["dynamic_shared"] - m4["scratch_bytes"] == F32 * m4["shared_capacity_floats"]
    assert (m1["grid"], m1["blocks_per_sm"]) == (H100_SXM.sms, 1)


@pytest.mark.parametrize("net,momentum", [(1, False), (4, False), (4, True)])
def test_the_barriers_are_2l_minus_3_and_the_time_is_the_phases_plus_them(net, momentum):
    """Plain barriers after the forwards, split ones after the output phase and backward L-3 .. 1,
    none after backward 0; a split barrier costs the longer of itself and the work after its arrive."""
    sizes = paper_net(net)
    layers = len(sizes) - 1
    m = model(sizes, momentum=momentum)
    assert m["grid_syncs"] == 2 * layers - 3 == spread_plan.grid_syncs_per_image(sizes)
    # the hidden forwards, one output phase, the backward of the hidden layers below the top one
    phases = m["phases"]
    names = [p.cost.name for p in phases]
    assert len(names) == 2 * layers - 2 and names[layers - 1].startswith(f"output (forward {layers - 1}, softmax")
    assert [p.ends_with for p in phases] == (["grid barrier"] * (layers - 1) + ["split barrier"] * (layers - 2)
                                             + ["no barrier"])
    assert m["split_barriers"] == layers - 2
    assert all((p.after_arrive is None) == (p.ends_with != "split barrier") for p in phases)
    split = [p for p in phases if p.after_arrive is not None]
    expected = (sum(p.cost.seconds for p in phases) + sum(max(1e-6, p.after_arrive.cost.seconds) for p in split)
                + (layers - 1) * 1e-6)
    assert m["per_image_seconds"] == pytest.approx(expected)
    assert sum(m["parts"].values()) == pytest.approx(m["per_image_seconds"])
    assert sum(p.seconds(1e-6) for p in phases) == pytest.approx(m["per_image_seconds"])
    # every block computes the output layer on its own copy, and steps it after the arrive
    assert phases[layers - 1].blocks == m["grid"]


def test_work_after_the_arrive_adds_only_its_excess_over_the_barrier():
    """Net 1's steps after the arrive all fit in the barrier's 1 us: the time is the phases up to
    their arrive plus the barriers. Net 4 with momentum steps for longer than 1 us after every
    arrive: each adds exactly its excess, and a longer barrier hides more of it."""
    light = model(paper_net(1))
    assert all(p.after_arrive.cost.seconds < 1e-6 for p in light["phases"] if p.after_arrive)
    assert light["beyond_barrier_seconds"] == 0
    assert light["per_image_seconds"] == pytest.approx(light["compute_seconds"] + light["grid_syncs"] * 1e-6)
    heavy = model(paper_net(4), momentum=True)
    split = [p for p in heavy["phases"] if p.after_arrive]
    assert all(p.after_arrive.cost.seconds > 1e-6 for p in split)
    for p in split:
        assert p.seconds(1e-6) - p.cost.seconds - 1e-6 == pytest.approx(p.after_arrive.cost.seconds - 1e-6)
    assert heavy["beyond_barrier_seconds"] == pytest.approx(sum(p.after_arrive.cost.seconds - 1e-6 for p in split))
    assert heavy["parts"]["the work after the arrives beyond the barrier"] == heavy["beyond_barrier_seconds"]
    slow = dataclasses.replace(H100_SXM, grid_sync_seconds=2e-6)
    slower = model(paper_net(4), momentum=True, device=slow)
    hidden = sum(min(p.after_arrive.cost.seconds, 2e-6) - 1e-6 for p in split)
    assert slower["per_image_seconds"] - heavy["per_image_seconds"] == pytest.approx(
        heavy["grid_syncs"] * 1e-6 - hidden)


def test_a_layer_with_partials_reads_its_weights_once_more_before_the_arrive():
    """Net 4's backward 3 (1500 inputs, 7-8 rows per block, some in shared memory and some in
    global memory): the partial pass reads every weight where it lives and delta[r] per weight and
    writes the partial row, no x; the step pass reads x[j] once per column, delta[r] per weight,
    and reads and writes every weight."""
    sizes, blocks = paper_net(4), H100_SXM.sms
    m = model(sizes)
    backward_3 = m["phases"][6]
    assert backward_3.cost.name == "backward 3"
    n_in = sizes[3]
    columns = -(-n_in // 32)   # warp accesses of a row
    before, after = backward_3, backward_3.after_arrive
    storage = m["storages"][before.block]
    begin, end = spread_plan.block_rows(sizes, 3, before.block, blocks)
    rows, shared, global_ = end - begin, storage.shared_rows[3], storage.global_rows[3]
    assert global_ > 0 and shared > 0
    tile = SECTOR * partial_tile_sectors(sizes, 3, before.block, blocks)
    y_sectors = len({F32 * f // SECTOR for f in range(begin, end)})
    assert before.cost.global_bytes == tile + SECTOR * y_sectors + F32 * n_in + F32 * n_in + F32 * global_ * n_in
    owners = len(spread_plan.owners(sizes, 4, blocks))
    load_and_deltas = WAVEFRONT * (-(-owners * rows // 32) + 1 + columns + rows * (-(-blocks // 32) + 2))
    assert before.cost.shared_bytes == load_and_deltas + WAVEFRONT * columns * (rows + shared)
    a_storage = m["storages"][after.block]
    a_begin, a_end = spread_plan.block_rows(sizes, 3, after.block, blocks)
    a_rows = a_end - a_begin
    assert after.cost.global_bytes == 2 * F32 * a_storage.global_rows[3] * n_in
    assert after.cost.shared_bytes == WAVEFRONT * (columns * (1 + a_rows + 2 * a_storage.shared_rows[3]) + 3)
    # the register tile (layer 1, 15-16 rows of 2500 in every block): read in the
    # forward pass and the partial pass, read and written in the step pass
    assert m["bytes_in_registers"] == 4 * F32 * m["floats_in_registers"] == 80_000_000
    # net 1's register layer is layer 0: no partials, one walk, so read once forward, once read and written
    one = model(paper_net(1))
    assert one["register_layer"] == 0 and one["bytes_in_registers"] == 3 * F32 * one["floats_in_registers"]


def test_every_weight_moved_to_global_memory_crosses_l2_four_times_three_in_layer_0(monkeypatch):
    """The same kernel with the smaller shared memory per SM of sm_80 and sm_86 (less room: more
    rows in global memory, layers 4, 3, 2 first, then layer 0): the exchanges are the same, so the
    L2 bytes differ by the weights moved, 4 bytes each read forward, read by the partial pass, read
    and written by the step pass; layer 0 (no partials, one walk) 3 times."""
    sizes = paper_net(4)
    base = model(sizes)
    sm_90 = gpu_limits.arch_limits("sm_90")
    for arch in ("sm_80", "sm_86"):
        smaller = dataclasses.replace(sm_90, shared_per_sm=gpu_limits.arch_limits(arch).shared_per_sm)
        monkeypatch.setattr(spread_model, "arch_limits", lambda _arch, limits=smaller: limits)
        m = model(sizes)
        assert m["grid"] == base["grid"] and m["register_layer"] == base["register_layer"]
        layer_0 = sum(s.global_rows[0] for s in m["storages"]) * sizes[0]
        assert sum(s.global_rows[0] for s in base["storages"]) == 0
        moved = m["floats_in_global"] - base["floats_in_global"] - layer_0
        assert moved > 0
        assert m["bytes_l2"] - base["bytes_l2"] == 4 * F32 * moved + 3 * F32 * layer_0
    assert layer_0 > 0   # sm_86 moves rows of layer 0 too


def test_one_hidden_layer_arrives_after_the_deltas_and_steps_both_layers_after():
    """841-500-10: the top hidden layer is layer 0, no partials: the output phase's barrier is split,
    and the output copy's step and layer 0's step come after the arrive."""
    sizes = [841, 500, 10]
    m = model(sizes)
    assert [p.ends_with for p in m["phases"]] == ["grid barrier", "split barrier"] and m["grid_syncs"] == 2
    output = m["phases"][1]
    # before the arrive: y_0, the image, the next image, the next label and the sample after it (and
    # block 0's logits, two sectors); no partial row, no weight of layer 0 read
    logits = 2 * SECTOR if output.block == 0 else 0
    assert output.cost.global_bytes == F32 * (500 + 841 + 841) + 2 * SECTOR + logits
    assert output.register_bytes == 0 and output.walk_waits == 0
    # after it: the copy's step (10 x 501) and layer 0's (its 3-4 rows in the register tile, and biases)
    after = output.after_arrive
    register_rows = m["storages"][after.block].register_rows[0]
    assert m["register_layer"] == 0 and register_rows in (3, 4)
    assert after.register_bytes == 2 * F32 * register_rows * 841 and after.cost.global_bytes == 0
    assert after.cost.flops == 3 * 10 * 501 + 3 * register_rows * 842


def test_forward_0_of_a_launchs_later_images_waits_on_nothing():
    """The image, its sample, label and next sample are prefetched by the previous image's backward 0,
    and the biases are in the scratch: forward 0 of net 4 (no register or global rows in layer 0)
    waits on L2 for nothing and writes only y (a sector per row). A launch's first image waits for
    the cursor, its sample and its label in a row at the launch start, then loads its image."""
    m = model(paper_net(4))
    forward_0, first = m["phases"][0], m["first_image_phase"]
    assert forward_0.cost.name == "forward 0" and forward_0.round_trips == 0
    assert forward_0.cost.global_bytes == SECTOR * forward_0.cost.rows
    assert first.round_trips == LAUNCH_START_WAITS + 1 == 4
    assert first.cost.global_bytes == forward_0.cost.global_bytes + F32 * 841 + SECTOR * LAUNCH_START_WAITS
    assert first.cost.seconds > forward_0.cost.seconds
    assert m["first_image_extra_seconds"] == pytest.approx(first.cost.seconds - forward_0.cost.seconds)
    # net 1's layer 0 is the register layer: its biases are in the scratch, no wait after the reduction
    assert model(paper_net(1))["phases"][0].round_trips == 0


def test_the_output_phase_and_the_updates_wait_only_for_their_load_pass():
    """Block 0's loss and error totals are in its shared memory and the biases' steps are taken in
    the scratch: a phase with no global rows waits on L2 once, whichever block is the slowest."""
    m = model(paper_net(1))   # every weight on chip
    assert [p.round_trips for p in m["phases"]] == [0, 1, 1, 1]
    heavy = model(paper_net(1), momentum=True)
    assert [p.round_trips for p in heavy["phases"]] == [0, 1, 1, 1]


def test_the_partial_tile_is_every_owners_segment_in_32_byte_sectors():
    sizes, blocks = paper_net(4), H100_SXM.sms
    m = model(sizes)
    for phase in m["phases"][6:]:   # backward 3 .. 0 (after 5 forwards and the output phase)
        l = int(phase.cost.name.split()[1])
        begin, end = spread_plan.block_rows(sizes, l, phase.block, blocks)
        start = sum(blocks * n_in for n_in in sizes[1:l + 1])   # the partial buffers of layers 1..l come first
        sectors = 0
        for owner in spread_plan.owners(sizes, l + 1, blocks):
            first = start + owner * sizes[l + 1] + begin
            sectors += len({F32 * f // SECTOR for f in range(first, first + end - begin)})
        assert phase.partial_tile_bytes == SECTOR * sectors == SECTOR * partial_tile_sectors(sizes, l, phase.block,
                                                                                              blocks)
        # a segment of r rows takes ceil(4 r / 32) or one more sectors, never a sector per row
        rows = end - begin
        assert sectors <= len(spread_plan.owners(sizes, l + 1, blocks)) * (-(-F32 * rows // SECTOR) + 1) < 132 * rows


def test_a_columns_walk_waits_once_per_group_of_4_memory_rows_holding_a_global_row():
    """memory_column_update: shared rows then global rows, in groups of 4 loaded together."""
    assert column_walk_waits(0, 8, 0, False) == 0            # all in shared memory
    assert column_walk_waits(0, 5, 3, False) == 1            # groups [s s s s] [s g g g]
    assert column_walk_waits(0, 3, 6, False) == 3            # [s s s g] [g g g g] [g]
    assert column_walk_waits(16, 0, 0, False) == 0           # the register tile alone, no velocities
    # with momentum every group waits for its velocities, and every register row for its own
    assert column_walk_waits(0, 8, 0, True) == 2
    assert column_walk_waits(16, 2, 3, True) == 16 + 2


def test_the_column_walks_serial_l2_waits_are_the_global_groups_and_with_momentum_every_group_and_register_row():
    """Not in the cost, printed beside it: a thread's ceil(n_in / 256) columns, each down its rows."""
    sizes, blocks = paper_net(1), H100_SXM.sms
    assert all(p.walk_waits == 0 for p in model(sizes)["phases"])   # net 1: no row in global memory
    heavy = model(sizes, momentum=True)
    backward_0 = heavy["phases"][-1]
    assert backward_0.cost.name == "backward 0"
    # layer 0 is net 1's register layer (every row in the tile): one wait per row, 841 columns: 4 per thread
    assert backward_0.walk_waits == 4 * spread_plan.max_block_rows(sizes, 0, blocks)
    # net 4, the output phase (layer 4: 1000 inputs, 3-4 rows per block, some in global memory): one
    # group of memory rows per column, 4 columns per thread
    output = model(paper_net(4))["phases"][5]
    assert output.cost.name.startswith("output") and output.walk_waits == 4
    # the partial pass (above) and the step pass after the arrive walk the same groups
    assert output.after_arrive.walk_waits == 4
    # with momentum the step pass waits on every group's velocities, the partial pass only on its global rows
    heavy_output = model(paper_net(4), momentum=True)["phases"][5]
    assert heavy_output.walk_waits == 4 and heavy_output.after_arrive.walk_waits == 4   # 4 rows or fewer: 1 group
    assert heavy["walk_wait_seconds"] == pytest.approx(
        sum(p.walk_waits + (p.after_arrive.walk_waits if p.after_arrive else 0) for p in heavy["phases"]) * 0.3e-6)


def test_more_l2_bandwidth_never_slows_it():
    for net in (1, 4, 5):
        sizes = paper_net(net)
        faster = dataclasses.replace(H100_SXM, l2_bandwidth=2 * H100_SXM.l2_bandwidth,
                                     l2_bandwidth_per_sm=2 * H100_SXM.l2_bandwidth_per_sm)
        assert model(sizes, device=faster)["per_image_seconds"] <= model(sizes)["per_image_seconds"]


def test_momentum_keeps_the_output_velocities_in_shared_memory_and_the_hidden_ones_in_global():
    sizes = paper_net(1)
    plain, heavy = model(sizes), model(sizes, momentum=True)
    moved = heavy["bytes_l2"] + heavy["bytes_hbm"] - plain["bytes_l2"] - plain["bytes_hbm"]
    hidden_weights = nets.count_weights(sizes) - plain["output_layer_floats"] - plain["hidden_biases"]
    assert moved == 2 * F32 * hidden_weights   # the biases' velocities are in the scratch
    assert heavy["bytes_on_chip"] > plain["bytes_on_chip"]   # the copy's velocities read and written there
    assert heavy["output_copy_floats"] == 2 * plain["output_copy_floats"]
    assert heavy["per_image_seconds"] > plain["per_image_seconds"]
    assert heavy["floats_in_registers"] == plain["floats_in_registers"]   # velocities take no room in registers


@pytest.mark.parametrize("net,syncs,split", [(1, 3, 1), (4, 9, 4)])
def test_the_command_prints_the_table(capsys, net, syncs, split):
    assert profile.main(["--net", str(net), "--engine", "spread", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert f"| grid-wide syncs | {syncs} (" in out
    for line in ("weights in", "bytes from L2", "bytes from HBM", "expected time"):
        assert f"| {line} |" in out
    assert "replicated in every block's shared memory" in out and "storage per block (train_spread): " in out
    assert "registers/thread" in out and "block/SM resident" in out and "bound by" in out
    # per phase, up to the arrive and after it, and how much of the barrier the steps used
    assert "| ends with | us with its barrier |" in out and "| of the barrier used | beyond the barrier, us |" in out
    assert out.count("| split barrier |") == split and "split barriers: " in out
    assert "the work after the arrives beyond the barrier" in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("the persistent engine's model, same net: ") and "persistent / spread = " in last


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "8"], "error: --engine spread trains online: --batch-size must be 1"),
    (["--hidden", *["10"] * 12], "error: the spread engine cannot train 841-" + "10-" * 12
     + "10: it takes at most 12 layers, the net has 13"),
    (["--hidden", "100000"], "error: the spread engine cannot train 841-100000-10 on sm_90: every block keeps a "
                             "copy of the output layer (10 x 100000, 3,906.3 KiB"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        profile.main(["--engine", "spread", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
