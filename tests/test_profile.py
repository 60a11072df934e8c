"""`python -m gpumlp.profile`: the static and analytical part runs anywhere (launches recorded from
the trainer, costs from the shapes, resources from NVRTC); the timing part needs a GPU."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from gpumlp import nets, profile
from gpumlp.device import gpu_available
from gpumlp.gpu_limits import H100, ArchLimits, arch_limits, known_peak, theoretical_occupancy
from gpumlp.kernel_costs import kernel_parameters, online_bytes_per_image

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

ONLINE_STEP = ["layer_forward_mv_gather", "layer_forward_mv", "softmax_xent", "backward_update_partial",
               "backward_reduce"]
MINIBATCH_STEP = ["layer_forward_gemm_gather", "layer_forward_gemm", "softmax_xent", "backprop_delta_gemm",
                  "sgd_update_gemm"]


def run_profile(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gpumlp.profile", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def net4(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "net4.json"
    result = run_profile("--net", 4, "--arch", "sm_90", "--static", "--json", path)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_minibatch(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    result = run_profile("--hidden", 32, "--batch-size", 8, "--static", "--json", path)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(path.read_text())


def kernels(report, phase="step"):
    return [row["kernel"] for row in report["rows"] if row["phase"] == phase]


def test_net4_prints_every_kernel_of_the_step(net4):
    text, report = net4
    assert "times need a GPU" in text
    for name in ONLINE_STEP + ["deform_images"]:
        assert name in text
    layers = len(nets.PAPER_NETS[4]) + 1
    step = kernels(report)
    # the trainer's own order: gather+forward, forward per layer, softmax (+ totals), backward top first
    assert step == (["layer_forward_mv_gather"] + ["layer_forward_mv"] * (layers - 1) + ["softmax_xent"]
                    + ["backward_update_partial", "backward_reduce"] * (layers - 1)
                    + ["backward_update_partial"])
    assert "(18 launches, 1 image; 18 launches per image)" in text
    assert kernels(report, "epoch") == ["deform_images"]
    assert report["missing_cost_models"] == []
    assert all(row["registers"] and row["spill_bytes"] == 0 and row["occupancy"] for row in report["rows"])


def test_net4_forward_bytes_are_the_weight_count_arithmetic(net4):
    _, report = net4
    sizes = nets.layer_sizes(nets.PAPER_NETS[4])
    forward = sum(row["bytes"] for row in report["rows"] if row["kernel"].startswith("layer_forward_mv"))
    # every weight and bias read once, every layer's input read and output written once, 4 bytes each,
    # and the first layer's gather: the image copied out, cursor, order entry and label read, label written
    assert forward == 4 * (nets.count_weights(sizes) + sum(sizes[:-1]) + sum(sizes[1:])) + 4 * (sizes[0] + 4)
    updates = sum(row["bytes"] for row in report["rows"] if row["kernel"] == "backward_update_partial")
    assert updates > 8 * nets.count_weights(sizes)   # W and b read and written, plus the vectors
    assert report["online_bytes_per_image"] == 12 * nets.count_weights(sizes) == online_bytes_per_image(sizes)


def test_json_totals_are_the_sums_of_the_rows(net4, tiny_minibatch):
    for _, report in (net4, tiny_minibatch):
        for phase in ("step", "epoch"):
            rows = [row for row in report["rows"] if row["phase"] == phase]
            total = report["totals"][phase]
            assert total["launches"] == len(rows)
            assert total["bytes"] == sum(row["bytes"] for row in rows)
            assert total["flops"] == sum(row["flops"] for row in rows)
        assert report["summary"]["step_bytes_per_image"] == report["totals"]["step"]["bytes"] / report["batch_size"]


def test_minibatch_profile_uses_the_gemm_kernels(tiny_minibatch):
    text, report = tiny_minibatch
    for name in MINIBATCH_STEP:
        assert name in text
    assert set(kernels(report)) == set(MINIBATCH_STEP)
    assert report["sizes"] == [841, 32, 10] and report["batch_size"] == 8
    assert report["missing_cost_models"] == []
    forward = [row for row in report["rows"] if row["kernel"].startswith("layer_forward_gemm")]
    assert [row["shape"] for row in forward] == ["8x841 . W 32x841", "8x32 . W 10x32"]


def test_json_alone_on_stdout():
    result = run_profile("--hidden", 16, "--static", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device"] is None and report["arch"] == "sm_90"


def test_paper_table_lists_the_five_nets():
    result = run_profile("--paper-table")
    assert result.returncode == 0, result.stderr
    for net, (_, _, hours) in nets.PAPER_RESULTS.items():
        assert f"| {net} | {nets.describe(nets.layer_sizes(nets.PAPER_NETS[net]))} |" in result.stdout
        assert f"{hours} h" in result.stdout
    assert "43.4 us" in result.stdout   # net 4 on an H100: 12 x 12.115M bytes / 3.35 TB/s


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--arch", "90"], "--arch must look like sm_90"),
    (["--arch", "sm_61"], "--arch must be sm_75 or newer"),
    (["--hidden", "0"], "--hidden sizes must be positive"),
    (["--net", "7"], "invalid choice"),
])
def test_a_bad_flag_is_one_line_and_exit_2(args, message):
    result = run_profile(*args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_unwritable_json_path_is_one_line_and_exit_2(tmp_path):
    result = run_profile("--hidden", 16, "--static", "--json", tmp_path / "no such folder" / "p.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write --json") and "No such file" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]


@pytest.mark.parametrize("arch, threads, registers, shared, blocks, warps, limiter", [
    # 8 warps of 32 registers: 64 warps fit the register file, and 8 blocks fill the 64 warp slots
    ("sm_90", 256, 32, 0, 8, 64, "threads"),
    # 64 registers: 2048 per warp, 32 warps in 65536 registers, 4 blocks of 8 warps (50%)
    ("sm_90", 256, 64, 8320, 4, 32, "registers"),
    # 40000 + 1024 reserved = 41088 after rounding to 128: two blocks in 100 KB
    ("sm_86", 128, 40, 40000, 2, 8, "shared memory"),
    # 65 registers round to 2304 per warp: 28 warps, not one block of 32 warps (cannot launch)
    ("sm_75", 1024, 65, 0, 0, 0, "registers"),
    # single-thread blocks: the cap of 24 blocks per SM binds, 24 of 48 warps
    ("sm_89", 1, 16, 0, 24, 24, "blocks"),
])
def test_theoretical_occupancy_hand_computed(arch, threads, registers, shared, blocks, warps, limiter):
    occupancy = theoretical_occupancy(arch_limits(arch), threads, registers, shared)
    assert (occupancy.blocks_per_sm, occupancy.warps_per_sm, occupancy.limiter) == (blocks, warps, limiter)


def test_occupancy_fraction_and_architecture_fallback():
    assert theoretical_occupancy(arch_limits("sm_90"), 256, 64, 0).fraction == 0.5
    assert theoretical_occupancy(arch_limits("sm_86"), 256, 32, 0).fraction == 1.0   # 6 blocks of 8 of 48 warps
    assert arch_limits("sm_103") == arch_limits("sm_100")
    assert arch_limits("sm_121").max_threads_per_sm == 1536
    assert arch_limits("sm_75").max_threads_per_sm == 1024
    custom = ArchLimits(max_threads_per_sm=2048, max_blocks_per_sm=32, shared_per_sm=228 * 1024,
                        shared_reserved_per_block=1024)
    assert theoretical_occupancy(custom, 128, 0, 0).blocks_per_sm == 16


def test_known_peaks_match_cuda_device_names():
    assert known_peak("NVIDIA H100 80GB HBM3").bandwidth == 3.35e12
    assert known_peak("NVIDIA H100 PCIe").bandwidth == 2.0e12
    assert known_peak("NVIDIA A100-SXM4-80GB").bandwidth == 2.0e12
    assert known_peak("NVIDIA A100-PCIE-40GB").bandwidth == 1.555e12
    assert known_peak("NVIDIA L4").name == "L4"
    assert known_peak("NVIDIA L40S") is None
    assert known_peak("GeForce GTX 280").bandwidth == 0.1417e12


def test_kernel_parameters_are_read_from_the_source():
    source = 'extern "C" __global__ void k(const float* __restrict__ W, // weights\n int n_out, float lr) {}'
    assert kernel_parameters(source, "k") == ["W", "n_out", "lr"]


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs an NVIDIA GPU with CuPy")
def test_timed_profile_on_a_gpu(tmp_path):
    path = tmp_path / "timed.json"
    result = run_profile("--hidden", 64, "32", "--repeats", 5, "--warmup", 1, "--graph-steps", 20,
                         "--images", 2000, "--json", path)
    assert result.returncode == 0, result.stderr
    report = json.loads(path.read_text())
    assert report["device"]["peak_bandwidth"] > 0
    assert all(row["time_us"] > 0 and row["gb_per_s"] > 0 for row in report["rows"])
    step_shares = [row["step_share"] for row in report["rows"] if row["phase"] == "step"]
    assert sum(step_shares) == pytest.approx(1.0)
    summary = report["summary"]
    assert summary["graph_per_image_us"] > 0 and summary["epoch_s"] > 0
    assert "per image replaying 20 captured steps" in result.stdout


class FakeTimer:
    """Stands in for CUDA events: every launch 'takes' 10 us more than the previous one."""

    def __init__(self):
        self.calls = 0

    def median_us(self, run, before=None, flush=True):
        self.calls += 1
        return 10.0 * self.calls


class FakeTrainer:
    def __init__(self):
        self.cursor = np.zeros(1, np.int32)

    def capture_steps(self, steps, batch_size):
        return SimpleNamespace(replay=lambda: None)


def test_timed_report_arithmetic_and_rendering_without_a_gpu():
    """The GPU-only columns and summary, fed synthetic times: checks the arithmetic and that the
    timed table renders, which CI cannot otherwise reach."""
    workload = profile.Workload(nets.layer_sizes([64, 32]), 1, 0.0, 1)
    _, launches = profile.record_epoch(profile.HostRecorder(), workload)
    rows = profile.build_rows(launches, "sm_90", sms=132)
    info = profile.GpuInfo("NVIDIA H100 80GB HBM3", "sm_90", 132, 50 * 2**20, H100, "test", arch_limits("sm_90"))
    timer, trainer = FakeTimer(), FakeTrainer()
    profile.time_launches(None, trainer, launches, rows, info, timer)
    graph = profile.time_graph(trainer, workload, 4, timer)
    report = profile.make_report(workload, "sm_90", rows, info, graph)
    times = [10.0 * (i + 1) for i in range(len(rows))]
    assert [row["time_us"] for row in report["rows"]] == times
    first = report["rows"][0]
    assert first["waves"] == pytest.approx(first["blocks"] / (first["blocks_per_sm"] * 132))
    assert first["gb_per_s"] == pytest.approx(first["bytes"] / 10e-6 / 1e9)
    assert first["bandwidth_share"] == pytest.approx(first["bytes"] / 10e-6 / H100.bandwidth)
    step_rows = [row for row in report["rows"] if row["phase"] == "step"]
    assert sum(row["step_share"] for row in step_rows) == pytest.approx(1.0)
    summary = report["summary"]
    assert report["totals"]["step"]["time_us"] == pytest.approx(sum(row["time_us"] for row in step_rows))
    replay_us = 10.0 * (len(rows) + 1)
    assert summary["graph_per_image_us"] == pytest.approx(replay_us / 4)
    assert summary["epoch_s"] == pytest.approx((replay_us / 4 + times[0]) * 1e-6 * profile.MNIST_TRAIN_IMAGES)
    text = profile.render(report)
    assert "waves" in text and "GB/s" in text and "%step" in text and "CUDA graph" in text and "of the speed of the online-SGD bound" in text
    json.dumps(report)
