"""`python -m gpumlp.profile --engine spread`: the model of the spread kernel (nothing in it is
measured) for the paper's nets, and how its figures follow from spread_plan's placement and the
kernel's phases (2 L - 3 grid barriers, the output layer replicated in every block)."""
import dataclasses

import pytest

from gpumlp import nets, profile, spread_plan
from gpumlp.engine_model import F32, H100_SXM
from gpumlp.spread_model import LAUNCH_START_WAITS, SECTOR, column_walk_waits, model, partial_tile_sectors

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


@pytest.mark.parametrize("net", [1, 4])
def test_the_barriers_are_2l_minus_3_and_the_time_is_the_phases_plus_them(net):
    sizes = paper_net(net)
    layers = len(sizes) - 1
    m = model(sizes)
    assert m["grid_syncs"] == 2 * layers - 3 == spread_plan.grid_syncs_per_image(sizes)
    # the hidden forwards, one output phase, the backward of the hidden layers below the top one
    names = [p.cost.name for p in m["phases"]]
    assert len(names) == 2 * layers - 2 and names[layers - 1].startswith(f"output (forward {layers - 1}, softmax")
    assert m["per_image_seconds"] == pytest.approx(sum(p.cost.seconds for p in m["phases"]) + m["grid_syncs"] * 1e-6)
    assert sum(m["parts"].values()) == pytest.approx(m["per_image_seconds"])
    # every block computes the output layer on its own copy
    assert m["phases"][layers - 1].blocks == m["grid"]


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
    assert heavy["walk_wait_seconds"] == pytest.approx(sum(p.walk_waits for p in heavy["phases"]) * 0.3e-6)
    # net 4, the output phase (layer 4: 1000 inputs, 3-4 rows per block, some in global memory): one
    # group of memory rows per column, 4 columns per thread
    output = model(paper_net(4))["phases"][5]
    assert output.cost.name.startswith("output") and output.walk_waits == 4


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


@pytest.mark.parametrize("net,syncs", [(1, 3), (4, 9)])
def test_the_command_prints_the_table(capsys, net, syncs):
    assert profile.main(["--net", str(net), "--engine", "spread", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert f"| grid-wide syncs | {syncs} (" in out
    for line in ("weights in", "bytes from L2", "bytes from HBM", "expected time"):
        assert f"| {line} |" in out
    assert "replicated in every block's shared memory" in out and "storage per block (train_spread): " in out
    assert "registers/thread" in out and "block/SM resident" in out and "bound by" in out
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
