"""The CPU emulator runs unchanged CUDA text with real barrier, warp and shared-memory semantics,
finds races, and turns deadlocks and crashes into exceptions; its sanitizer checks (memcheck,
initcheck, block orders, launch limits, flush-to-zero) each catch a planted bug of
tests/kernels/sanitizer_bugs.cu that passes unseen without them."""
from pathlib import Path

import numpy as np
import pytest

from gpumlp.device import KernelArgumentError
from gpumlp.emulator import EmulatorError, benchmark, load_module, load_module_source

KERNELS = Path(__file__).resolve().parent / "kernels"
RACE_CHECKS = [dict(poison_shared=False, reverse_threads=False), dict(poison_shared=True, reverse_threads=True),
               dict(poison_shared=True, reverse_threads=False)]


@pytest.fixture(scope="module")
def basics():
    return load_module(KERNELS / "emulator_basics.cu")


@pytest.fixture(params=RACE_CHECKS, ids=lambda checks: "+".join(k for k, on in checks.items() if on) or "plain")
def checks(request, basics):
    basics.poison_shared = request.param["poison_shared"]
    basics.reverse_threads = request.param["reverse_threads"]
    yield request.param
    basics.poison_shared = basics.reverse_threads = False


def test_indexing_covers_a_grid_whose_size_is_not_a_multiple_of_the_block(basics):
    n = 1000
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    y = np.full(n + 24, -7.0, np.float32)  # the tail beyond n must stay untouched
    basics.get_function("scale_with_tail")((n + 127) // 128, 128, (x, y, np.float32(3.0), np.int32(n)))
    np.testing.assert_array_equal(y[:n], np.float32(3.0) * x + np.arange(n, dtype=np.float32))
    assert (y[n:] == -7.0).all()

    rows, cols = 37, 50
    grid = np.full((rows, cols), -1, np.int32)
    basics.get_function("index_2d")(((cols + 15) // 16, (rows + 7) // 8), (16, 8), (grid, np.int32(rows), np.int32(cols)))
    np.testing.assert_array_equal(grid, np.arange(rows)[:, None] * 1000 + np.arange(cols)[None, :])


def test_shared_memory_tree_reduction(basics, checks):
    n = 5000
    x = np.random.default_rng(1).random(n, dtype=np.float32)
    blocks = (n + 255) // 256
    partial = np.zeros(blocks, np.float32)
    basics.get_function("block_sum")(blocks, 256, (x, partial, np.int32(n)))
    expected = np.add.reduceat(np.pad(x, (0, blocks * 256 - n)).astype(np.float64), np.arange(0, blocks * 256, 256))
    np.testing.assert_allclose(partial, expected, rtol=1e-5)


def test_warp_shuffles(basics, checks):
    x = np.random.default_rng(2).standard_normal(128).astype(np.float32)
    down_sum, xor_sum, broadcast, prefix, rotated = (np.zeros(n, np.float32) for n in (4, 128, 128, 128, 128))
    basics.get_function("warp_shuffles")(2, 64, (x, down_sum, xor_sum, broadcast, prefix, rotated))
    warps = x.reshape(4, 32).astype(np.float64)
    np.testing.assert_allclose(down_sum, warps.sum(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xor_sum, np.repeat(warps.sum(axis=1), 32), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(broadcast, np.repeat(x[::32], 32))
    np.testing.assert_allclose(prefix, np.cumsum(warps, axis=1).ravel(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rotated, np.roll(x.reshape(8, 16), -1, axis=1).ravel())


def test_warp_votes_and_barrier_count(basics, checks):
    flags = np.zeros(96, np.int32)
    flags[[3, 40, 41]] = 1   # warp 0: lane 3, warp 1: lanes 8 and 9
    flags[64:] = 1           # warp 2: every lane
    ballots, any_, all_ = np.zeros(3, np.uint32), np.zeros(3, np.int32), np.zeros(3, np.int32)
    counts = np.zeros(1, np.int32)
    basics.get_function("warp_votes")(1, 96, (flags, ballots, any_, all_, counts))
    assert list(ballots) == [1 << 3, (1 << 8) | (1 << 9), 0xFFFFFFFF]
    assert list(any_) == [1, 1, 1] and list(all_) == [0, 0, 1]
    assert counts[0] == flags.sum()


def test_dynamic_shared_memory_is_one_buffer_sized_by_the_launch(basics, checks):
    x = np.arange(3 * 64, dtype=np.float32)
    y = np.zeros_like(x)
    basics.get_function("reverse_through_dynamic_shared")(3, 64, (x, y), shared_mem=64 * 4)
    np.testing.assert_array_equal(y, x.reshape(3, 64)[:, ::-1].ravel())


def test_shared_memory_of_an_inline_helper(basics, checks):
    x = np.arange(2 * 64, dtype=np.float32)
    y = np.zeros_like(x)
    basics.get_function("rotate_through_helper")(2, 64, (x, y))
    np.testing.assert_array_equal(y, np.roll(x.reshape(2, 64), -1, axis=1).ravel())


def test_atomics(basics):
    values = np.random.default_rng(3).integers(-1000, 1000, 777).astype(np.int32)
    int_sum, unsigned_sum, first_claim, last = (np.array([v], dt) for v, dt in
                                               ((0, np.int32), (0, np.uint32), (-1, np.int32), (0, np.int32)))
    float_sum, maximum, minimum = np.zeros(1, np.float32), np.array([-10**6], np.int32), np.array([10**6], np.int32)
    wide_sum = np.zeros(1, np.uint64)
    basics.get_function("atomics")(7, 128, (values, np.int32(len(values)), int_sum, float_sum, unsigned_sum,
                                            maximum, minimum, first_claim, last, wide_sum))
    assert int_sum[0] == values.sum()
    assert float_sum[0] == pytest.approx(0.5 * values.sum(), abs=1e-2)
    assert unsigned_sum[0] == values.astype(np.uint32).sum(dtype=np.uint32)
    assert (maximum[0], minimum[0]) == (values.max(), values.min())
    assert 0 <= first_claim[0] < len(values) and last[0] in values
    assert int(wide_sum[0]) == (int(values.sum()) << 32) % 2**64


def test_math_and_integer_intrinsics(basics):
    f, k = np.zeros(6, np.float32), np.zeros(8, np.int32)
    basics.get_function("intrinsics")(1, 1, (np.array([0.5], np.float32), f, k))
    np.testing.assert_allclose(f, [np.exp(0.5), 2 ** 0.5, 2.0, 0.5, 0.25, 2.0], rtol=1e-6)
    assert list(k) == [-1, 2, 8, 31, 4, 3, -15, 7]


def test_tiled_gemm_matches_numpy_under_race_checks():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((50, 70)).astype(np.float32), rng.standard_normal((70, 40)).astype(np.float32)
    c = np.zeros((50, 40), np.float32)
    module = load_module(benchmark.SOURCE, poison_shared=True, reverse_threads=True)
    module.get_function("tiled_gemm")((3, 4), (16, 16), (a, b, c, np.int32(50), np.int32(70), np.int32(40)))
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


def _transpose(module, kernel_name):
    rows, cols = 40, 24
    matrix = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    out = np.zeros((cols, rows), np.float32)
    module.get_function(kernel_name)(((cols + 15) // 16, (rows + 15) // 16), (16, 16),
                                     (matrix, out, np.int32(rows), np.int32(cols)))
    return matrix, out


def test_race_finders_catch_a_missing_syncthreads():
    module = load_module(KERNELS / "broken_sync.cu", poison_shared=True, reverse_threads=True)
    matrix, out = _transpose(module, "transpose_missing_sync")
    assert np.isnan(out).any() and not np.array_equal(out, matrix.T)

    matrix, out = _transpose(module, "transpose")
    np.testing.assert_array_equal(out, matrix.T)
    module.reverse_threads = False
    matrix, out = _transpose(module, "transpose")
    np.testing.assert_array_equal(out, matrix.T)


@pytest.mark.parametrize("kernel_name, expected", [
    ("exit_before_barrier", r"threads 0-15 wait at __syncthreads on line \d+; threads 16-31 have exited"),
    ("barriers_in_both_branches", r"different barriers"),
    ("shuffle_after_exit", r"wait at __shfl_down_sync"),
])
def test_a_barrier_not_every_thread_reaches_is_a_deadlock_error(basics, kernel_name, expected):
    with pytest.raises(EmulatorError, match=rf"kernel '{kernel_name}'.*deadlock in block \(0,0,0\).*{expected}"):
        basics.get_function(kernel_name)(1, 32, (np.zeros(32, np.float32),))


def test_a_crash_inside_a_kernel_is_an_error_and_python_carries_on(basics):
    out = np.zeros(8, np.float32)
    with pytest.raises(EmulatorError, match=r"kernel 'write_through_null'.*SIGSEGV.*block \(0,0,0\), thread \(0,0,0\)"):
        basics.get_function("write_through_null")(2, 8, (out, np.int32(1)))
    basics.get_function("write_through_null")(1, 8, (out, np.int32(0)))
    assert (out == 1.0).all()


def test_bare_python_scalars_are_refused(basics):
    kernel = basics.get_function("scale_with_tail")
    x = np.zeros(4, np.float32)
    with pytest.raises(KernelArgumentError, match=r"scale_with_tail: parameter 'factor' \(float\).*bare Python float"):
        kernel(1, 4, (x, x, 2.0, np.int32(4)))
    with pytest.raises(KernelArgumentError, match=r"parameter 'n' \(int\).*bare Python int.*numpy.int32"):
        kernel(1, 4, (x, x, np.float32(2), 4))


@pytest.mark.parametrize("arguments, expected", [
    (lambda x: (x, x, np.float64(2), np.int32(4)), r"'factor' \(float\) needs numpy.float32, got numpy.float64"),
    (lambda x: (x, x, np.float32(2), np.int64(4)), r"'n' \(int\) needs numpy.int32, got numpy.int64"),
    (lambda x: (x, x.astype(np.float64), np.float32(2), np.int32(4)), r"'y' \(float\*\) needs a float32 array"),
    (lambda x: (x[::2], x, np.float32(2), np.int32(2)), r"'x' \(float\*\) needs a C-contiguous array"),
    (lambda x: (x, np.float32(1), np.float32(2), np.int32(4)), r"'y' \(float\*\) needs a numpy array"),
    (lambda x: (x, x, np.float32(2)), r"takes 4 arguments \(x, y, factor, n\), got 3"),
])
def test_arguments_of_the_wrong_type_are_refused(basics, arguments, expected):
    with pytest.raises(KernelArgumentError, match=expected):
        basics.get_function("scale_with_tail")(1, 4, arguments(np.zeros(8, np.float32)))


def test_unknown_kernel_and_compile_errors_are_clear(basics):
    with pytest.raises(KeyError, match="has no kernel 'nope'"):
        basics.get_function("nope")
    with pytest.raises(EmulatorError, match=r"broken\.cu:2:.*error"):
        load_module_source('extern "C" __global__ void k(float* x) {\n  x[0] = undeclared;\n}\n', name="broken")


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUMLP_CACHE", str(tmp_path))
    source = 'extern "C" __global__ void fill(int* x) { x[threadIdx.x] = 7; }\n'
    first = load_module_source(source, name="cached")
    built = first.library_path.stat().st_mtime_ns
    second = load_module_source(source, name="cached")
    assert first.compiled and not second.compiled
    assert second.library_path == first.library_path and second.library_path.stat().st_mtime_ns == built
    assert first.library_path.parent == tmp_path / "emulator"
    assert load_module_source(source, name="cached", include_dirs=[str(tmp_path)]).compiled  # other flags
    x = np.zeros(3, np.int32)
    second.get_function("fill")(1, 3, (x,))
    assert list(x) == [7, 7, 7]


@pytest.mark.parametrize("path", [*sorted(KERNELS.glob("*.cu")), benchmark.SOURCE], ids=lambda path: path.name)
def test_the_test_kernels_are_valid_cuda_for_nvrtc(path):
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    program = nvrtc.createProgram(path.read_text(), path.name, [], [])
    try:
        nvrtc.compileProgram(program, ["-arch=sm_75", "-std=c++17"])
    except nvrtc.NVRTCError as error:
        pytest.fail(f"NVRTC: {error}\n{nvrtc.getProgramLog(program)}")


# ---- the checks of a sanitizer: each catches its planted bug (tests/kernels/sanitizer_bugs.cu) ----

@pytest.fixture(scope="module")
def bugs():
    return load_module(KERNELS / "sanitizer_bugs.cu")


@pytest.fixture
def unchecked(bugs):
    """The module with memcheck off for one test."""
    bugs.memcheck = False
    yield bugs
    bugs.memcheck = True


def test_memcheck_is_on_by_default(bugs):
    assert bugs.memcheck and load_module_source("extern \"C\" __global__ void k() {}\n", name="plain").memcheck


def test_memcheck_names_an_out_of_bounds_read(bugs, unchecked):
    x, y = np.arange(1000, dtype=np.float32), np.zeros(1000, np.float32)
    kernel = bugs.get_function("shifted_copy")
    bugs.memcheck = True
    kernel(8, 128, (x, y, np.int32(1000), np.int32(0)))
    np.testing.assert_array_equal(y, x)   # the copy in and out of the guarded buffers is exact
    with pytest.raises(EmulatorError, match=r"kernel 'shifted_copy'.*out-of-bounds read of argument 'x' \(float\*\) "
                                            r"at index 1000: it has 1000 elements.*block \(7,0,0\), thread \(103,0,0\)"):
        kernel(8, 128, (x, y, np.int32(1000), np.int32(1)))
    bugs.memcheck = False
    kernel(8, 128, (x, y, np.int32(1000), np.int32(1)))   # without memcheck the bug passes unseen
    np.testing.assert_array_equal(y[:-1], x[1:])


def test_memcheck_names_an_out_of_bounds_write_past_the_end(bugs, unchecked):
    y = np.zeros(1000, np.float32)
    bugs.memcheck = True
    with pytest.raises(EmulatorError, match=r"kernel 'inclusive_bound_fill'.*out-of-bounds write of argument 'y' "
                                            r"\(float\*\) at index 1000: it has 1000 elements"):
        bugs.get_function("inclusive_bound_fill")(8, 128, (y, np.int32(1000)))
    bugs.memcheck = False
    padded = np.zeros(1001, np.float32)   # the bug writes the element after the 1000
    bugs.get_function("inclusive_bound_fill")(8, 128, (padded[:1000], np.int32(1000)))
    assert padded[1000] == 1.0


@pytest.mark.parametrize("n", [1000, 1024], ids=["inside-the-page", "page-aligned"])
def test_memcheck_names_an_out_of_bounds_write_before_the_start(bugs, unchecked, n):
    """4000 bytes leave room before the copy on its page (a canary, checked after the launch); 4096
    bytes fill the page, so the write faults in the guard page at once."""
    y = np.zeros(n, np.int32)
    bugs.memcheck = True
    with pytest.raises(EmulatorError, match=rf"kernel 'write_previous'.*out-of-bounds write of argument 'y' \(int\*\) "
                                            rf"at index -1: it has {n} elements"):
        bugs.get_function("write_previous")(-(-n // 128), 128, (y, np.int32(n)))
    bugs.memcheck = False
    padded = np.full(n + 1, -5, np.int32)
    bugs.get_function("write_previous")(-(-n // 128), 128, (padded[1:], np.int32(n)))
    assert padded[0] == 0


def test_memcheck_keeps_one_array_passed_twice_one_memory(basics):
    source = np.arange(300, dtype=np.float32)
    target = np.zeros(300, np.float32)
    basics.get_function("add_through_alias")(3, 128, (source, target, target, np.int32(300)))
    np.testing.assert_array_equal(target, source + 1)


def test_initcheck_fills_empty_arrays_so_a_read_of_unwritten_memory_shows(bugs):
    from gpumlp.device import EmulatedDevice
    device = EmulatedDevice()
    assert np.isnan(device.empty((3, 4))).all() and np.isnan(device.empty(2, np.float64)).all()
    assert (device.empty(5, np.int32) == np.int32(np.uint32(0xA5A5A5A5).view(np.int32))).all()
    x = np.arange(256, dtype=np.float32)
    y = device.empty(256)
    bugs.get_function("accumulate_instead_of_assign")(2, 128, (x, y, np.int32(256)))
    assert np.isnan(y).all()
    # Without initcheck the bug passes wherever fresh memory happens to hold zeros.
    y = np.zeros(256, np.float32)
    bugs.get_function("accumulate_instead_of_assign")(2, 128, (x, y, np.int32(256)))
    np.testing.assert_array_equal(y, 2 * x)
    assert not EmulatedDevice(initcheck=False).initcheck


def _tickets(module, grid):
    blocks = int(np.prod(grid))
    counter, tickets = np.zeros(1, np.uint32), np.full(blocks, 2**32 - 1, np.uint32)
    module.get_function("block_tickets")(grid, 32, (counter, tickets))
    assert sorted(tickets) == list(range(blocks))   # every block ran exactly once
    return tickets


def test_blocks_run_in_launch_reverse_or_seeded_random_order():
    module = load_module(KERNELS / "emulator_basics.cu")
    grid = (5, 3, 2)
    blocks = 30
    assert list(_tickets(module, grid)) == list(range(blocks))
    module.block_order = "reverse"
    assert list(_tickets(module, grid)) == list(range(blocks))[::-1]
    shuffled = load_module(KERNELS / "emulator_basics.cu", block_order="random")
    first, second = _tickets(shuffled, grid), _tickets(shuffled, grid)
    assert list(first) != list(range(blocks)) and list(first) != list(second)   # a new order each launch
    again = load_module(KERNELS / "emulator_basics.cu", block_order="random")
    assert list(_tickets(again, grid)) == list(first)   # the same seed: the same sequence of orders
    other_seed = load_module(KERNELS / "emulator_basics.cu", block_order="random", block_order_seed=1)
    assert list(_tickets(other_seed, grid)) != list(first)
    with pytest.raises(ValueError, match="block_order must be one of launch, reverse, random"):
        module.block_order = "sorted"


def test_comparing_block_orders_catches_blocks_that_depend_on_each_other(bugs):
    x = np.ones(50, np.float32)
    totals = np.zeros(50, np.float32)
    kernel = bugs.get_function("running_sum_across_blocks")
    kernel(50, 32, (x, totals))     # in launch order the bug passes
    np.testing.assert_array_equal(totals, np.arange(1, 51, dtype=np.float32))
    bugs.compare_block_orders = True
    try:
        with pytest.raises(EmulatorError, match=r"kernel 'running_sum_across_blocks'.*argument 'totals' differs "
                                                r"between launch and reverse block order.*depends on the order"):
            kernel(50, 32, (x, np.zeros(50, np.float32)))
        y = np.arange(1000, dtype=np.float32)
        bugs.get_function("shifted_copy")(8, 128, (x := y.copy(), y, np.int32(1000), np.int32(0)))
        np.testing.assert_array_equal(y, x)   # an order-independent kernel passes the comparison
    finally:
        bugs.compare_block_orders = False


@pytest.mark.parametrize("grid, block, shared_mem, expected", [
    (4, 256, 0, r"block \(256, 1, 1\) has 256 threads, more than the kernel's __launch_bounds__\(128\)"),
    (1, 1025, 0, r"block \(1025, 1, 1\) has 1025 threads; a block has at most 1024"),
    (1, (1, 1, 65), 0, r"block \(1, 1, 65\) has 65 threads;.*extents up to \(1024, 1024, 64\)"),
    ((1, 65536), 32, 0, r"grid \(1, 65536, 1\) exceeds the largest grid"),
    ((1, 1, 65536), 32, 0, r"grid \(1, 1, 65536\) exceeds"),
    (1, 32, 48 * 1024 + 4, r"49156 bytes of dynamic shared memory \+ 0 static.*exceed 49152 bytes"),
])
def test_launches_a_gpu_refuses_are_refused(bugs, grid, block, shared_mem, expected):
    y = np.zeros(8, np.float32)
    with pytest.raises(EmulatorError, match=rf"kernel 'bounded_scale'.*invalid launch: {expected}.*a GPU refuses it"):
        bugs.get_function("bounded_scale")(grid, block, (y, np.float32(2), np.int32(8)), shared_mem=shared_mem)


def test_launch_bounds_allow_their_block_and_the_shared_memory_opt_in(bugs):
    kernel = bugs.get_function("bounded_scale")
    assert kernel.max_threads_per_block == 128
    y = np.ones(256, np.float32)
    kernel(2, 128, (y, np.float32(2), np.int32(256)))
    assert (y == 2).all()
    # Without the bound the 256-thread launch that the bound refuses (test above) runs: only the
    # check stands between the planted mismatch and a launch that would fail on a GPU.
    unbounded = load_module_source((KERNELS / "sanitizer_bugs.cu").read_text().replace("__launch_bounds__(128) ", ""),
                                   name="sanitizer_bugs_unbounded").get_function("bounded_scale")
    assert unbounded.max_threads_per_block == 1024
    unbounded(1, 256, (y, np.float32(2), np.int32(256)))
    assert (y == 4).all()
    # the bound of the project's layer_forward_mv is on a separate declaration
    online = load_module(Path(__file__).resolve().parent.parent / "cuda_kernels" / "mlp_online.cu")
    assert online.get_function("layer_forward_mv").max_threads_per_block == 256
    assert online.get_function("backward_reduce").max_threads_per_block == 1024
    dynamic = load_module(KERNELS / "emulator_basics.cu").get_function("reverse_through_dynamic_shared")
    x = np.arange(64, dtype=np.float32)
    with pytest.raises(EmulatorError, match="max_dynamic_shared_size_bytes is 0"):
        dynamic(1, 64, (x, np.zeros_like(x)), shared_mem=64 * 1024)
    dynamic.max_dynamic_shared_size_bytes = 64 * 1024
    out = np.zeros_like(x)
    dynamic(1, 64, (x, out), shared_mem=64 * 1024)
    np.testing.assert_array_equal(out, x[::-1])
    with pytest.raises(EmulatorError, match=r"outside 0\.\."):
        dynamic.max_dynamic_shared_size_bytes = 228 * 1024


def test_flush_to_zero_matches_cuda_ftz_and_leaves_numpy_alone(bugs):
    tiny = np.finfo(np.float32).tiny
    a = np.array([1e-20, 1e-39, 1e-39, 1.5 * tiny, 2.0], np.float32)
    b = np.array([1e-20, 0.0, 1e-39, -tiny, 3.0], np.float32)
    out = np.zeros((5, 6), np.float32)
    kernel = bugs.get_function("float_ops")
    kernel(1, 5, (a, b, out, np.int32(5)))
    # mul, add, sub as __fmul_rn/__fadd_rn/__fsub_rn, then as operators, then fmaf(a, b, 0)
    expected = np.array([[0, 2e-20, 0, 0, 2e-20, 0],         # 1e-40 (subnormal) -> 0
                         [0, 0, 0, 0, 0, 0],                 # subnormal inputs count as 0 (DAZ)
                         [0, 0, 0, 0, 0, 0],
                         [0, 0, 2.5 * tiny, 0, 0, 0],        # the sum 0.5 tiny is flushed (FTZ)
                         [6, 5, -1, 6, 5, 6]], np.float32)
    np.testing.assert_array_equal(out, expected)
    assert np.float32(1e-39) * np.float32(1) != 0   # numpy after the launch: IEEE subnormals again
    bugs.flush_to_zero = False
    try:
        kernel(1, 5, (a, b, out, np.int32(5)))
    finally:
        bugs.flush_to_zero = True
    assert out[0, 0] == np.float32(1e-20) * np.float32(1e-20) != 0 and out[1, 1] == np.float32(1e-39)


def test_the_shared_memory_limit_counts_the_kernels_own_static_shared_memory(basics):
    """block_sum has 1 KiB of its own; the helper's 256 bytes count for every kernel (which kernels
    call the helper is not known), the other kernels' never."""
    assert basics.static_shared_bytes("block_sum") == 1024 + 256
    assert basics.static_shared_bytes("reverse_through_dynamic_shared") == 256
    dynamic = basics.get_function("reverse_through_dynamic_shared")
    x = np.arange(64, dtype=np.float32)
    out = np.zeros_like(x)
    dynamic(1, 64, (x, out), shared_mem=48 * 1024 - 256)
    np.testing.assert_array_equal(out, x[::-1])
    with pytest.raises(EmulatorError, match=r"48897 bytes of dynamic shared memory \+ 256 static exceed 49152"):
        dynamic(1, 64, (x, out), shared_mem=48 * 1024 - 255)


def test_memcheck_never_writes_a_read_only_array_and_reports_a_write_to_one(bugs):
    x = np.frombuffer(np.arange(256, dtype=np.float32).tobytes(), np.float32)   # numpy: read-only
    y = np.zeros(256, np.float32)
    bugs.get_function("shifted_copy")(2, 128, (x, y, np.int32(256), np.int32(0)))
    np.testing.assert_array_equal(y, x)
    with pytest.raises(EmulatorError, match=r"wrote to argument 'y' \(float\*\), a read-only numpy array"):
        bugs.get_function("inclusive_bound_fill")(2, 128, (np.frombuffer(bytes(1024), np.float32), np.int32(255)))


def test_memcheck_checks_the_devices_own_arrays_in_place(bugs):
    """EmulatedDevice allocates in guarded regions: no copy per launch, the same reports."""
    import mmap
    from gpumlp.device import EmulatedDevice
    device = EmulatedDevice()
    y = device.empty(1000, np.int32)
    assert (y.ctypes.data + y.nbytes) % mmap.PAGESIZE == 0   # the array ends where a guard page starts
    with pytest.raises(EmulatorError, match=r"out-of-bounds write of argument 'y' \(int\*\) at index -1"):
        bugs.get_function("write_previous")(8, 128, (y, np.int32(1000)))
    # a view one element in: its y[-1] is the allocation's first element, and the canary before it
    # was laid again after the report
    bugs.get_function("write_previous")(8, 128, (y[1:], np.int32(999)))
    np.testing.assert_array_equal(y[:999], np.arange(999))
    x, out = device.asarray(np.arange(1000, dtype=np.float32)), device.zeros(1000)
    with pytest.raises(EmulatorError, match=r"out-of-bounds read of argument 'x' \(float\*\) at index 1000"):
        bugs.get_function("shifted_copy")(8, 128, (x, out, np.int32(1000), np.int32(1)))
    bugs.get_function("shifted_copy")(8, 128, (x, out, np.int32(1000), np.int32(0)))
    np.testing.assert_array_equal(out, np.arange(1000, dtype=np.float32))
    assert not EmulatedDevice(memcheck=False).checks["memcheck"]
