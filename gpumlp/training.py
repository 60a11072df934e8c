"""The training loop, shared by every device: epochs, learning-rate schedule, evaluation, and what
goes into the run directory. The trainer object (CpuTrainer or DeviceTrainer) does the arithmetic."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from gpumlp import stop_signals
from gpumlp.config import TrainConfig
from gpumlp.errors import ConfigError, UserError
from gpumlp.results import duration
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


@dataclass
class EpochCursor:
    """How far epoch `epoch` has got: the training images its whole steps have taken, the float64
    sum of their losses (in step order) and the count of their errors, and the seconds spent on it
    in earlier sessions. A trainer that resumes mid-epoch advances it after each whole step."""

    epoch: int
    images: int = 0
    loss_total: float = 0.0
    wrong_total: int = 0
    seconds: float = 0.0

    def advance(self, images: int, loss_sum: float, wrong: int) -> None:
        self.images += images
        self.loss_total += loss_sum
        self.wrong_total += wrong


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


def clamp_notes(mnist, config: TrainConfig) -> list[str]:
    """What the run uses where a setting asks for more than there is (make_split and the trainers
    clamp silently; the command prints these lines)."""
    notes = []
    for flag, asked, name, available in (("--train-images", config.train_images, "training", len(mnist.train_labels)),
                                         ("--test-images", config.test_images, "test", len(mnist.test_labels))):
        if asked is not None and asked > available:
            notes.append(f"{flag} {asked:,}: the data has {count(available, name + ' image')}; using all {available:,}")
    n_train = len(make_split(mnist, config).train_labels)
    if config.batch_size > n_train:
        notes.append(f"--batch-size {config.batch_size:,} is more than the {count(n_train, 'training image')}: "
                     f"each step takes all {n_train:,}")
    return notes


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` presents the n training images; a function of (seed, epoch)
    alone so that a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch, 0x0D0E]).permutation(n).astype(np.int32)


def error_rate(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) != labels)) if len(labels) else 0.0


def count(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs', '60,000 images'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def long_duration(seconds: float) -> str:
    text = duration(seconds)
    return f"{text} ({seconds / 86400:.1f} days)" if seconds >= 2 * 86400 else text


PLAIN_PROGRESS_SECONDS = 30  # without a terminal, one progress line at most this often


class Progress:
    """Progress of one epoch's stages ('deforming', 'training') on `stream`: on a terminal a tqdm bar
    with images/s and the stage's ETA, cleared when the epoch ends or is interrupted; otherwise a
    plain line at most every PLAIN_PROGRESS_SECONDS (so logs of batch jobs stay readable)."""

    def __init__(self, total: int, epoch: int, stream=None):
        self.total, self.epoch = total, epoch
        self.stream = stream or sys.stderr
        self.on_terminal = self.stream.isatty()
        self.bar = None
        self.stage = None
        self.stage_started = self.last_line = time.perf_counter()

    def __call__(self, done: int, stage: str = "training") -> None:
        if stage != self.stage:
            self.stage, self.stage_started = stage, time.perf_counter()
            if self.bar is not None:
                self.bar.reset(self.total)
                self.bar.set_description(f"epoch {self.epoch} {stage}")
        if self.on_terminal:
            with stop_signals.held():  # a bar half made would be left on the screen
                if self.bar is None:
                    self.bar = tqdm(total=self.total, desc=f"epoch {self.epoch} {stage}", unit="img",
                                    file=self.stream, leave=False, dynamic_ncols=True, mininterval=0.5)
                self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last_line >= PLAIN_PROGRESS_SECONDS and done:
            self.last_line = now
            rate = done / max(now - self.stage_started, 1e-9)
            print(f"  epoch {self.epoch} {stage}: {done:,}/{self.total:,} images, {rate:,.1f} images/s, "
                  f"{duration((self.total - done) / rate)} to the end of the stage", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


EPOCH_HEADER = f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'train_err%':>10} {'val_err%':>8} {'test_err%':>9} {'seconds':>8}"


def format_record(r: dict) -> str:
    return (f"{r['epoch']:>5} {r['lr']:>9.3g} {r['train_loss']:>10.5f} {100 * r['train_error']:>10.3f} "
            f"{100 * r['val_error']:>8.3f} {100 * r['test_error']:>9.3f} {r['seconds']:>8.2f}")


class Run:
    """Drives a trainer through the epochs and keeps the run directory current."""

    def __init__(self, config: TrainConfig, split: Split, trainer, run_dir: RunDir, out=print,
                 progress_stream=None):
        """The run directory already holds the epoch-0 checkpoint (RunDir.create)."""
        self.config, self.split, self.trainer, self.run_dir, self.out = config, split, trainer, run_dir, out
        self.progress_stream = progress_stream
        self.records: list[dict] = []
        self.best = {"epoch": 0, "val_error": math.inf}
        self.best_val_probs = None
        self.final_probs = None
        self.last_good = (0, trainer.get_state())
        # Trainers with `resumes_mid_epoch` (the CPU one) are checkpointed inside an epoch too.
        self.in_progress: EpochCursor | None = None   # the epoch being trained, while it is
        self.resume_cursor: EpochCursor | None = None  # where the checkpoint resumed from stood
        self.epoch_started = time.perf_counter()
        self.checkpointed = (0, 0)  # (last finished epoch, images of the next) checkpoint.npz holds
        self.checkpointed_at = time.monotonic()
        self.session_seconds: list[float] = []
        self.snapshots = snapshot_epochs(config.epochs)

    def resume(self) -> int:
        """Load the last checkpoint into the trainer; returns the first epoch still to run."""
        epoch, state, best = self.run_dir.load_checkpoint()
        in_progress = self.run_dir.epoch_in_progress()
        if in_progress and not getattr(self.trainer, "resumes_mid_epoch", False):
            path = self.run_dir.path
            raise UserError(f"{path}/checkpoint.npz was saved inside epoch {epoch + 1} ({in_progress['images']:,} of "
                            f"{count(len(self.split.train_labels), 'training image')}), and only the CPU trainer "
                            f"resumes inside an epoch: finish it with --resume {path} --device cpu --epochs {epoch + 1}, "
                            f"then resume on this device with --epochs {self.config.epochs}")
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
        self.resume_cursor = EpochCursor(**in_progress) if in_progress else None
        self.checkpointed = (epoch, in_progress["images"] if in_progress else 0)
        self.checkpointed_at = time.monotonic()
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
        cursor = self.resume_cursor if self.resume_cursor and self.resume_cursor.epoch == epoch else EpochCursor(epoch)
        self.resume_cursor = None
        started = self.epoch_started = time.perf_counter() - cursor.seconds
        lr = config.learning_rate(epoch)
        order = epoch_order(config.seed, epoch, len(split.train_labels))
        progress = Progress(len(order), epoch, self.progress_stream)
        try:
            if getattr(self.trainer, "resumes_mid_epoch", False):
                self.in_progress = cursor
                train_loss, train_error = self.trainer.train_epoch(epoch, lr, order, progress, cursor=cursor,
                                                                   after_step=self.checkpoint_if_due)
            else:  # the device engines: checkpointed between epochs only
                train_loss, train_error = self.trainer.train_epoch(epoch, lr, order, progress)
        finally:
            progress.close()  # before any message: an interrupted bar leaves no trace
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"the training loss became {train_loss} in epoch {epoch} (learning rate {lr:g}); "
                f"the run directory keeps epoch {self.last_good[0]}: lower --lr and start again")
        val_probs = self.trainer.predict_probs(split.val_images)
        test_probs = self.trainer.predict_probs(split.test_images)
        with stop_signals.held():  # the epoch is recorded whole, or (on a stop before here) not at all
            self.commit_epoch(epoch, lr, train_loss, train_error, val_probs, test_probs, started)

    def commit_epoch(self, epoch, lr, train_loss, train_error, val_probs, test_probs, started) -> None:
        config, split = self.config, self.split
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
        self.in_progress = None
        if epoch % config.checkpoint_every == 0 or self.checkpoint_due():
            self.checkpoint()
        self.write_summary()
        self.session_seconds.append(record["seconds"])
        self.out(format_record(record) + self.run_eta(epoch))

    def run_eta(self, epoch: int) -> str:
        """'  run ETA ...' from the mean epoch time of this session, or '' after the last epoch."""
        left = self.config.epochs - epoch
        if not left:
            return ""
        return f"  run ETA {long_duration(left * sum(self.session_seconds) / len(self.session_seconds))}"

    def checkpoint_due(self) -> bool:
        return (time.monotonic() - self.checkpointed_at) / 60 >= self.config.checkpoint_minutes

    def checkpoint_if_due(self, cursor: EpochCursor) -> None:
        """Called by the trainer after each whole step: at least every --checkpoint-minutes, inside
        an epoch too."""
        if self.checkpoint_due():
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save the state after the last completed epoch or, inside an epoch of a trainer that
        resumes mid-epoch, after the last whole step (never a half-applied one: the trainer holds
        stop signals during a step). A non-finite loss so far keeps the last finished epoch."""
        epoch, state = self.last_good
        cursor = self.in_progress
        inside = cursor is not None and cursor.images > 0 and math.isfinite(cursor.loss_total)
        position = (epoch, cursor.images if inside else 0)
        if position == self.checkpointed:
            return
        if inside:
            state = self.trainer.get_state()
            cursor.seconds = time.perf_counter() - self.epoch_started
        self.run_dir.save_checkpoint(epoch, state, self.best, asdict(cursor) if inside else None)
        if self.best_val_probs is not None and epoch != self.checkpointed[0]:
            self.run_dir.save_predictions(self.best_val_probs, self.final_probs, self.split.test_labels)
        self.checkpointed = position
        self.checkpointed_at = time.monotonic()

    def saved_text(self) -> str:
        """What checkpoint.npz holds, for the stop message: 'epoch 3 is saved', or 'epoch 3 and 120
        of 60,000 training images of epoch 4 are saved'."""
        epoch, images = self.checkpointed
        if not images:
            return f"epoch {epoch} is saved"
        return f"epoch {epoch} and {images:,} of {count(len(self.split.train_labels), 'training image')} " \
               f"of epoch {epoch + 1} are saved"

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


# -- how long a run on the CPU will take -----------------------------------------------------------
CALIBRATION_SECONDS = 0.3  # time spent measuring each stage (at most CALIBRATION_CALLS calls)
CALIBRATION_CALLS = 20
CALIBRATION_IMAGES = {"deform": 256, "evaluate": 64}


def _seconds_per_call(action) -> float:
    """Mean time of calls after a warm-up one (first-call allocations and BLAS start-up are not
    the steady rate); a warm-up that alone takes CALIBRATION_SECONDS is the measure itself."""
    started = time.perf_counter()
    action()
    first = time.perf_counter() - started
    if first >= CALIBRATION_SECONDS:
        return first
    calls, started = 0, time.perf_counter()
    while True:
        action()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= CALIBRATION_SECONDS or calls >= CALIBRATION_CALLS:
            return elapsed / calls


def estimate_cpu_seconds(trainer, split: Split, config: TrainConfig, epochs: int) -> tuple[float, float]:
    """(seconds for `epochs` epochs, training images per second) of a CpuTrainer, timed on the first
    training images: steps, deformation and evaluation; the trainer's state is restored after."""
    n_train, batch = len(split.train_labels), min(config.batch_size, len(split.train_labels))
    images, labels = split.train_images[:batch], split.train_labels[:batch]
    saved = trainer.get_state()
    try:
        train = _seconds_per_call(lambda: trainer.step(images, labels, config.learning_rate(1))) / batch
    finally:
        trainer.set_state(saved)
    deform = 0.0
    if config.augment:
        from gpumlp.deform import deform_images_ref
        k = min(n_train, CALIBRATION_IMAGES["deform"])
        deform = _seconds_per_call(lambda: deform_images_ref(
            split.train_images[:k], split.train_labels[:k], None, config.seed, 1, config.deform_config())) / k
    k = min(n_train, CALIBRATION_IMAGES["evaluate"])
    evaluate = _seconds_per_call(lambda: trainer.predict_probs(split.train_images[:k])) / k
    per_epoch = n_train * (train + deform) + (len(split.val_labels) + len(split.test_labels)) * evaluate
    return epochs * per_epoch, 1 / (train + deform)
