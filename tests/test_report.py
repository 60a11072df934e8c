"""`python -m gpumlp.report`: the pictures, the GIF and report.md of a short CPU run, and the
one-line errors of bad run directories."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpumlp import cli, nets, report, results
from gpumlp.deform import DeformConfig
from gpumlp.rundir import snapshot_epochs
from helpers import synthetic_digits

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--hidden", "8", "--batch-size", "4", "--lr", "0.02", "--checkpoint-every", "1"]
PICTURES = ["curves.png", "filters.png", "deformations.png", "errors.png"]


def train(out, *extra):
    assert cli.main([*TINY, "--epochs", "3", *map(str, extra), "--out", str(out)]) == 0
    return out


def one_error_line(capsys, code, fragment):
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err


def test_report_writes_every_picture_gif_and_markdown(synthetic_mnist, tmp_path):
    run = train(tmp_path / "run")
    assert report.main([str(run)]) == 0
    for name in PICTURES:
        with Image.open(run / name) as image:
            image.verify()
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200, name
    with Image.open(run / "training.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == len(snapshot_epochs(3)) == 3
        gif.seek(gif.n_frames - 1)   # every frame decodes
    assert (run / "training.gif").stat().st_size < report.MAX_GIF_BYTES
    markdown = (run / "report.md").read_text()
    for name in [*PICTURES, "training.gif"]:
        assert f"]({name})" in markdown, name
    summary = json.loads((run / "summary.json").read_text())
    assert f"{100 * summary['test_error_at_best_val']:.2f}%" in markdown
    assert "made by the numpy reference" in markdown
    assert "paper, net" not in markdown   # 841-8-10 is none of the paper's nets


def files_and_times(folder):
    return {path.relative_to(folder): path.stat().st_mtime_ns for path in folder.rglob("*")}


def test_report_into_another_folder_leaves_the_run_untouched(synthetic_mnist, tmp_path, capsys, monkeypatch):
    run = train(tmp_path / "run", "--momentum", "0.5", "--lr-min", "0.001")
    before = files_and_times(run)
    with monkeypatch.context() as read_only:     # as root, chmod would not stop the writes
        read_only.setattr(report.os, "access", lambda path, mode: Path(path) != run)
        capsys.readouterr()
        one_error_line(capsys, report.main([str(run)]), "write the report elsewhere with --out DIR")
    out = tmp_path / "elsewhere" / "report"
    assert report.main([str(run), "--out", str(out)]) == 0
    assert files_and_times(run) == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*PICTURES, "training.gif", "report.md"])
    markdown = (out / "report.md").read_text()
    assert f"Run directory: `{run}`" in markdown
    assert "momentum 0.5," in markdown and "floor 0.001)" in markdown
    config = json.loads((run / "config.json").read_text())["settings"]
    for name, value in config.items():     # every setting is in the table, under its flag
        if name != "augment":
            assert f"| `--{name.replace('_', '-')}` | {report.setting_value(value)} |" in markdown, name
    assert "| `--momentum` | 0.5 |" in markdown and "| deformation (off with --no-augment) | yes |" in markdown


def one_epoch_metrics(error):
    return [{"epoch": 1, "lr": 0.02, "train_loss": 2.2, "train_error": error, "val_error": error,
             "test_error": error, "seconds": 0.1}]


@pytest.mark.parametrize("error", [1.0, 0.9, 0.004])
def test_a_one_epoch_run_gets_whole_epoch_ticks_and_a_bounded_log_axis(error):
    fig = report.curves_figure(one_epoch_metrics(error), 1, "train")
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [1.0], (ax.get_title(), ticks)
    log_ax = fig.axes[2]
    assert log_ax.get_yscale() == "log"
    low, high = log_ax.get_ylim()
    assert low < 100 * error < high <= 110
    report._pyplot().close(fig)


def test_the_deformation_title_of_a_no_augment_run_fits_the_figure(synthetic_mnist, tmp_path):
    run = results.load_run(train(tmp_path / "run", "--no-augment"))
    images, labels = synthetic_mnist.train_images, synthetic_mnist.train_labels
    note = report.draw_deformations(run, images, labels, tmp_path / "deformations.png")
    assert note.endswith("NOT used by this run (--no-augment)")
    indices = report.one_of_each_digit(labels)
    deformed = [images[indices]] * report.DEFORMED_EPOCHS
    fig = report.deformations_figure(images[indices], deformed, range(1, report.DEFORMED_EPOCHS + 1),
                                     ["a title line long enough to be cut at the figure's edge " * 2,
                                      "NOT used by this run (--no-augment)"])
    fig.canvas.draw()
    title = fig.axes[0].title
    box = title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)
    assert title.get_text().count("\n") >= 2
    report._pyplot().close(fig)


def test_a_one_epoch_report_speaks_in_the_singular(synthetic_mnist, tmp_path):
    run = train(tmp_path / "run", "--epochs", "1", "--test-images", "1")
    assert report.main([str(run)]) == 0
    markdown = (run / "report.md").read_text()
    assert "1 of 1 epoch," in markdown and "1 test image;" in markdown and "(1 snapshot)" in markdown
    assert "1 epochs" not in markdown and "1 test images" not in markdown
    assert results.plural(1, "misclassified test digit") == "1 misclassified test digit"
    assert results.plural(10000, "test digit") == "10,000 test digits"
    assert results.plural(2, "launch", "launches") == "2 launches"
    assert results.plural(None, "training image") == "? training images"


def test_summary_table_puts_the_paper_beside_a_paper_net(tmp_path):
    summary = {"test_error_at_best_val": 0.0123, "best_val_epoch": 7, "best_test_error": 0.011,
               "best_test_epoch": 9, "epochs_completed": 10, "total_seconds": 4000.0, "device": "NVIDIA H100"}
    run = results.FinishedRun(tmp_path, {"sizes": nets.layer_sizes(nets.PAPER_NETS[4]), "settings": {}}, summary, [])
    table = report.summary_table(run)
    assert "| this run | 1.23% (epoch 7) | 1.10% (epoch 9) | 10 | 66.7 min on NVIDIA H100 |" in table
    assert "| paper, net 4 | 0.35% | 0.32% | 800 | 114.5 h on a GTX 280 |" in table
    run.config["sizes"] = nets.layer_sizes([300])
    assert "paper" not in report.summary_table(run)


@pytest.mark.parametrize("device, engine", [("cpu (numpy reference)", "reference"),
                                            ("emulated GPU path (CPU emulator)", "emulator"),
                                            ("NVIDIA H100 80GB HBM3", "cuda")])
def test_deformations_come_from_the_code_the_run_used(device, engine):
    assert report.deformation_engine(device) == engine


def test_emulated_kernel_samples_match_the_reference():
    images = synthetic_digits(4, seed=3)
    labels = np.array([1, 7, 3, 0], np.int32)
    indices = np.array([5, 0, 123, 59999], np.int32)
    emulated = report.deform_with("emulator", images, labels, indices, 11, 2, DeformConfig())
    reference = report.deform_with("reference", images, labels, indices, 11, 2, DeformConfig())
    np.testing.assert_allclose(emulated, reference, atol=1e-4, rtol=0)
    assert np.abs(reference - images).max() > 0.5   # a real deformation, not the identity


def test_missing_or_unfinished_run_dirs_are_one_line_errors(synthetic_mnist, tmp_path, capsys):
    one_error_line(capsys, report.main([str(tmp_path / "nowhere")]), "no such run directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(capsys, report.main([str(empty)]), "no config.json")
    run = train(tmp_path / "run")
    (run / "predictions.npz").unlink()
    one_error_line(capsys, report.main([str(run)]), "no predictions.npz")
    (run / "summary.json").unlink()
    one_error_line(capsys, report.main([str(run)]), "no summary.json")


def test_command_line_help_and_error_without_traceback(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "gpumlp.report", "--help"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout
    assert "RUN_DIR" in help_text and "--data-dir" in help_text
    failed = subprocess.run([sys.executable, "-m", "gpumlp.report", str(tmp_path / "missing")],
                            capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("error:") and len(failed.stderr.strip().splitlines()) == 1
