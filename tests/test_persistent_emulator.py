"""Cooperative launches on the emulator: every block resident at once, this_grid().sync() a barrier
of the whole grid, a barrier some blocks never reach a deadlock error, and a grid too large to be
resident refused by the occupancy rule of the nominal device; the strict emulator's checks
(launch limits, memcheck also for arrays reached through addresses, flush-to-zero, block orders)
apply to cooperative launches too."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpumlp.emulator import EmulatorError, guarded_empty, load_module
from gpumlp.emulator.cooperative import NOMINAL_DEVICE, resident_block_limit

SOURCE = Path(__file__).resolve().parent / "kernels" / "cooperative" / "grid_exchange.cu"
ORDERS = [("launch", 0), ("reverse", 0), ("random", 1), ("random", 2)]


@pytest.fixture(scope="module")
def grid_kernels():
    return load_module(SOURCE, poison_shared=True)


def exchange(module, blocks, synchronise, order, seed):
    values = np.full(blocks, np.nan, np.float32)   # poisoned: a read before the write shows as NaN
    out = np.zeros(blocks, np.float32)
    module.block_order, module.block_order_seed = order, seed
    try:
        module.get_function("neighbour_exchange").launch_cooperative(blocks, 32, (values, out, np.int32(synchronise)))
    finally:
        module.block_order = "launch"
    return out


@pytest.mark.parametrize("order,seed", ORDERS)
def test_grid_sync_orders_every_write_before_every_read(grid_kernels, order, seed):
    blocks = 7
    expected = 1.0 + (np.arange(blocks, dtype=np.float32) + 1) % blocks
    np.testing.assert_array_equal(exchange(grid_kernels, blocks, 1, order, seed), expected)


def test_a_missing_grid_sync_is_caught_in_every_block_order(grid_kernels):
    blocks = 7
    expected = 1.0 + (np.arange(blocks, dtype=np.float32) + 1) % blocks
    for order, seed in ORDERS:
        out = exchange(grid_kernels, blocks, 0, order, seed)
        assert not np.array_equal(out, expected), (order, seed, out)


def test_shared_memory_of_each_block_survives_the_grid_barrier(grid_kernels):
    blocks, threads = 5, 64
    out = np.zeros(blocks * threads, np.int32)
    grid_kernels.block_order, grid_kernels.block_order_seed = "random", 3
    try:
        grid_kernels.get_function("shared_survives_grid_sync").launch_cooperative(blocks, threads, (out, np.int32(3)))
    finally:
        grid_kernels.block_order = "launch"
    expected = (np.arange(blocks)[:, None] * 1000 + np.arange(threads)[None, :]).ravel()
    np.testing.assert_array_equal(out, expected)

@pytest.mark.parametrize("rounds", [0, 1, 4])
def test_grid_barriers_counts_the_barriers_of_the_last_launch(grid_kernels, rounds):
    """Kernel.grid_barriers: each grid barrier the whole grid passes counts once, not once per block."""
    kernel = grid_kernels.get_function("shared_survives_grid_sync")
    kernel.launch_cooperative(5, 64, (np.zeros(5 * 64, np.int32), np.int32(rounds)))
    assert kernel.grid_barriers == rounds


def test_a_grid_barrier_some_blocks_never_reach_is_a_deadlock_error(grid_kernels):
    out = np.zeros(4, np.int32)
    with pytest.raises(EmulatorError, match=r"deadlock at the grid barrier \(this_grid\(\)\.sync\(\) on line 36\): "
                                            r"blocks 0, 2 wait but threads of blocks 1, 3 have exited"):
        grid_kernels.get_function("odd_blocks_skip_the_grid_sync").launch_cooperative(4, 32, (out,))


def test_a_block_split_between_block_and_grid_barrier_is_a_deadlock_error(grid_kernels):
    out = np.zeros(2, np.int32)
    with pytest.raises(EmulatorError, match=r"deadlock in block \(0,0,0\): threads 0-15 wait at __syncthreads on "
                                            r"line 44; threads 16-31 wait at this_grid\(\)\.sync\(\)"):
        grid_kernels.get_function("block_and_grid_barrier_mixed").launch_cooperative(2, 32, (out,))


def test_grid_sync_outside_a_cooperative_launch_is_refused(grid_kernels):
    values, out = np.zeros(2, np.float32), np.zeros(2, np.float32)
    with pytest.raises(EmulatorError, match="not cooperative"):
        grid_kernels.get_function("neighbour_exchange")(2, 32, (values, out, np.int32(1)))


def test_a_grid_too_large_to_be_resident_is_refused(grid_kernels):
    kernel = grid_kernels.get_function("neighbour_exchange")
    # sm_90: 32 resident blocks of one warp per SM; 100 KB of shared memory leaves room for 2.
    assert resident_block_limit(32, 0, 0) == 32 * NOMINAL_DEVICE.sm_count
    limit = resident_block_limit(32, 0, 100 * 1024)
    assert limit == 2 * NOMINAL_DEVICE.sm_count
    values, out = np.zeros(limit + 1, np.float32), np.zeros(limit + 1, np.float32)
    kernel.max_dynamic_shared_size_bytes = 100 * 1024
    with pytest.raises(EmulatorError, match=rf"cooperative launch of {limit + 1} blocks is too large: at most "
                                            rf"{limit} blocks"):
        kernel.launch_cooperative(limit + 1, 32, (values, out, np.int32(1)), shared_mem=100 * 1024)


def test_more_than_48_kib_of_shared_memory_needs_the_opt_in_as_on_a_gpu():
    kernel = load_module(SOURCE).get_function("neighbour_exchange")
    values, out = np.zeros(2, np.float32), np.zeros(2, np.float32)
    with pytest.raises(EmulatorError, match="invalid launch: 50000 bytes of dynamic shared memory"):
        kernel.launch_cooperative(2, 32, (values, out, np.int32(1)), shared_mem=50_000)
    kernel.max_dynamic_shared_size_bytes = 50_000
    kernel.launch_cooperative(2, 32, (values, out, np.int32(1)), shared_mem=50_000)
    np.testing.assert_array_equal(out, [2.0, 1.0])


def table_of(array):
    return np.array([array.ctypes.data], np.uint64)


@pytest.mark.parametrize("index", [3, -1], ids=["past-the-end", "before-the-start"])
def test_memcheck_catches_a_write_through_an_address_outside_its_guarded_array(grid_kernels, index):
    """The array is reached through a table of addresses, not as an argument: past its end the
    guard page faults, just before its start the canary is found changed after the launch."""
    values, out = guarded_empty(3), np.zeros(1, np.float32)
    kernel = grid_kernels.get_function("write_through_table")
    kernel.launch_cooperative(1, 32, (table_of(values), np.int32(2), out), indirect=[values])
    assert out[0] == 2.0 and values[2] == 2.0
    with pytest.raises(EmulatorError, match=rf"out-of-bounds write at byte offset {4 * index} of a guarded array "
                                            r"of 12 bytes that is not an argument"):
        kernel.launch_cooperative(1, 32, (table_of(values), np.int32(index), out), indirect=[values])


def test_memcheck_refuses_an_indirect_array_it_cannot_guard(grid_kernels):
    values, out = np.zeros(3, np.float32), np.zeros(1, np.float32)
    with pytest.raises(EmulatorError, match="indirect array 0 .* is not a guarded array"):
        grid_kernels.get_function("write_through_table").launch_cooperative(
            1, 32, (table_of(values), np.int32(0), out), indirect=[values])


def test_comparing_block_orders_covers_the_indirect_arrays():
    """Every block writes one indirect element: equal in all orders. Without the grid barrier
    each block's write to values races its neighbour's read, which the comparison reports."""
    module = load_module(SOURCE, compare_block_orders=True)
    values, out = guarded_empty(4), np.zeros(4, np.float32)
    module.get_function("write_through_table").launch_cooperative(4, 32, (table_of(values), np.int32(0), out),
                                                                  indirect=[values])
    np.testing.assert_array_equal(values, [2.0] * 4)
    with pytest.raises(EmulatorError, match="argument 'out' differs between launch and reverse block order"):
        module.get_function("neighbour_exchange").launch_cooperative(4, 32, (guarded_empty(4), out, np.int32(0)))


@pytest.mark.parametrize("flush", [True, False])
def test_flush_to_zero_holds_in_a_cooperative_launch(flush):
    tiny = np.finfo(np.float32).tiny   # the smallest normal float: its half is subnormal
    out = np.ones(2, np.float32)
    load_module(SOURCE, flush_to_zero=flush).get_function("halve_after_grid_sync").launch_cooperative(
        2, 32, (np.full(2, tiny, np.float32), out))
    np.testing.assert_array_equal(out, 0.0 if flush else tiny / 2)


@pytest.mark.parametrize("path", [SOURCE, SOURCE.with_name("split_barrier.cu")], ids=lambda path: path.name)
def test_the_grid_kernels_are_valid_cuda_for_nvrtc(path):
    """With the toolkit's headers, where this machine has them (bare NVRTC has no
    <cooperative_groups.h>)."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_PATH"), nvcc and Path(nvcc).resolve().parent.parent, "/usr/local/cuda"]
    include = next((Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cooperative_groups.h").is_file()), None)
    if include is None:
        pytest.skip("no CUDA toolkit headers on this machine")
    program = nvrtc.createProgram(path.read_text(), path.name, [], [])
    try:
        # CUDA 13 keeps libcu++ (cuda/std/...), which the header includes, under include/cccl.
        nvrtc.compileProgram(program, ["-arch=sm_75", "-std=c++17", f"-I{include}", f"-I{include / 'cccl'}"])
    except nvrtc.NVRTCError as error:
        pytest.fail(f"NVRTC: {error}\n{nvrtc.getProgramLog(program)}")


def test_the_emulator_caps_a_cooperative_grid_at_the_threads_it_runs():
    from gpumlp.device import EmulatedDevice
    from gpumlp.emulator.cooperative import MAX_THREADS
    device = EmulatedDevice()
    kernel = device.kernel("mlp_persistent.cu", "train_online_persistent")
    assert device.resident_blocks(kernel, 256, 0) == MAX_THREADS // 256
    out = np.zeros(MAX_THREADS // 32 + 1, np.float32)
    module = load_module(SOURCE)
    with pytest.raises(EmulatorError, match=rf"the emulator runs at most {MAX_THREADS} threads"):
        module.get_function("neighbour_exchange").launch_cooperative(len(out), 32, (out, out.copy(), np.int32(1)))
