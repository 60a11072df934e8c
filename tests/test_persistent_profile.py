"""`python -m gpumlp.profile --engine persistent`: the model of the persistent kernel (nothing in
it is measured) for the paper's nets."""
import pytest

from gpumlp import nets, profile

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")   # registers come from the compile gate


def test_net_1_keeps_its_weights_on_chip_and_net_4_in_l2(capsys):
    from gpumlp.persistent_model import model
    net1, net4 = (nets.layer_sizes(nets.PAPER_NETS[n]) for n in (1, 4))
    m1, m4 = model(net1), model(net4)
    assert m1["weights_home"] == "shared memory" and m4["weights_home"] == "L2"
    # on chip, per weight: the forward read, the row's x read by its warp, the backward read and write
    assert m1["bytes_on_chip"] == 16 * sum(a * b for a, b in zip(net1[:-1], net1[1:]))
    # in L2, per weight of net 4: read forward, read and written backward (12 bytes), plus exchanges
    assert m4["bytes_l2"] > 12 * sum(a * b for a, b in zip(net4[:-1], net4[1:]))
    assert (m1["grid_syncs"], m4["grid_syncs"]) == (4, 10)
    assert m1["grid"] == 49 and m1["blocks_per_sm"] == 1   # one block per 32-row chunk
    assert m1["per_image_seconds"] == pytest.approx(m1["compute_seconds"] + 4e-6)


@pytest.mark.parametrize("net,syncs,home", [(1, 4, "shared memory"), (4, 10, "L2"), (5, 18, "L2")])
def test_the_command_prints_the_table(capsys, net, syncs, home):
    assert profile.main(["--net", str(net), "--engine", "persistent", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert f"| grid-wide syncs | {syncs} (" in out and f"weights live in {home}" in out
    for line in ("bytes from on-chip shared memory", "bytes from L2", "bytes from HBM", "expected time"):
        assert f"| {line} |" in out
    assert "registers/thread" in out and "blocks/SM resident" in out and "bound by" in out


def test_the_persistent_model_is_online_only(capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile.main(["--net", "1", "--engine", "persistent", "--batch-size", "8"])
    assert exit_info.value.code == 2
    assert "error: --engine persistent trains online" in capsys.readouterr().err
