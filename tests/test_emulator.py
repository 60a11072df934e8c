"""The CPU emulator runs unchanged CUDA text with real barrier, warp and shared-memory semantics,
finds races, and turns deadlocks and crashes into exceptions."""
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
