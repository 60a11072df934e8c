"""The training loop, shared by every device: epochs, learning-rate schedule, evaluation, and what
goes into the run directory. The trainer object (CpuTrainer or DeviceTrainer) does the arithmetic."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from gpumlp.config import TrainConfig
from gpumlp.errors import ConfigError, UserError
from gpumlp.rundir import RunDir, snapshot_epochs, weights_sha256


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run directory keeps the last good checkpoint."""

    exit_code = 3


@dataclass
class Split:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def make_split(mnist, config: TrainConfig) -> Split:
    """Training, validation and test arrays for the run.

    `train`: validate on the undeformed training images (the net only ever sees them deformed).
    `holdout`: the last sixth of the training images (10,000 of 60,000) is held out."""
    n_train = min(config.train_images or len(mnist.train_labels), len(mnist.train_labels))
    n_test = min(config.test_images or len(mnist.test_labels), len(mnist.test_labels))
    images, labels = mnist.train_images[:n_train], mnist.train_labels[:n_train]
    test_images, test_labels = mnist.test_images[:n_test], mnist.test_labels[:n_test]
    if config.validation == "holdout":
        n_val = max(1, n_train // 6)
        if n_train - n_val < 1:
            raise ConfigError("--validation holdout needs at least 2 training images")
        return Split(images[:-n_val], labels[:-n_val], images[-n_val:], labels[-n_val:], test_images, test_labels)
    return Split(images, labels, images, labels, test_images, test_labels)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` presents the n training images; a function of (seed, epoch)
    alone so that a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch, 0x0D0E]).permutation(n).astype(np.int32)


def error_rate(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) != labels)) if len(labels) else 0.0


class Progress:
    """A one-line progress bar on stderr for long epochs, only when stderr is a terminal."""

    def __init__(self, total: int, epoch: int):
        self.total, self.epoch = total, epoch
        self.enabled = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < 0.5:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r  epoch {self.epoch}: {done}/{self.total} images, {rate:,.0f} img/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\r" + " " * 70 + "\r")


EPOCH_HEADER = f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'train_err%':>10} {'val_err%':>8} {'test_err%':>9} {'seconds':>8}"


def format_record(r: dict) -> str:
    return (f"{r['epoch']:>5} {r['lr']:>9.3g} {r['train_loss']:>10.5f} {100 * r['train_error']:>10.3f} "
            f"{100 * r['val_error']:>8.3f} {100 * r['test_error']:>9.3f} {r['seconds']:>8.2f}")


class Run:
    """Drives a trainer through the epochs and keeps the run directory current."""

    def __init__(self, config: TrainConfig, split: Split, trainer, run_dir: RunDir, out=print):
        self.config, self.split, self.trainer, self.run_dir, self.out = config, split, trainer, run_dir, out
        self.records: list[dict] = []
        self.best = {"epoch": 0, "val_error": math.inf}
        self.best_val_probs = None
        self.final_probs = None
        self.last_good = (0, trainer.get_state())
        self.checkpointed_epoch = -1
        self.snapshots = snapshot_epochs(config.epochs)

    def resume(self) -> int:
        """Load the last checkpoint into the trainer; returns the first epoch still to run."""
        epoch, state, best = self.run_dir.load_checkpoint()
        self.trainer.set_state(state)
        self.best = best
        self.records = [r for r in self.run_dir.read_metrics() if r["epoch"] <= epoch]
        self.run_dir.write_metrics(self.records)
        predictions = self.run_dir.path / "predictions.npz"
        if predictions.exists():
            with np.load(predictions) as data:
                self.best_val_probs = data["best_val_probs"]
                self.final_probs = data["final_probs"]
        self.last_good = (epoch, state)
        self.checkpointed_epoch = epoch
        return epoch + 1

    def train(self, first_epoch: int = 1) -> dict:
        self.out(EPOCH_HEADER)
        for record in self.records:
            self.out(format_record(record))
        for epoch in range(first_epoch, self.config.epochs + 1):
            self.run_epoch(epoch)
        self.checkpoint()
        return self.write_summary()

    def run_epoch(self, epoch: int) -> None:
        config, split = self.config, self.split
        started = time.perf_counter()
        lr = config.learning_rate(epoch)
        order = epoch_order(config.seed, epoch, len(split.train_labels))
        progress = Progress(len(order), epoch)
        train_loss, train_error = self.trainer.train_epoch(epoch, lr, order, progress)
        progress.close()
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"the training loss became {train_loss} in epoch {epoch} (learning rate {lr:g}); "
                f"the run directory keeps epoch {self.last_good[0]}: lower --lr and start again")
        val_probs = self.trainer.predict_probs(split.val_images)
        test_probs = self.trainer.predict_probs(split.test_images)
        record = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_error": train_error,
                  "val_error": error_rate(val_probs, split.val_labels),
                  "test_error": error_rate(test_probs, split.test_labels),
                  "seconds": time.perf_counter() - started}
        self.records.append(record)
        self.run_dir.write_metrics(self.records)
        state = self.trainer.get_state()
        self.final_probs = test_probs
        if record["val_error"] < self.best["val_error"]:
            self.best = {"epoch": epoch, "val_error": record["val_error"]}
            self.best_val_probs = test_probs
            self.run_dir.save_best(epoch, state["params"])
        if epoch in self.snapshots:
            self.run_dir.save_snapshot(epoch, state["params"][0][0])
        self.last_good = (epoch, state)
        if epoch % config.checkpoint_every == 0:
            self.checkpoint()
        self.write_summary()
        self.out(format_record(record))

    def checkpoint(self) -> None:
        """Save the state after the last completed epoch (never a half-trained one)."""
        epoch, state = self.last_good
        if epoch == self.checkpointed_epoch or epoch == 0:
            return
        self.run_dir.save_checkpoint(epoch, state, self.best)
        if self.best_val_probs is not None:
            self.run_dir.save_predictions(self.best_val_probs, self.final_probs, self.split.test_labels)
        self.checkpointed_epoch = epoch

    def write_summary(self) -> dict:
        records = self.records
        epoch, state = self.last_good
        best_val = next((r for r in records if r["epoch"] == self.best["epoch"]), None)
        best_test = min(records, key=lambda r: r["test_error"]) if records else None
        summary = {
            "epochs_completed": epoch,
            "epochs_planned": self.config.epochs,
            "sizes": self.config.sizes,
            "best_val_epoch": self.best["epoch"],
            "val_error_at_best": best_val["val_error"] if best_val else None,
            "test_error_at_best_val": best_val["test_error"] if best_val else None,
            "best_test_error": best_test["test_error"] if best_test else None,
            "best_test_epoch": best_test["epoch"] if best_test else None,
            "final_test_error": records[-1]["test_error"] if records else None,
            "total_seconds": sum(r["seconds"] for r in records),
            "device": self.trainer.device_name,
            "weights_sha256": weights_sha256(state["params"]),
        }
        self.run_dir.write_summary(summary)
        return summary
