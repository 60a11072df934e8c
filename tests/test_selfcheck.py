"""`python -m gpumlp.selfcheck`: passes on the emulator with the project's kernels, with bounds that
stay tight at the paper shape, and fails naming the kernel when a kernel constant is altered or a
loop bound is off by one (GPUMLP_KERNEL_DIR pointing at an edited copy); the quick part guards
reproduce_2010.py on a GPU unless --skip-selfcheck."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpumlp import cli, selfcheck
from gpumlp import device as device_module
from gpumlp.device import KERNEL_DIR, CudaDevice, EmulatedDevice, gpu_available, gpu_unavailable_reason

REPO = Path(__file__).resolve().parent.parent
TANH_A = "#define TANH_A 0x1.b74538p+0f"
# backward_reduce's chain over the chunks of a group (mlp_online.cu)
REDUCE_LOOP = "for (int c = 0; c < count; ++c)"


def run_selfcheck(*args, kernel_dir=None):
    env = dict(os.environ)
    if kernel_dir is not None:
        env["GPUMLP_KERNEL_DIR"] = str(kernel_dir)
    return subprocess.run([sys.executable, "-m", "gpumlp.selfcheck", "--device", "emulate", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def edited_kernels(tmp_path_factory, filename, old, new):
    """A copy of cuda_kernels/ with `old` replaced by `new` (once) in `filename`."""
    folder = tmp_path_factory.mktemp("kernels") / "cuda_kernels"
    shutil.copytree(KERNEL_DIR, folder)
    source = folder / filename
    text = source.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {filename}"
    source.write_text(text.replace(old, new))
    return folder


@pytest.fixture(scope="module")
def altered_kernels(tmp_path_factory):
    """A copy of cuda_kernels/ whose scaled tanh uses A = 1.7 instead of 1.7159."""
    return edited_kernels(tmp_path_factory, "mlp_common.cuh", TANH_A, "#define TANH_A 0x1.b33334p+0f")


@pytest.fixture(scope="module")
def passing_run():
    return run_selfcheck()


def test_selfcheck_passes_on_the_emulator(passing_run):
    done = passing_run
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("selfcheck passed: ")
    table = "\n".join(lines)
    for kernel in ("layer_forward_mv", "backward_update_partial", "backward_reduce", "layer_forward_gemm",
                   "backprop_delta_gemm", "sgd_update_gemm", "softmax_xent", "layer_forward_gemm_gather", "layer_forward_mv_gather",
                   "deform_images", "philox_fill", "training steps"):
        assert kernel in table, kernel
    assert "W 2000x2500" in table and "W 33x37" in table     # paper and small shapes
    assert " FAIL" not in table


def test_selfcheck_paper_bounds_stay_tight(passing_run):
    """The sum-length bounds grow with the sum, but not so far that a real fault fits in them: at the
    paper shape the largest per-element bound of backprop_delta_gemm (a sum of 2000 terms
    |delta_out W| <= 0.025, times |f'| <= 1.14) is below 1e-4 absolute, and the worst element of every
    long sum uses more than 1/1000 of its bound (the bound is not orders of magnitude above what
    another summation order costs)."""
    rows = [line.split("  ") for line in passing_run.stdout.splitlines()]
    rows = [[cell.strip() for cell in row if cell.strip()] for row in rows]
    paper = [row for row in rows if len(row) == 6 and "2000x2500" in row[1] and row[3].startswith("per element, max ")]
    assert {row[0] for row in paper} >= {"layer_forward_mv", "backward_update_partial", "backward_reduce",
                                         "layer_forward_gemm", "backprop_delta_gemm", "sgd_update_gemm"}
    largest = {row[0]: float(row[3].removeprefix("per element, max ")) for row in paper}
    assert largest["backprop_delta_gemm"] < 1e-4, largest
    assert largest["backward_reduce"] < 1e-4 and largest["layer_forward_gemm"] < 3e-4, largest
    for row in paper:
        assert 1e-3 < float(row[4]) < 1, row    # the share of the bound that the worst element uses


def test_selfcheck_fails_naming_the_kernel_with_an_altered_constant(altered_kernels):
    done = run_selfcheck("--quick", kernel_dir=altered_kernels)
    assert done.returncode == selfcheck.EXIT_MISMATCH, done.stdout + done.stderr
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("selfcheck FAILED") and "layer_forward_mv" in verdict, verdict
    assert "backward_update_partial" not in verdict   # the update does not use A: only what does fails
    assert "worst at index" in done.stdout


def test_quick_check_raises_naming_the_kernel(altered_kernels, monkeypatch):
    logged = []
    selfcheck.quick_check(EmulatedDevice(), logged.append)
    assert logged[-1].startswith("selfcheck passed")
    monkeypatch.setattr(device_module, "KERNEL_DIR", altered_kernels)
    with pytest.raises(selfcheck.SelfCheckFailed, match="layer_forward_gemm"):
        selfcheck.quick_check(EmulatedDevice(), logged.append)


def test_selfcheck_fails_naming_backward_reduce_when_its_chunk_loop_is_off_by_one(tmp_path_factory):
    """A fault the bitwise checks cannot see: backward_reduce drops the last chunk of every group.
    Only the sum-length bound of delta_in (and the training steps, which use the kernel) catch it."""
    skipped_chunk = edited_kernels(tmp_path_factory, "mlp_online.cu", REDUCE_LOOP,
                                   "for (int c = 0; c < count - 1; ++c)")
    done = run_selfcheck("--quick", kernel_dir=skipped_chunk)
    assert done.returncode == selfcheck.EXIT_MISMATCH, done.stdout + done.stderr
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("selfcheck FAILED") and "backward_reduce" in verdict, verdict
    assert "backward_update_partial" not in verdict and "layer_forward" not in verdict, verdict
    assert "backward_reduce (W 33x37, 2 chunks -> delta_in): " in done.stdout


@pytest.mark.skipif(gpu_available(), reason="a GPU is usable here")
def test_selfcheck_on_cuda_without_a_gpu_is_one_error_line(capsys):
    assert selfcheck.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: no usable CUDA GPU") and "\n" not in err


class PretendGpu(EmulatedDevice):
    """What reproduce_2010.py sees as a GPU (the self-check then runs on the emulator)."""
    is_emulated = False


def test_reproduce_runs_the_quick_check_on_a_gpu_unless_skipped(synthetic_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "choose_device", lambda requested, log: PretendGpu())
    calls = []

    def fail(device, log):
        calls.append(device)
        raise selfcheck.SelfCheckFailed("selfcheck FAILED on test: layer_forward_mv")

    def stop_before_training(*args):
        raise KeyboardInterrupt   # the run stops here with EXIT_INTERRUPTED: far enough for this test

    monkeypatch.setattr(selfcheck, "quick_check", fail)
    monkeypatch.setattr(cli, "make_trainer", stop_before_training)
    base = ["--hidden", "8", "--epochs", "1", "--out", str(tmp_path / "run")]
    assert cli.main(base) == selfcheck.EXIT_MISMATCH
    assert "error: selfcheck FAILED on test: layer_forward_mv" in capsys.readouterr().err
    assert cli.main([*base, "--skip-selfcheck"]) == 130 and len(calls) == 1
    monkeypatch.setattr(cli, "choose_device", lambda requested, log: EmulatedDevice())
    assert cli.main(base) == 130 and len(calls) == 1   # --device emulate: nothing to check


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason=f"needs an NVIDIA GPU: {gpu_unavailable_reason()}")
def test_selfcheck_passes_on_the_gpu():
    checks = selfcheck.run_checks(CudaDevice(), paper=True)
    assert not selfcheck.failed_kernels(checks), selfcheck.table(checks)
