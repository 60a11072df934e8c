"""The side-by-side benchmark on the CPU: it runs and writes its table, PyTorch's version of the net
trains exactly like the numpy reference (so the comparison is apples to apples), and it reports
gpumlp alone where PyTorch is missing."""
import sys

import numpy as np
import pytest

from gpumlp import bench, nets
from gpumlp.device import gpu_available
from gpumlp.train_cpu import CpuTrainer

TINY = ["--hidden", "16", "--images", "64", "--synthetic", "--repeats", "1"]
# float32 sums in a different order (BLAS vs MKL): a few ulps of the values involved.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


def run_bench(tmp_path, *args):
    out = tmp_path / "results.md"
    code = bench.main([*TINY, *args, "--out", str(out)])
    return code, out.read_text() if out.exists() else ""


def table_rows(report: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in report.splitlines() if line.startswith("| ") and "implementation" not in line]


@pytest.mark.parametrize("batch_size", [1, 5])
def test_torch_step_matches_the_reference(batch_size):
    torch = pytest.importorskip("torch")
    sizes = nets.layer_sizes([16, 12])
    params = nets.init_params(sizes, seed=3)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(batch_size, sizes[0])).astype(np.float32)
    labels = rng.integers(0, 10, size=batch_size).astype(np.int32)
    lr = 0.05

    trainer = CpuTrainer(params, x, labels, batch_size, momentum=0.0, deform_config=None, seed=0)
    reference_loss = float(trainer.step(x, labels, lr)[0].mean())

    model = bench.torch_model(params)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    loss = torch.nn.CrossEntropyLoss()(model(torch.from_numpy(x)), torch.from_numpy(labels).long())
    loss.backward()
    optimizer.step()

    assert loss.item() == pytest.approx(reference_loss, rel=LOSS_RTOL)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for (W0, b0), (W, b), linear in zip(params, trainer.params, linears):
        assert np.abs(W - W0).max() > 100 * WEIGHT_ATOL, "the step must move the weights for this to mean anything"
        np.testing.assert_allclose(linear.weight.detach().numpy(), W, rtol=0, atol=WEIGHT_ATOL)
        np.testing.assert_allclose(linear.bias.detach().numpy(), b, rtol=0, atol=WEIGHT_ATOL)


def test_cpu_bench_writes_both_rows_and_the_ratio(tmp_path):
    pytest.importorskip("torch")
    code, report = run_bench(tmp_path, "--batch-size", "1", "4")
    assert code == 0
    assert "CPU:" in report and "numpy" in report and "torch" in report
    rows = {(row[0], row[3]): row for row in table_rows(report)}
    assert set(rows) == {("gpumlp (numpy reference)", "1"), ("PyTorch eager", "1"),
                         ("gpumlp (numpy reference)", "4"), ("PyTorch eager", "4")}
    for (implementation, _), row in rows.items():
        assert row[2] == "841-16-10"
        assert float(row[4].replace(",", "")) > 0
        assert row[6].endswith("x")
        if implementation == "PyTorch eager":
            assert row[6] == "1.00x"
    assert report.count("(agree: the same recipe)") == 2


def test_without_torch_gpumlp_is_reported_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    code, report = run_bench(tmp_path)
    assert code == 0
    assert [row[0] for row in table_rows(report)] == ["gpumlp (numpy reference)"]
    assert "PyTorch rows left out: PyTorch is not installed" in report

    code, _ = run_bench(tmp_path, "--require-torch")
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --require-torch")


@pytest.mark.parametrize("args, fragment", [
    (["--repeats", "0"], "--repeats"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "128"], "--images"),
    (["--lr", "0"], "--lr"),
    (["--hidden", "-3"], "--hidden"),
    (["--engine", "persistent", "--batch-size", "1", "4"], "--engine"),
])
def test_bad_flag_is_one_line_and_exit_2(tmp_path, capsys, args, fragment):
    code, _ = run_bench(tmp_path, *args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err


@pytest.mark.skipif(gpu_available(), reason="there is a GPU here")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    code, _ = run_bench(tmp_path, "--device", "cuda")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --device cuda") and len(err.splitlines()) == 1


def test_losses_that_disagree_are_flagged():
    ours = bench.Result("gpumlp", "CPU", 1, [1.0], loss=0.50)
    same = bench.Result(bench.EAGER, "CPU", 1, [1.0], loss=0.51)
    different = bench.Result(bench.EAGER, "CPU", 1, [1.0], loss=0.80)
    assert bench.loss_notes([ours, same])[1]
    notes, agree = bench.loss_notes([ours, different])
    assert not agree and "WARNING" in notes[0]


@pytest.mark.parametrize("batch_size,engine", [(1, "graph"), (4, "graph"), (1, "persistent"), (1, "spread")])
def test_gpu_side_wiring_matches_the_numpy_side_on_the_emulator(batch_size, engine):
    """GpumlpCuda drives DeviceTrainer (or PersistentTrainer, SpreadTrainer) exactly as on a GPU;
    on the emulator it must train like the numpy side (rel 1e-5: spread sums in another order, a
    pass's mean loss moves by a few float32 roundings), including a batch size that leaves images
    out of each pass (10 = 2 x 4 + 2)."""
    from gpumlp.device import EmulatedDevice
    images, labels = bench.synthetic_images(10, seed=0)
    workload = bench.Workload(nets.layer_sizes([16]), images, labels, "synthetic", lr=0.01, seed=0, repeats=1)
    on_device = bench.GpumlpCuda(workload, batch_size, EmulatedDevice(), engine)
    on_cpu = bench.GpumlpCpu(workload, batch_size)
    for pass_index in range(2):
        order = workload.order(pass_index, batch_size)
        assert len(order) == 10 - 10 % batch_size
        assert on_device.run_pass(order) == pytest.approx(on_cpu.run_pass(order), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a real NVIDIA GPU")
def test_gpu_bench_writes_all_three_rows(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build cannot use the GPU")
    code, report = run_bench(tmp_path, "--device", "cuda", "--batch-size", "1", "4", "--require-torch")
    assert code == 0
    implementations = [row[0] for row in table_rows(report)]
    torch_rows = [bench.EAGER, "PyTorch + CUDA graph (whole step)"]
    assert implementations == [*bench.ENGINE_ROWS.values(), *torch_rows, bench.ENGINE_ROWS["graph"], *torch_rows]
    assert report.count("(agree: the same recipe)") == 5


def test_default_report_goes_to_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.chdir(tmp_path)
    assert bench.main(TINY) == 0
    written = list(tmp_path.rglob("*.md"))
    assert [p.parent for p in written] == [tmp_path] and written[0].name.startswith("results-")
    assert f"written to {written[0]}" in capsys.readouterr().err
