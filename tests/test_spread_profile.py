"""`python -m gpumlp.profile --engine spread`: the model of the spread kernel (nothing in it is
measured) for the paper's nets, and how its figures follow from spread_plan's placement."""
import dataclasses

import pytest

from gpumlp import nets, profile
from gpumlp.engine_model import F32, H100_SXM
from gpumlp.spread_model import model

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")   # registers come from the compile gate


def paper_net(n):
    return nets.layer_sizes(nets.PAPER_NETS[n])


@pytest.mark.parametrize("net", [1, 4, 5])
def test_every_weight_is_stored_once(net):
    sizes = paper_net(net)
    m = model(sizes)
    stored = m["floats_in_registers"] + m["floats_in_shared"] + m["floats_in_global"] + m["biases"]
    assert stored == nets.count_weights(sizes)
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        assert sum(s.register_rows[l] + s.shared_rows[l] + s.global_rows[l] for s in m["storages"]) == n_out
    # every block's shared rows fit the capacity the launch leaves beside the scratch
    assert max(s.shared_floats(sizes) for s in m["storages"]) <= m["shared_capacity_floats"]


def test_net_4_keeps_nearly_all_its_weights_on_chip_and_net_1_all():
    m1, m4 = model(paper_net(1)), model(paper_net(4))
    assert m1["floats_in_global"] == 0 and m1["register_layer"] == 0
    assert m4["register_layer"] == 1 and m4["floats_in_registers"] == 2000 * 2500   # 15-16 rows per block
    assert 0 < m4["floats_in_global"] < 0.01 * m4["weights"]
    assert (m1["grid"], m1["blocks_per_sm"]) == (H100_SXM.sms, 1)


def test_the_time_is_the_phases_plus_the_barriers():
    m = model(paper_net(4))
    assert m["grid_syncs"] == 10 and len(m["phases"]) == 2 * 6 + 1   # forward, softmax, backward
    assert m["per_image_seconds"] == pytest.approx(sum(p.cost.seconds for p in m["phases"]) + 10e-6)
    assert sum(m["parts"].values()) == pytest.approx(m["per_image_seconds"])
    # the output layer, its softmax and backward pass run on block 0 alone
    assert [p.blocks for p in m["phases"] if p.cost.name in ("forward 5", "softmax", "backward 5")] == [1, 1, 1]


def test_more_l2_bandwidth_never_slows_it():
    for net in (1, 4, 5):
        sizes = paper_net(net)
        faster = dataclasses.replace(H100_SXM, l2_bandwidth=2 * H100_SXM.l2_bandwidth,
                                     l2_bandwidth_per_sm=2 * H100_SXM.l2_bandwidth_per_sm)
        assert model(sizes, device=faster)["per_image_seconds"] <= model(sizes)["per_image_seconds"]


def test_momentum_reads_and_writes_every_velocity_in_global_memory():
    sizes = paper_net(1)
    plain, heavy = model(sizes), model(sizes, momentum=True)
    moved = heavy["bytes_l2"] + heavy["bytes_hbm"] - plain["bytes_l2"] - plain["bytes_hbm"]
    assert moved == 2 * F32 * nets.count_weights(sizes)
    assert heavy["per_image_seconds"] > plain["per_image_seconds"]
    assert heavy["floats_in_registers"] == plain["floats_in_registers"]   # velocities take no room on chip


@pytest.mark.parametrize("net,syncs", [(1, 4), (4, 10)])
def test_the_command_prints_the_table(capsys, net, syncs):
    assert profile.main(["--net", str(net), "--engine", "spread", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert f"| grid-wide syncs | {syncs} (" in out
    for line in ("weights in", "bytes from L2", "bytes from HBM", "expected time"):
        assert f"| {line} |" in out
    assert "registers/thread" in out and "block/SM resident" in out and "bound by" in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("the persistent engine's model, same net: ") and "persistent / spread = " in last


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "8"], "error: --engine spread trains online: --batch-size must be 1"),
    (["--hidden", *["10"] * 12], "error: the spread engine cannot train 841-" + "10-" * 12
     + "10: it takes at most 12 layers, the net has 13"),
    (["--hidden", "100000"], "error: the spread engine cannot train 841-100000-10: its 403,544 bytes of shared"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        profile.main(["--engine", "spread", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
