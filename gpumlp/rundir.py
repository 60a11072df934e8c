"""The run directory: what a training run leaves behind, always written atomically.

    config.json           every setting (the plan, updated when a resume changes it), the code
                          version, the device
    train.log             everything the command printed, appended on every resume
    metrics.jsonl / .csv  one record per epoch (METRIC_FIELDS)
    checkpoint.npz        parameters and velocities after the last checkpointed epoch (resume);
                          epoch 0 (the initial weights) from the moment the directory exists;
                          or, saved inside an epoch, after the whole steps done in the next one,
                          with that position (IN_PROGRESS_FIELDS: images done, loss and error totals)
    best.npz              parameters at the epoch of best validation error
    predictions.npz       test-set softmax outputs at the best-validation epoch and at the end
    snapshots/epoch_NNNN.npz  first-layer weights and the metrics so far, for the report's GIF
    summary.json          the paper's two columns, total time, weights_sha256
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from gpumlp import stop_signals
from gpumlp.errors import UserError

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_error", "val_error", "test_error", "seconds"]
SNAPSHOT_UNITS = 100
# A checkpoint saved inside an epoch: that epoch, the training images done in it (whole steps), the
# float64 sum of their losses and the count of their errors (so the epoch's train_loss and
# train_error come out as in an uninterrupted run), and the seconds it had taken.
IN_PROGRESS_FIELDS = {"epoch": np.int64, "images": np.int64, "loss_total": np.float64,
                      "wrong_total": np.int64, "seconds": np.float64}


_UMASK = os.umask(0)
os.umask(_UMASK)


class RunDirError(UserError):
    """A run directory that cannot be used (missing, incomplete, or from another configuration)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file, and
    a stop signal waits until the rename is done."""
    with stop_signals.held():
        _write_then_rename(Path(path), data)


def _write_then_rename(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_npz(path: Path, **arrays) -> None:
    """Signals are held while the archive is built too: a StopRequested raised inside np.savez's
    ZipFile would be replaced by ZipFile's own error on closing a half-written member."""
    with stop_signals.held():
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())


def code_version() -> str:
    """The package version plus the git commit (and '-dirty') when run from a checkout."""
    from gpumlp import __version__
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not commit:
        return __version__
    return f"{__version__}+g{commit}{'-dirty' if dirty else ''}"


def weights_sha256(params) -> str:
    """SHA-256 of the parameters in a fixed order: W1, b1, W2, b2, ... each as little-endian
    float32 in C (row-major) order. Two runs with equal hashes ended with identical weights."""
    digest = hashlib.sha256()
    for W, b in params:
        for array in (W, b):
            digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


def params_to_arrays(prefix: str, pairs) -> dict:
    arrays = {}
    for layer, (W, b) in enumerate(pairs):
        arrays[f"{prefix}W{layer}"] = W
        arrays[f"{prefix}b{layer}"] = b
    return arrays


def arrays_to_params(prefix: str, arrays) -> list:
    pairs, layer = [], 0
    while f"{prefix}W{layer}" in arrays:
        pairs.append((np.array(arrays[f"{prefix}W{layer}"]), np.array(arrays[f"{prefix}b{layer}"])))
        layer += 1
    return pairs


def default_run_dir(base: str = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / stamp
    suffix = 1
    while path.exists():
        path = Path(base) / f"{stamp}-{suffix}"
        suffix += 1
    return path


def read_config(file: Path) -> dict:
    """A config.json as reproduce_2010.py writes it (a "settings" object at least); RunDirError
    with one line otherwise."""
    try:
        config = json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{file} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirError(f"{file} is not valid JSON ({error})") from None
    except OSError as error:
        raise RunDirError(f"{file} cannot be read ({error.strerror or error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise RunDirError(f'{file} has no "settings": not a config.json written by reproduce_2010.py')
    return config


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    # -- creation and resume -------------------------------------------------------------------
    def check_new(self) -> None:
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            hint = (f"continue it with --resume {self.path}" if (self.path / "config.json").is_file()
                    else "it is not a run directory")
            raise RunDirError(f"run directory {self.path} already exists and is not empty; "
                              f"choose another --out ({hint})")

    def create(self, config: dict, initial_state: dict) -> None:
        """The directory appears whole or not at all: config.json, empty metrics and the epoch-0
        checkpoint (initial_state, the weights before training) are written into a hidden sibling,
        which is then renamed into place. So a run directory is always resumable."""
        self.check_new()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with stop_signals.held():
            staging = RunDir(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"))
            try:
                os.chmod(staging.path, 0o777 & ~_UMASK)  # mkdtemp creates 0700
                (staging.path / "snapshots").mkdir()
                atomic_write_json(staging.path / "config.json", config)
                staging.write_metrics([])
                staging.save_checkpoint(0, initial_state, {"epoch": 0, "val_error": np.inf})
                if self.path.exists():
                    self.path.rmdir()  # empty, as checked
                os.rename(staging.path, self.path)
            except BaseException:
                shutil.rmtree(staging.path, ignore_errors=True)
                raise

    def load_config(self) -> dict:
        if not (self.path / "config.json").is_file():
            raise RunDirError(f"{self.path} is not a run directory (no config.json)")
        return read_config(self.path / "config.json")

    def update_config(self, changes: dict, facts: dict | None = None) -> None:
        """Records settings a resume changed (a longer plan, another device...) in config.json, and
        `facts` of the resumed run beside them (the engine it trains with)."""
        config = self.load_config()
        config["settings"] = {**config["settings"], **changes}
        config.update(facts or {})
        atomic_write_json(self.path / "config.json", config)

    def log_path(self) -> Path:
        return self.path / "train.log"

    # -- metrics -------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_metrics(self, records: list[dict]) -> None:
        """Rewrites both metric files whole, so a resumed run drops epochs after its checkpoint."""
        atomic_write_bytes(self.path / "metrics.jsonl",
                           "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        atomic_write_bytes(self.path / "metrics.csv", text.getvalue().encode())

    # -- parameters ----------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, state: dict, best: dict, in_progress: dict | None = None) -> None:
        """`epoch`: the last finished epoch. `in_progress` (IN_PROGRESS_FIELDS): where the next epoch
        had got when `state` was taken, inside it; None: `state` is the state after `epoch`."""
        position = {f"in_progress_{name}": dtype(in_progress[name]) for name, dtype in IN_PROGRESS_FIELDS.items()
                    } if in_progress is not None else {}
        atomic_write_npz(self.path / "checkpoint.npz", epoch=np.int64(epoch),
                         best_epoch=np.int64(best.get("epoch", 0)),
                         best_val_error=np.float64(best.get("val_error", np.inf)),
                         **position,
                         **params_to_arrays("", state["params"]),
                         **params_to_arrays("velocity_", state["velocities"]))

    def epoch_in_progress(self) -> dict | None:
        """The position inside an epoch that checkpoint.npz was saved at (IN_PROGRESS_FIELDS), or
        None where it holds the state after a finished epoch (and in checkpoints older than this)."""
        with self._open_checkpoint() as data:
            if "in_progress_epoch" not in data:
                return None
            return {name: dtype(data[f"in_progress_{name}"]).item() for name, dtype in IN_PROGRESS_FIELDS.items()}

    def load_checkpoint(self):
        """(last finished epoch, state, best) of checkpoint.npz; epoch_in_progress says whether the
        state is that epoch's or one inside the next."""
        with self._open_checkpoint() as data:
            state = {"params": arrays_to_params("", data),
                     "velocities": arrays_to_params("velocity_", data)}
            best = {"epoch": int(data["best_epoch"]), "val_error": float(data["best_val_error"])}
            epoch = int(data["epoch"])
        if not state["params"]:
            raise RunDirError(f"{self.path / 'checkpoint.npz'} holds no weights; the run cannot be resumed")
        return epoch, state, best

    def checkpoint_epoch(self) -> int:
        """The last finished epoch checkpoint.npz holds (0: the initial weights)."""
        with self._open_checkpoint() as data:
            return int(data["epoch"])

    @contextlib.contextmanager
    def _open_checkpoint(self):
        """checkpoint.npz's arrays; RunDirError with one line where it is missing or unreadable."""
        path = self.path / "checkpoint.npz"
        if not path.exists():
            raise RunDirError(f"{self.path} has no checkpoint.npz to resume from")
        try:
            with np.load(path) as data:
                yield data
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise RunDirError(f"{path} is unreadable ({error}); the run cannot be resumed") from None

    def save_best(self, epoch: int, params) -> None:
        atomic_write_npz(self.path / "best.npz", epoch=np.int64(epoch), **params_to_arrays("", params))

    def load_params(self, which: str = "best"):
        """'best' (best validation epoch) or 'checkpoint' (last checkpoint)."""
        path = self.path / f"{which}.npz"
        if not path.exists():
            raise RunDirError(f"{path} not found")
        with np.load(path) as data:
            return arrays_to_params("", data)

    def save_predictions(self, best_val_probs, final_probs, test_labels) -> None:
        atomic_write_npz(self.path / "predictions.npz", best_val_probs=best_val_probs,
                         final_probs=final_probs, test_labels=test_labels)

    def save_snapshot(self, epoch: int, first_layer_W: np.ndarray) -> None:
        atomic_write_npz(self.path / "snapshots" / f"epoch_{epoch:04d}.npz", epoch=np.int64(epoch),
                         W=first_layer_W[:SNAPSHOT_UNITS].astype(np.float16))

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def read_summary(self) -> dict:
        path = self.path / "summary.json"
        if not path.exists():
            raise RunDirError(f"{self.path} has no summary.json (the run has not finished an epoch)")
        return json.loads(path.read_text())


def snapshot_epochs(epochs: int, count: int = 40) -> set[int]:
    """Epochs at which to keep a first-layer snapshot: dense early (where the filters change most),
    geometric later, always the last; at most about `count` files whatever the run length."""
    chosen = {1, epochs}
    value = 1.0
    ratio = max(epochs, 2) ** (1.0 / max(count - 1, 1))
    while value < epochs:
        chosen.add(int(round(value)))
        value = max(value * ratio, value + 1)
    return {e for e in chosen if 1 <= e <= epochs}
