"""`python -m gpumlp.evaluate RUN_DIR [--weights best|last] [--data-dir DIR]`: the test error and
the confusion matrix of a run's saved weights, computed anew by the numpy reference forward pass.

    best   best.npz, the weights of the best-validation epoch (the paper's first column)
    last   checkpoint.npz, the weights after the last checkpointed epoch

The test set is the run's own (its data directory, or --data-dir, and its --test-images). The error
the run recorded for that epoch is printed beside the new one: on the CPU they are equal; a GPU run
may differ by a digit where its float rounding differs from numpy's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gpumlp import nets
from gpumlp.commands import OneLineErrorParser, run_command
from gpumlp.data import NUM_CLASSES
from gpumlp.errors import UserError
from gpumlp.results import load_split, markdown_table, percent, plural
from gpumlp.rundir import RunDir, RunDirError, arrays_to_params

WEIGHTS = {"best": ("best.npz", "the best-validation epoch", "no epoch has finished yet"),
           "last": ("checkpoint.npz", "the last checkpoint", "no checkpoint has been written yet")}


def load_weights(run_path: Path, which: str) -> tuple[int, list]:
    """(epoch, [(W, b), ...]) from best.npz or checkpoint.npz."""
    file, _, why_missing = WEIGHTS[which]
    path = run_path / file
    if not path.is_file():
        raise RunDirError(f"{run_path}: no {file} for --weights {which} ({why_missing})")
    with np.load(path) as data:
        return int(data["epoch"]), arrays_to_params("", data)


def check_sizes(params, sizes: list, where: str) -> None:
    found = [params[0][0].shape[1], *(W.shape[0] for W, _ in params)] if params else []
    if found != list(sizes):
        raise RunDirError(f"{where} holds a {nets.describe(found) if found else 'empty'} net, but config.json "
                          f"says {nets.describe(sizes)}")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(10, 10) counts: row = true digit, column = the network's answer."""
    pairs = labels.astype(np.int64) * NUM_CLASSES + predicted
    return np.bincount(pairs, minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)


def confusion_markdown(matrix: np.ndarray) -> str:
    rows = []
    for digit, counts in enumerate(matrix):
        errors = int(counts.sum() - counts[digit])
        rows.append([f"**{digit}**", *(int(c) for c in counts), errors,
                     percent(errors / counts.sum()) if counts.sum() else "n/a"])
    return markdown_table(["true \\ answer", *map(str, range(NUM_CLASSES)), "errors", "error [%]"], rows)


def evaluate(run_path, which: str = "best", data_dir=None) -> str:
    """The markdown report: which weights, the test error (and the run's own record), the matrix."""
    from gpumlp.train_cpu import predict_probs
    run_dir = RunDir(run_path)
    if not run_dir.path.is_dir():
        raise RunDirError(f"{run_path}: no such run directory")
    config = run_dir.load_config()
    if "sizes" not in config:   # (load_config has checked the settings)
        raise RunDirError(f"{run_path}/config.json records no layer sizes: not a run directory")
    file, meaning, _ = WEIGHTS[which]
    epoch, params = load_weights(run_dir.path, which)
    check_sizes(params, config["sizes"], f"{run_path}/{file}")
    split = load_split(config["settings"], data_dir)
    labels = split.test_labels
    predictions = run_dir.path / "predictions.npz"
    if predictions.is_file():
        with np.load(predictions) as saved:
            if not np.array_equal(saved["test_labels"], labels):
                raise UserError(f"{run_path}: the test labels the run saved differ from the test set "
                                "loaded now; pass the run's data with --data-dir")
    predicted = predict_probs(params, split.test_images).argmax(axis=1)
    matrix = confusion_matrix(labels, predicted)
    wrong = int(len(labels) - np.trace(matrix))
    record = next((r for r in run_dir.read_metrics() if r["epoch"] == epoch), None)
    recorded = f"; the run recorded {percent(record['test_error'])}%" if record else ""
    return (f"## {run_path}: {nets.describe(config['sizes'])}, {file} (epoch {epoch}, {meaning})\n\n"
            f"Test error: **{percent(wrong / max(len(labels), 1))}%** ({wrong} of "
            f"{plural(len(labels), 'test digit')} misclassified, numpy reference forward pass){recorded}.\n\n"
            "Confusion matrix (rows: the true digit; columns: the network's answer):\n\n"
            + confusion_markdown(matrix))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m gpumlp.evaluate",
        description="Test error and confusion matrix of a run's saved weights on the run's test set, "
                    "computed by the numpy reference forward pass (no GPU needed).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by reproduce_2010.py")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="best",
                        help="best: best.npz, the best-validation epoch (default); last: checkpoint.npz, "
                             "the last checkpointed epoch")
    parser.add_argument("--data-dir", help="MNIST directory, when it is not the one the run recorded")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        print(evaluate(args.run_dir, args.weights, args.data_dir), end="")
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
