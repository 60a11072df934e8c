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
