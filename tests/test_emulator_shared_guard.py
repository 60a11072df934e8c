"""memcheck guards a launch's dynamic shared memory: the whole pages past the `shared_mem` bytes a
launch gives are PROT_NONE (an access faults at once and is named with its byte offset, block and
thread), and the bytes between `shared_mem` and that page boundary hold a fill pattern checked after
each block ran (a write there is found then; a read there sees the canary, or NaN bytes with
poison_shared). The same in a cooperative launch, whose blocks swap only `shared_mem` bytes of
their shared memory at a grid barrier: there an overrun without memcheck silently hands one
block's data to another. The buffer is page-aligned, so these tests know where the pages begin."""
import dataclasses
import os

import numpy as np
import pytest

from gpumlp import nets
from gpumlp.config import TrainConfig
from gpumlp.device import EmulatedDevice
from gpumlp.emulator import EmulatorError, load_module_source
from gpumlp.train_spread import SpreadTrainer
from gpumlp.training import epoch_order, make_split

PAGE = os.sysconf("SC_PAGESIZE")
pytestmark = pytest.mark.skipif(PAGE != 4096, reason="the offsets below assume 4 KiB pages")

SOURCE = r"""
#include <cooperative_groups.h>

// Thread 0 of each block writes element `write_index` of the dynamic shared memory (float s[]),
// then reads element `read_index` into out[blockIdx.x]; a negative index skips the access.
extern "C" __global__ void touch(float* out, int write_index, int read_index) {
    extern __shared__ float s[];
    if (threadIdx.x == 0) {
        if (write_index >= 0) s[write_index] = 1.0f;
        if (read_index >= 0) out[blockIdx.x] = s[read_index];
    }
}

// Each thread writes its element of s (blockDim.x,) with the block's index, thread 0 also element
// `extra` (when not negative); after a grid barrier each reads them back into its block's row of
// out (gridDim.x, blockDim.x + 1): a block must find its own values there.
extern "C" __global__ void keep_across_grid_barrier(float* out, int extra) {
    extern __shared__ float s[];
    const int row = blockIdx.x * (blockDim.x + 1);
    s[threadIdx.x] = blockIdx.x;
    if (threadIdx.x == 0 && extra >= 0) s[extra] = blockIdx.x;
    cooperative_groups::this_grid().sync();
    out[row + threadIdx.x] = s[threadIdx.x];
    if (threadIdx.x == 0 && extra >= 0) out[row + blockDim.x] = s[extra];
}

// Writes all n floats of s (n,), then copies them out reversed into the block's row of out
// (gridDim.x, n): with shared_mem = 4 n bytes every access is in bounds, up to the last byte.
extern "C" __global__ void fill_and_reverse(float* out, int n) {
    extern __shared__ float s[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = (float)(i + 1000 * blockIdx.x);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[blockIdx.x * n + i] = s[n - 1 - i];
}

// Declares dynamic shared memory but uses only its static shared st (32,); out is (32,).
extern "C" __global__ void static_only(float* out) {
    extern __shared__ float s[];
    __shared__ float st[32];
    st[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = st[31 - threadIdx.x];
}
"""

CANARY_BITS, POISON_BITS = 0xA5A5A5A5, 0xFFFFFFFF


@pytest.fixture(scope="module")
def guard():
    return load_module_source(SOURCE, name="shared_guard")


@pytest.fixture
def checks(guard):
    """Restores the module's checks after a test changes them."""
    yield guard
    guard.memcheck, guard.poison_shared = True, False


def overrun(verb: str, shared_bytes: int, offset: int) -> str:
    return (rf"kernel 'touch' \(module shared_guard\): {verb} past the {shared_bytes:,} bytes of dynamic shared "
            rf"memory the launch gives \(byte offset {offset:,} of the dynamic shared memory\) \(memcheck\)")


def touch(guard, write_index=-1, read_index=-1, shared_mem=1024, blocks=2):
    out = np.zeros(blocks, np.float32)
    guard.get_function("touch")(blocks, 32, (out, np.int32(write_index), np.int32(read_index)), shared_mem=shared_mem)
    return out


def test_a_write_past_the_end_in_the_pages_tail_is_found_after_the_block(guard):
    """1,028 lies on the page of the 1,024 bytes: the fill pattern there shows the write."""
    with pytest.raises(EmulatorError, match=overrun("wrote", 1024, 1028) + r" in block \(0,0,0\) \(found after "
                                                                           r"the block ran"):
        touch(guard, write_index=257)


@pytest.mark.parametrize("verb, index", [("wrote", PAGE // 4), ("read", PAGE // 4 + 3), ("wrote", 5 * PAGE)])
def test_a_write_or_read_past_the_page_faults_at_once_naming_the_thread(guard, verb, index):
    access = dict(write_index=index) if verb == "wrote" else dict(read_index=index)
    with pytest.raises(EmulatorError, match=overrun(verb, 1024, 4 * index) + r" in block \(0,0,0\), thread \(0,0,0\)"):
        touch(guard, **access)


def test_a_read_of_the_pages_tail_sees_the_canary_or_poison(checks):
    """A read between the launch's size and the page boundary cannot fault; it reads the fill
    pattern: the canary, or with poison_shared NaN bytes like the rest of the shared memory."""
    assert (touch(checks, read_index=256).view(np.uint32) == CANARY_BITS).all()
    checks.poison_shared = True
    assert (touch(checks, read_index=PAGE // 4 - 1).view(np.uint32) == POISON_BITS).all()


@pytest.mark.parametrize("n", [300, PAGE // 4, 3 * PAGE // 4 + 5],
                         ids=["inside-a-page", "one-page", "three-pages-and-a-bit"])
def test_every_byte_up_to_the_end_is_usable(guard, n):
    out = np.zeros((3, n), np.float32)
    guard.get_function("fill_and_reverse")(3, 128, (out, np.int32(n)), shared_mem=4 * n)
    expected = np.arange(n, dtype=np.float32)[::-1] + 1000 * np.arange(3, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(out, expected)


def test_the_guard_follows_the_size_from_launch_to_launch(guard):
    """The protection is kept between launches and moved when a launch's size crosses a page."""
    kernel = guard.get_function("fill_and_reverse")
    for n in [PAGE, 16, 11 * PAGE // 4, 0, PAGE // 4]:
        out = np.zeros(n, np.float32)
        kernel(1, 128, (out, np.int32(n)), shared_mem=4 * n)
        np.testing.assert_array_equal(out, np.arange(n, dtype=np.float32)[::-1])
        touch(guard, write_index=n - 1 if n else -1, shared_mem=4 * n)   # in bounds
    with pytest.raises(EmulatorError, match=overrun("wrote", 4 * PAGE, 4 * PAGE)):
        touch(guard, write_index=PAGE, shared_mem=4 * PAGE)


def test_shared_mem_0_allows_no_dynamic_access_and_kernels_that_make_none(guard):
    out = np.zeros(32, np.float32)
    guard.get_function("static_only")(2, 32, (out,))
    np.testing.assert_array_equal(out, np.arange(32, dtype=np.float32)[::-1])
    with pytest.raises(EmulatorError, match=overrun("read", 0, 0)):
        touch(guard, read_index=0, shared_mem=0)
    with pytest.raises(EmulatorError, match=overrun("wrote", 0, 4)):
        touch(guard, write_index=1, shared_mem=0)


def keep(guard, blocks, threads, extra, shared_mem):
    out = np.zeros((blocks, threads + 1), np.float32)
    guard.get_function("keep_across_grid_barrier").launch_cooperative(blocks, threads, (out, np.int32(extra)),
                                                                      shared_mem=shared_mem)
    return out


@pytest.mark.parametrize("threads", [32, PAGE // 4], ids=["tail-on-the-page", "page-aligned-end"])
def test_a_cooperative_launch_keeps_each_blocks_shared_memory_up_to_the_end(guard, threads):
    out = keep(guard, 3, threads, -1, 4 * threads)
    np.testing.assert_array_equal(out[:, :threads], np.repeat(np.arange(3, dtype=np.float32), threads).reshape(3, -1))


@pytest.mark.parametrize("threads", [32, PAGE // 4], ids=["tail-on-the-page", "page-aligned-end"])
def test_a_cooperative_launch_catches_a_write_past_the_end(guard, threads):
    offset = 4 * threads
    found = r"\(found after the block ran" if threads == 32 else r"thread \(0,0,0\)"
    message = (rf"kernel 'keep_across_grid_barrier'.*wrote past the {offset:,} bytes of dynamic shared memory the "
               rf"launch gives \(byte offset {offset:,} of the dynamic shared memory\) \(memcheck\) in block "
               rf"\(0,0,0\).*{found}")
    with pytest.raises(EmulatorError, match=message):
        keep(guard, 3, threads, threads, offset)


def test_without_memcheck_the_overrun_passes_and_hands_one_blocks_data_to_another(checks):
    """What the guard is for: a cooperative launch swaps only the launch's bytes of each block's
    shared memory, so element 32 of 32 is one memory for every block; in launch order each block
    reads back the last block's write. memcheck off switches the guard off as it does the guard
    pages of array arguments."""
    checks.memcheck = False
    out = keep(checks, 3, 32, 32, 4 * 32)
    np.testing.assert_array_equal(out[:, 32], [2, 2, 2])   # own value: [0, 1, 2]
    assert (touch(checks, write_index=PAGE // 4, read_index=PAGE // 4) == 1.0).all()


@pytest.mark.parametrize("too_few", [4, 4096])
def test_the_spread_kernel_launched_with_too_little_shared_memory_is_caught(data100, too_few):
    """Today's bug, planted: the spread kernel's dynamic shared memory (scratch, then 10 rows of 841
    weights per block on 841-70-40-10 over 2 blocks) larger than the launch's size. 4 bytes too few
    land in the page's tail (found after the block), 4096 on the next page (a fault)."""
    config = TrainConfig(hidden=[70, 40], train_images=20, test_images=10, momentum=0.5, device="emulate")
    trainer = SpreadTrainer(EmulatedDevice(), nets.init_params(config.sizes, config.seed), make_split(data100, config),
                            config, lambda line: None, blocks=2, shared_weight_floats=10 * 841)
    trainer.begin_epoch(1, 0.01, epoch_order(0, 1, trainer.n_train))
    trainer.launch(1)   # as planned
    given = trainer.plan.shared_bytes - too_few
    trainer.plan = dataclasses.replace(trainer.plan, shared_bytes=given)
    with pytest.raises(EmulatorError, match=rf"kernel 'train_online_spread'.*: wrote past the {given:,} bytes of "
                                            rf"dynamic shared memory the launch gives \(byte offset \d[\d,]* of the "
                                            rf"dynamic shared memory\) \(memcheck\) in block \(0,0,0\)"):
        trainer.launch(1)
