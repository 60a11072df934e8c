"""Finished runs as the result commands (report, committee, paper_table, studies) read them, and
the formatting they share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpumlp import nets
from gpumlp.rundir import RunDir, RunDirError

PAPER_EPOCHS = 800


# -- reading a run ---------------------------------------------------------------------------------
@dataclass
class FinishedRun:
    path: Path
    config: dict
    summary: dict
    metrics: list

    @property
    def sizes(self) -> list:
        return self.config["sizes"]

    @property
    def settings(self) -> dict:
        return self.config["settings"]


def load_run(path) -> FinishedRun:
    """A run directory that has finished at least one epoch; RunDirError (one line) otherwise."""
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    config = run_dir.load_config()
    summary = run_dir.read_summary()
    if summary.get("test_error_at_best_val") is None:
        raise RunDirError(f"{path}: summary.json has no finished epoch yet")
    return FinishedRun(run_dir.path, config, summary, run_dir.read_metrics())


def load_predictions(path) -> tuple[np.ndarray, np.ndarray]:
    """(best_val_probs (N, 10), test_labels (N,)) of a run directory."""
    file = Path(path) / "predictions.npz"
    if not file.is_file():
        raise RunDirError(f"{path}: no predictions.npz (the run has not written a checkpoint yet)")
    with np.load(file) as data:
        return np.array(data["best_val_probs"]), np.array(data["test_labels"])


def load_split(settings: dict, data_dir=None):
    """The training, validation and test arrays a run used (training.Split), from data_dir or else
    the data directory the run recorded; never downloads."""
    from gpumlp import data   # looked up at call time, so a test can substitute load_mnist
    from gpumlp.config import TrainConfig
    from gpumlp.training import make_split
    config = TrainConfig.from_dict(settings)
    return make_split(data.load_mnist(data_dir or config.data_dir, download=False), config)


def paper_net_id(sizes) -> int | None:
    """The paper's net (1-5) with exactly these layer sizes, else None."""
    for net, hidden in nets.PAPER_NETS.items():
        if list(sizes) == nets.layer_sizes(hidden):
            return net
    return None


# -- formatting ------------------------------------------------------------------------------------
def percent(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.2f}"


def plural(count: int | None, noun: str, plural_form: str | None = None) -> str:
    """'1 epoch', '2 epochs', '10,000 test digits', '? epochs' for an unknown count (plural_form for
    nouns that do not take an s)."""
    return f"{'?' if count is None else f'{count:,}'} {noun if count == 1 else plural_form or noun + 's'}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
