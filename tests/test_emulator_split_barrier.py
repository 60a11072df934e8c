"""The split grid barrier on the emulator: this_grid().barrier_arrive() then barrier_wait(token),
one grid barrier that the module's split_barrier puts at the arrive ("arrive") or at the wait
("wait"). A correct kernel gives one result in both settings and every block order; a block that
publishes after its arrive is caught by "arrive", one that reads other blocks' data before its wait
by "wait"; every misuse of the pair and a split barrier some blocks never reach is an EmulatorError
naming the line (tests/kernels/cooperative/split_barrier.cu)."""
import re
from pathlib import Path

import numpy as np
import pytest

from gpumlp.emulator import EmulatorError, load_module, load_module_source

SOURCE = Path(__file__).resolve().parent / "kernels" / "cooperative" / "split_barrier.cu"
SPLIT_BARRIERS = ["arrive", "wait"]


def line_of(marker: str) -> int:
    """The line of the kernel source that holds `marker` (once)."""
    lines = [n for n, text in enumerate(SOURCE.read_text().splitlines(), 1) if marker in text]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


@pytest.fixture(scope="module")
def split_kernels():
    return load_module(SOURCE, poison_shared=True)


@pytest.fixture(params=SPLIT_BARRIERS)
def split_barrier(request, split_kernels):
    split_kernels.split_barrier = request.param
    yield request.param
    split_kernels.split_barrier = "arrive"
    split_kernels.compare_block_orders = False


def ring(module, blocks, threads, rounds):
    partial = np.full(2 * blocks, np.nan, np.float32)   # poisoned: a read before the write shows as NaN
    sums, own = np.zeros(blocks, np.float32), np.zeros(blocks * threads, np.float32)
    kernel = module.get_function("split_ring")
    kernel.launch_cooperative(blocks, threads, (partial, sums, own, np.int32(rounds)))
    return sums, own, kernel.grid_barriers


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_a_correct_split_barrier_gives_one_result_in_every_block_order(split_kernels, split_barrier, rounds):
    """compare_block_orders runs launch, reverse and random order and requires equal bits; the sums
    are exact (small integers in float32). Each arrive/wait pair counts as one grid barrier, the
    closing grid sync as one more."""
    blocks, threads = 5, 32
    split_kernels.compare_block_orders = True
    sums, own, grid_barriers = ring(split_kernels, blocks, threads, rounds)
    neighbour = (np.arange(blocks) + 1) % blocks
    expected = sum(1.0 + neighbour + 100.0 * r for r in range(rounds)) + np.zeros(blocks)
    np.testing.assert_array_equal(sums, expected.astype(np.float32))
    np.testing.assert_array_equal(own, np.full(blocks * threads, rounds, np.float32))
    assert grid_barriers == rounds + 1


def exchange(module, kernel_name, blocks=4):
    partial, out = np.full(blocks, np.nan, np.float32), np.zeros(blocks, np.float32)
    module.get_function(kernel_name).launch_cooperative(blocks, 32, (partial, out))
    return out


@pytest.mark.parametrize("kernel_name, caught_by", [("publish_after_arrive", "arrive"),
                                                    ("read_before_wait", "wait")])
def test_each_planted_bug_depends_on_the_block_order_where_its_half_is_the_barrier(split_kernels, split_barrier,
                                                                                   kernel_name, caught_by):
    """Under the other setting the bug's writes and reads fall on the same side of the barrier and
    it passes unseen: both settings are needed."""
    blocks = 4
    expected = 1.0 + (np.arange(blocks, dtype=np.float32) + 1) % blocks
    if split_barrier == caught_by:
        for order in ("launch", "reverse"):
            split_kernels.block_order = order
            try:
                out = exchange(split_kernels, kernel_name, blocks)
            finally:
                split_kernels.block_order = "launch"
            assert np.isnan(out).any() and not np.array_equal(out, expected), (order, out)
        split_kernels.compare_block_orders = True
        with pytest.raises(EmulatorError, match=rf"kernel '{kernel_name}'.*argument 'out' differs between launch "
                                                r"and reverse block order"):
            exchange(split_kernels, kernel_name, blocks)
    else:
        split_kernels.compare_block_orders = True
        np.testing.assert_array_equal(exchange(split_kernels, kernel_name, blocks), expected)


@pytest.mark.parametrize("misuse, expected", [
    (0, lambda: rf"barrier_arrive on line {line_of('// second arrive')} while its barrier_arrive on line "
                rf"{line_of('token_t first')} has no barrier_wait yet \(block \(0,0,0\), thread \(0,0,0\)\)"),
    (1, lambda: rf"barrier_wait on line {line_of('// wait without arrive')} without a barrier_arrive before it "
                r"\(block \(0,0,0\), thread \(0,0,0\)\)"),
    (2, lambda: rf"a thread exits while its barrier_arrive on line {line_of('// never waited for')} has no "
                r"barrier_wait yet"),
    (3, lambda: rf"this_grid\(\)\.sync\(\) on line {line_of('// sync while pending')} while its barrier_arrive on "
                rf"line {line_of('// arrive before sync')} has no barrier_wait yet"),
], ids=["arrive-twice", "wait-without-arrive", "exit-with-arrive-pending", "sync-with-arrive-pending"])
def test_a_misused_pair_is_an_error_naming_the_lines(split_kernels, split_barrier, misuse, expected):
    out = np.zeros(3, np.float32)
    with pytest.raises(EmulatorError, match=rf"kernel 'split_barrier_misuse'.*{expected()}"):
        split_kernels.get_function("split_barrier_misuse").launch_cooperative(3, 32, (out, np.int32(misuse)))


def test_a_split_barrier_outside_a_cooperative_launch_is_refused(split_kernels, split_barrier):
    partial, sums, own = np.zeros(4, np.float32), np.zeros(2, np.float32), np.zeros(64, np.float32)
    with pytest.raises(EmulatorError, match=rf"barrier_arrive on line {line_of('// ring arrive')} in a launch "
                                            r"that is not cooperative"):
        split_kernels.get_function("split_ring")(2, 32, (partial, sums, own, np.int32(1)))


def test_a_split_barrier_some_blocks_never_reach_is_a_deadlock_error(split_kernels, split_barrier):
    line = line_of(f"// even {split_barrier}")
    kernel = split_kernels.get_function("odd_blocks_skip_the_split_barrier")
    with pytest.raises(EmulatorError, match=rf"deadlock at the grid barrier \(barrier_{split_barrier} on line {line}\): "
                                            r"blocks 0, 2 wait but threads of blocks 1, 3 have exited"):
        kernel.launch_cooperative(4, 32, (np.zeros(4, np.float32),))


def test_blocks_at_a_grid_sync_and_at_a_split_barrier_are_a_deadlock_error(split_kernels, split_barrier):
    sync, split = line_of("// even sync"), line_of("// odd split")
    with pytest.raises(EmulatorError, match=re.escape(
            f"blocks 0-3 wait at different grid barriers (blocks 0, 2 at this_grid().sync() on line {sync}; "
            f"blocks 1, 3 at barrier_{split_barrier} on line {split})")):
        split_kernels.get_function("sync_and_split_barrier_mixed").launch_cooperative(4, 32, (np.zeros(4, np.float32),))


def test_a_block_split_between_a_block_barrier_and_a_split_barrier_is_a_deadlock_error(split_kernels, split_barrier):
    """Under "wait" the arrive is the block barrier CUDA's barrier_arrive includes: the threads
    then wait at two different block barriers."""
    low, high = line_of("// low half"), line_of("// high half")
    with pytest.raises(EmulatorError, match=rf"deadlock in block \(0,0,0\).*threads 0-15 wait at __syncthreads on line "
                                            rf"{low}; threads 16-31 wait at barrier_arrive on line {high}"):
        split_kernels.get_function("block_barrier_and_split_barrier_mixed").launch_cooperative(
            2, 32, (np.zeros(2, np.float32),))


def test_the_token_may_be_moved_with_std_move(split_barrier):
    """The spelling of CUDA's own example; <utility> comes with the emulator's header."""
    source = ("#include <cooperative_groups.h>\n"
              "extern \"C\" __global__ void moved(float* values, float* out) {\n"
              "    auto grid = cooperative_groups::this_grid();\n"
              "    values[blockIdx.x] = 1.0f + blockIdx.x;\n"
              "    auto token = grid.barrier_arrive();\n"
              "    grid.barrier_wait(std::move(token));\n"
              "    out[blockIdx.x] = values[(blockIdx.x + 1) % gridDim.x];\n"
              "}\n")
    module = load_module_source(source, name="split_barrier_moved", split_barrier=split_barrier,
                                compare_block_orders=True)
    values, out = np.zeros(3, np.float32), np.zeros(3, np.float32)
    kernel = module.get_function("moved")
    kernel.launch_cooperative(3, 1, (values, out))
    np.testing.assert_array_equal(out, [2.0, 3.0, 1.0])
    assert kernel.grid_barriers == 1


def test_split_barrier_takes_only_its_two_settings(split_kernels):
    with pytest.raises(ValueError, match="split_barrier must be one of arrive, wait, got 'sync'"):
        split_kernels.split_barrier = "sync"
    assert split_kernels.split_barrier == "arrive"
