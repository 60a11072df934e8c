"""Cooperative launches on the emulator: every block resident at once, this_grid().sync() a barrier
of the whole grid, a barrier some blocks never reach a deadlock error, and a grid too large to be
resident refused by the occupancy rule of the nominal device."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpumlp.emulator import EmulatorError, load_module
from gpumlp.emulator.cooperative import NOMINAL_DEVICE, resident_block_limit

SOURCE = Path(__file__).resolve().parent / "kernels" / "cooperative" / "grid_exchange.cu"
ORDERS = [("launch", 0), ("reversed", 0), ("shuffled", 1), ("shuffled", 2)]


@pytest.fixture(scope="module")
def grid_kernels():
    return load_module(SOURCE, poison_shared=True)


def exchange(module, blocks, synchronise, order, seed):
    values = np.full(blocks, np.nan, np.float32)   # poisoned: a read before the write shows as NaN
    out = np.zeros(blocks, np.float32)
    module.get_function("neighbour_exchange").launch_cooperative(
        blocks, 32, (values, out, np.int32(synchronise)), block_order=order, seed=seed)
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
    grid_kernels.get_function("shared_survives_grid_sync").launch_cooperative(
        blocks, threads, (out, np.int32(3)), block_order="shuffled", seed=3)
    expected = (np.arange(blocks)[:, None] * 1000 + np.arange(threads)[None, :]).ravel()
    np.testing.assert_array_equal(out, expected)


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
    with pytest.raises(EmulatorError, match=rf"cooperative launch of {limit + 1} blocks is too large: at most "
                                            rf"{limit} blocks"):
        kernel.launch_cooperative(limit + 1, 32, (values, out, np.int32(1)), shared_mem=100 * 1024)


def test_the_grid_kernels_are_valid_cuda_for_nvrtc():
    """With the toolkit's headers, where this machine has them (bare NVRTC has no
    <cooperative_groups.h>)."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_PATH"), nvcc and Path(nvcc).resolve().parent.parent, "/usr/local/cuda"]
    include = next((Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cooperative_groups.h").is_file()), None)
    if include is None:
        pytest.skip("no CUDA toolkit headers on this machine")
    program = nvrtc.createProgram(SOURCE.read_text(), SOURCE.name, [], [])
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
