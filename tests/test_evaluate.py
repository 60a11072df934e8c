"""`python -m gpumlp.evaluate`: the test error and confusion matrix of a run's saved weights, checked
against what the run itself recorded (the same numpy forward pass on the CPU, so exactly equal)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_synthetic_mnist
from gpumlp import evaluate
from test_studies import ROOT, one_error_line, summary, train


def matrix_rows(printed):
    """The confusion matrix's ten rows as integer arrays (10 counts each)."""
    rows = [line for line in printed.splitlines() if line.startswith("| **")]
    return np.array([[int(cell) for cell in line.strip("|").split("|")[1:11]] for line in rows])


@pytest.mark.parametrize("weights", ["best", "last"])
def test_evaluate_reproduces_the_recorded_test_error(synthetic_mnist, tmp_path, capsys, weights):
    run = train(tmp_path / "run", "--epochs", "3", "--checkpoint-every", "1")
    s = summary(run)
    capsys.readouterr()
    assert evaluate.main([str(run), "--weights", weights]) == 0
    printed = capsys.readouterr().out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = s["best_val_epoch"] if weights == "best" else 3
    error = next(r["test_error"] for r in metrics if r["epoch"] == epoch)
    assert f"(epoch {epoch}, " in printed
    n = len(synthetic_mnist.test_labels)
    wrong = round(error * n)
    assert f"Test error: **{100 * error:.2f}%** ({wrong} of {n} test digits misclassified" in printed
    assert f"the run recorded {100 * error:.2f}%" in printed

    matrix = matrix_rows(printed)
    np.testing.assert_array_equal(matrix.sum(axis=1), np.bincount(synthetic_mnist.test_labels, minlength=10))
    assert matrix.sum() - np.trace(matrix) == wrong
    if weights == "best":       # the same answers as the run's saved test outputs at that epoch
        with np.load(run / "predictions.npz") as saved:
            answers, labels = saved["best_val_probs"].argmax(axis=1), saved["test_labels"]
        np.testing.assert_array_equal(matrix, evaluate.confusion_matrix(labels, answers))


def test_confusion_matrix_counts_true_digit_by_answer():
    labels = np.array([0, 0, 1, 9, 9, 9])
    answers = np.array([0, 1, 1, 9, 4, 9])
    matrix = evaluate.confusion_matrix(labels, answers)
    assert matrix[0, 0] == 1 and matrix[0, 1] == 1 and matrix[1, 1] == 1 and matrix[9, 9] == 2
    assert matrix[9, 4] == 1 and matrix.sum() == 6
    assert "| **9** | 0 | 0 | 0 | 0 | 1 | 0 | 0 | 0 | 0 | 2 | 1 | 33.33 |" in evaluate.confusion_markdown(matrix)


def test_bad_run_directories_are_one_line_errors(synthetic_mnist, tmp_path, capsys, monkeypatch):
    one_error_line(capsys, evaluate.main([str(tmp_path / "nowhere")]), "no such run directory")
    (tmp_path / "empty").mkdir()
    one_error_line(capsys, evaluate.main([str(tmp_path / "empty")]), "no config.json")
    run = train(tmp_path / "run", "--epochs", "1")
    with pytest.raises(SystemExit) as exit_code:
        evaluate.main([str(run), "--weights", "first"])
    assert exit_code.value.code == 2 and "invalid choice" in capsys.readouterr().err
    (run / "checkpoint.npz").unlink()
    one_error_line(capsys, evaluate.main([str(run), "--weights", "last"]), "no checkpoint.npz for --weights last")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "sizes": [841, 9, 10]}))
    one_error_line(capsys, evaluate.main([str(run)]), "holds a 841-8-10 net, but config.json says 841-9-10")
    (run / "config.json").write_text(json.dumps(config))
    other = make_synthetic_mnist(seed=1)
    monkeypatch.setattr("gpumlp.data.load_mnist", lambda *args, **kwargs: other)
    one_error_line(capsys, evaluate.main([str(run)]), "pass the run's data with --data-dir")
    (run / "best.npz").unlink()
    one_error_line(capsys, evaluate.main([str(run)]), "no best.npz for --weights best")


def test_command_line_help_and_error_without_traceback(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "gpumlp.evaluate", "--help"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout
    assert "RUN_DIR" in help_text and "--weights" in help_text and "--data-dir" in help_text
    failed = subprocess.run([sys.executable, "-m", "gpumlp.evaluate", str(tmp_path / "missing")],
                            capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("error:") and len(failed.stderr.strip().splitlines()) == 1
