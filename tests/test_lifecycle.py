"""A run's lifecycle, the way users and clusters stop it: real signals sent to a real
`reproduce_2010.py` process (on small synthetic digits, --device cpu), then resumed.

The child process is `python -c DRIVER ARGS...`: it substitutes the synthetic digits for MNIST (as
the `synthetic_mnist` fixture does in-process), can slow each training step down (STEP_SLEEP) so a
signal lands inside an epoch, and can slow the rename of checkpoint.npz (SLOW_CHECKPOINT) so a
signal lands inside that write; then it runs gpumlp.cli.main, exactly what reproduce_2010.py runs
(or the main of the module named by COMMAND)."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpumlp import cli
from gpumlp.config import TrainConfig
from gpumlp.rundir import RunDir

TESTS = Path(__file__).resolve().parent
N_TRAIN, N_TEST = 200, 50
DRIVER = f"""
import importlib, os, sys, time
sys.path.insert(0, {str(TESTS)!r})
from conftest import make_synthetic_mnist
import gpumlp.data
from gpumlp import cli, train_cpu
data = make_synthetic_mnist(n_train={N_TRAIN}, n_test={N_TEST})
gpumlp.data.load_mnist = lambda *args, **kwargs: data
step_sleep = float(os.environ.get("STEP_SLEEP", "0"))
if step_sleep:
    real_step = train_cpu.CpuTrainer.step
    def slow_step(self, *args):
        time.sleep(step_sleep)
        return real_step(self, *args)
    train_cpu.CpuTrainer.step = slow_step
checkpoint_sleep = float(os.environ.get("SLOW_CHECKPOINT", "0"))
if checkpoint_sleep:
    real_replace = os.replace
    def slow_replace(source, destination):
        if str(destination).endswith("checkpoint.npz"):
            print("renaming checkpoint.npz", file=sys.stderr, flush=True)
            time.sleep(checkpoint_sleep)
        real_replace(source, destination)
    os.replace = slow_replace
sys.exit(importlib.import_module(os.environ.get("COMMAND", "gpumlp.cli")).main(sys.argv[1:]))
"""
# 200 online steps of a tiny net, each slowed to >= 4 ms: an epoch lasts about a second.
SLOW = ["--device", "cpu", "--hidden", "8", "--batch-size", "1", "--no-augment", "--lr", "0.01"]
SLOW_ENV = {"STEP_SLEEP": "0.004"}


class Child:
    """The command in a subprocess; its stdout and stderr are read line by line as they come."""

    def __init__(self, args, env=None, ignoring=()):
        def ignore_signals():  # in the child before it starts, as nohup does
            for signum in ignoring:
                signal.signal(signum, signal.SIG_IGN)
        self.process = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], preexec_fn=ignore_signals,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(env or {})})
        self.lines, self.seen = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.process.kill()
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; seen: {self.seen}")
            if line is None:
                raise AssertionError(f"the command ended before {pattern!r}; it printed: {self.seen}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = 60) -> tuple[int, list[str]]:
        code = self.process.wait(timeout=timeout)
        while (line := self.lines.get(timeout=timeout)) is not None:
            self.seen.append(line)
        return code, self.seen


def epoch_line(epoch: int) -> str:
    return rf"^\s+{epoch}\s+\S+\s+\d"


def saved_line(word: str, out, epoch: int) -> str:
    """The stop line: the last finished epoch `epoch` and, where the stop came inside the next one
    after a step, the images of it that are saved too."""
    return (rf"{re.escape(word)}: epoch {epoch}( and (\d+) of {N_TRAIN} training images of epoch {epoch + 1} are| is) "
            rf"saved in {re.escape(str(out))}; continue with --resume {re.escape(str(out))}")


def images_saved(line: str, pattern: str) -> int:
    """The images of the epoch in progress that a stop line (matching `pattern`) says are saved."""
    match = re.fullmatch(pattern, line)
    assert match, (line, pattern)
    return int(match.group(2) or 0)


def metrics_without_seconds(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in RunDir(out).read_metrics()]


def run_in_process(*args, expect=0):
    code = cli.main([*map(str, args)])
    assert code == expect, f"exit code {code}, expected {expect}"


def sha(out) -> str:
    return json.loads((Path(out) / "summary.json").read_text())["weights_sha256"]


@pytest.fixture
def same_digits(monkeypatch):
    """The in-process command on the child's synthetic digits."""
    from conftest import make_synthetic_mnist
    data = make_synthetic_mnist(n_train=N_TRAIN, n_test=N_TEST)
    monkeypatch.setattr("gpumlp.data.load_mnist", lambda *args, **kwargs: data)
    return data


# -- 1, 2: any stop leaves the last finished epoch, and the advice printed is true -----------------
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "stopped by SIGTERM"),
                                                (signal.SIGHUP, 129, "stopped by SIGHUP")])
def test_a_signal_in_epoch_2_keeps_epoch_1_and_the_resumed_run_ends_like_an_uninterrupted_one(
        tmp_path, same_digits, signum, code, word):
    out = tmp_path / "cut"
    child = Child([*SLOW, "--epochs", "3", "--checkpoint-every", "100", "--out", out], SLOW_ENV)
    child.wait_for(epoch_line(1))
    child.send(signum)
    exit_code, lines = child.finish()
    assert exit_code == code, lines
    images = images_saved(lines[-1], saved_line(word, out, 1))
    assert RunDir(out).checkpoint_epoch() == 1
    in_progress = RunDir(out).epoch_in_progress()
    assert (in_progress["epoch"], in_progress["images"]) == (2, images) if images else in_progress is None
    assert [r["epoch"] for r in RunDir(out).read_metrics()] == [1], "metrics list finished epochs only"
    assert not list(out.parent.glob("**/*.tmp")), "a temporary file was left behind"
    run_in_process("--resume", out)
    run_in_process(*SLOW, "--epochs", "3", "--out", tmp_path / "whole")
    assert sha(out) == sha(tmp_path / "whole")
    assert metrics_without_seconds(out) == metrics_without_seconds(tmp_path / "whole")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_stopped_in_epoch_1_resumes_from_the_initial_weights(tmp_path, same_digits, signum):
    out = tmp_path / "early"
    child = Child([*SLOW, "--epochs", "2", "--out", out], SLOW_ENV)
    child.wait_for(r"^epoch\s+lr")  # the table's header: the directory exists, epoch 1 is training
    child.send(signum)
    exit_code, lines = child.finish()
    assert exit_code == (-signal.SIGKILL if signum == signal.SIGKILL else 143), lines
    if signum == signal.SIGTERM:
        images_saved(lines[-1], saved_line("stopped by SIGTERM", out, 0))
    assert RunDir(out).checkpoint_epoch() == 0
    run_in_process("--resume", out)
    run_in_process(*SLOW, "--epochs", "2", "--out", tmp_path / "whole")
    assert sha(out) == sha(tmp_path / "whole")


def test_under_nohup_a_hangup_does_not_stop_the_run(tmp_path):
    out = tmp_path / "nohup"
    child = Child([*SLOW, "--epochs", "2", "--out", out], SLOW_ENV, ignoring=[signal.SIGHUP])
    child.wait_for(r"^epoch\s+lr")
    child.send(signal.SIGHUP)
    exit_code, lines = child.finish()
    assert exit_code == 0 and lines[-1].startswith("test error at best validation"), lines
    assert RunDir(out).checkpoint_epoch() == 2


def test_rerunning_into_an_existing_run_directory_fails_and_names_resume(tmp_path, same_digits, capsys):
    out = tmp_path / "run"
    run_in_process(*SLOW, "--epochs", "1", "--out", out)
    capsys.readouterr()
    run_in_process(*SLOW, "--epochs", "1", "--out", out, expect=2)
    assert capsys.readouterr().err.strip() == (
        f"error: run directory {out} already exists and is not empty; choose another --out "
        f"(continue it with --resume {out})")


def test_a_diverged_first_epoch_leaves_a_resumable_directory(tmp_path, same_digits, capsys, monkeypatch):
    from gpumlp.train_cpu import CpuTrainer
    monkeypatch.setattr(CpuTrainer, "train_epoch", lambda self, *args, **kwargs: (float("nan"), 1.0))
    out = tmp_path / "nan"
    run_in_process(*SLOW, "--epochs", "2", "--out", out, expect=3)
    assert "the run directory keeps epoch 0" in capsys.readouterr().err
    assert RunDir(out).checkpoint_epoch() == 0
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 0


def test_a_study_stopped_in_its_first_epoch_completes_when_run_again(tmp_path, same_digits):
    from gpumlp import studies
    study = ["seeds", "--seeds", "1", "--out", tmp_path / "study", *SLOW, "--epochs", "2"]
    child = Child(study, {**SLOW_ENV, "COMMAND": "gpumlp.studies"})
    child.wait_for(r"^epoch\s+lr")
    child.send(signal.SIGTERM)
    exit_code, lines = child.finish()
    assert exit_code == 143, lines
    assert RunDir(tmp_path / "study" / "seed_0").checkpoint_epoch() == 0
    assert studies.main([*map(str, study)]) == 0
    run_in_process(*SLOW, "--epochs", "2", "--seed", "0", "--out", tmp_path / "whole")
    assert sha(tmp_path / "study" / "seed_0") == sha(tmp_path / "whole")


# -- 3: a second signal during the save, and a signal during a periodic save ----------------------
def test_a_second_ctrl_c_during_the_final_save_does_not_lose_it(tmp_path):
    out = tmp_path / "twice"
    child = Child([*SLOW, "--epochs", "3", "--checkpoint-every", "100", "--out", out],
                  {**SLOW_ENV, "SLOW_CHECKPOINT": "0.5"})
    child.wait_for(epoch_line(1))
    child.send(signal.SIGINT)
    child.wait_for("renaming checkpoint.npz")
    child.send(signal.SIGINT)
    exit_code, lines = child.finish()
    assert exit_code == 130, lines
    images_saved(lines[-1], saved_line("interrupted", out, 1))
    assert RunDir(out).load_checkpoint()[0] == 1
    assert not list(out.glob("**/*.tmp"))


class SignalsWhileSaved:
    """An array that sends SIGTERM to this process when np.savez converts it, i.e. while the
    archive's member is half-written inside ZipFile."""

    def __init__(self, values):
        self.values = values

    def __array__(self, dtype=None, copy=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return self.values


def test_a_signal_while_an_npz_archive_is_built_waits_until_the_file_is_whole(tmp_path):
    """Without signals held around np.savez, the StopRequested raised inside ZipFile is replaced by
    ZipFile's "Can't close the ZIP file while there is an open writing handle" (a traceback)."""
    from gpumlp import stop_signals
    from gpumlp.rundir import atomic_write_npz
    path = tmp_path / "state.npz"
    with pytest.raises(stop_signals.StopRequested) as stop, stop_signals.handled():
        atomic_write_npz(path, first=np.arange(3.0), second=SignalsWhileSaved(np.ones(1000)), third=np.zeros(2))
    assert stop.value.exit_code == 143
    with np.load(path) as saved:
        assert sorted(saved.files) == ["first", "second", "third"] and saved["second"].sum() == 1000


def test_a_signal_during_a_periodic_checkpoint_waits_for_the_rename(tmp_path):
    out = tmp_path / "periodic"
    child = Child([*SLOW, "--epochs", "3", "--checkpoint-every", "1", "--out", out],
                  {**SLOW_ENV, "SLOW_CHECKPOINT": "0.5"})
    child.wait_for("renaming checkpoint.npz")  # epoch 0, as the directory is made
    child.wait_for("renaming checkpoint.npz")  # epoch 1
    child.send(signal.SIGTERM)
    exit_code, lines = child.finish()
    assert exit_code == 143 and lines[-1].startswith("stopped by SIGTERM: epoch 1 is saved"), lines
    assert lines.count("renaming checkpoint.npz") == 2, "the write the signal arrived in was cut and redone"
    assert RunDir(out).load_checkpoint()[0] == 1
    assert not list(out.glob("**/*.tmp"))


# -- 4: checkpoints by time as well as by epoch count ---------------------------------------------
def test_checkpoints_are_written_by_time_as_well_as_every_n_epochs(tmp_path, same_digits, monkeypatch):
    """(last finished epoch, (epoch in progress, its images done) or None) of each save."""
    saved = []
    real_save = RunDir.save_checkpoint

    def recorded_save(self, epoch, state, best, in_progress=None):
        saved.append((epoch, in_progress and (in_progress["epoch"], in_progress["images"])))
        real_save(self, epoch, state, best, in_progress)

    monkeypatch.setattr(RunDir, "save_checkpoint", recorded_save)
    fast = ["--device", "cpu", "--hidden", "8", "--batch-size", "20", "--epochs", "4", "--no-augment"]
    run_in_process(*fast, "--checkpoint-every", "100", "--out", tmp_path / "count")
    assert saved == [(0, None), (4, None)]  # the initial weights, then the end
    saved.clear()
    run_in_process(*fast, "--checkpoint-every", "100", "--checkpoint-minutes", "1e-9", "--out", tmp_path / "time")
    # due after every step of 20 images, inside the epochs too, and at each epoch's end
    assert saved == [(0, None)] + [save for epoch in range(1, 5) for save in
                                   [(epoch - 1, (epoch, images)) for images in range(20, N_TRAIN + 1, 20)]
                                   + [(epoch, None)]]
    assert sha(tmp_path / "time") == sha(tmp_path / "count")
    saved.clear()
    run_in_process(*fast, "--checkpoint-every", "2", "--out", tmp_path / "every2")
    assert saved == [(0, None), (2, None), (4, None)]


def test_a_timed_checkpoint_inside_epoch_1_records_its_position_and_survives_kill_9(tmp_path, same_digits):
    out = tmp_path / "timed"
    child = Child([*SLOW, "--epochs", "2", "--checkpoint-minutes", "0.001", "--out", out], SLOW_ENV)
    child.wait_for(r"^epoch\s+lr")  # the table's header: epoch 1 is training
    deadline = time.monotonic() + 30
    while (in_progress := RunDir(out).epoch_in_progress()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send(signal.SIGKILL)
    child.finish()
    assert in_progress is not None and in_progress["epoch"] == 1 and 0 < in_progress["images"] <= N_TRAIN, in_progress
    assert RunDir(out).checkpoint_epoch() == 0
    run_in_process("--resume", out)
    run_in_process(*SLOW, "--epochs", "2", "--out", tmp_path / "whole")
    assert sha(out) == sha(tmp_path / "whole")
    assert metrics_without_seconds(out) == metrics_without_seconds(tmp_path / "whole")


@pytest.mark.parametrize("augment", [False, True], ids=["undeformed", "deformed"])
def test_sigterm_in_epoch_2_after_timed_checkpoints_saves_the_position_and_resumes_to_the_same_bits(
        tmp_path, same_digits, augment):
    """Deformed: the resumed epoch's digits are deformed again from (seed, epoch), the same ones."""
    flags = [*[flag for flag in SLOW if flag != "--no-augment" or not augment], "--epochs", "3"]
    out = tmp_path / "cut"
    child = Child([*flags, "--checkpoint-minutes", "0.001", "--out", out], SLOW_ENV)
    child.wait_for(epoch_line(1))
    time.sleep(0.3)  # ~200 steps of >= 4 ms make epoch 2: the stop lands well inside it
    child.send(signal.SIGTERM)
    exit_code, lines = child.finish()
    assert exit_code == 143, lines
    images = images_saved(lines[-1], saved_line("stopped by SIGTERM", out, 1))
    assert 0 < images < N_TRAIN, lines[-1]
    assert RunDir(out).epoch_in_progress()["images"] == images
    assert [r["epoch"] for r in RunDir(out).read_metrics()] == [1]
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 1
    run_in_process("--resume", out)
    run_in_process(*flags, "--out", tmp_path / "whole")
    assert sha(out) == sha(tmp_path / "whole")
    assert metrics_without_seconds(out) == metrics_without_seconds(tmp_path / "whole")


def test_a_trainer_that_cannot_resume_inside_an_epoch_refuses_such_a_checkpoint(tmp_path, same_digits, monkeypatch,
                                                                             capsys):
    from gpumlp.train_cpu import CpuTrainer
    out = tmp_path / "run"
    run_in_process(*SLOW, "--epochs", "2", "--checkpoint-minutes", "1e-9", "--out", out)
    epoch, state, best = RunDir(out).load_checkpoint()
    RunDir(out).save_checkpoint(1, state, best, {"epoch": 2, "images": 40, "loss_total": 1.5, "wrong_total": 3,
                                                 "seconds": 0.5})
    monkeypatch.setattr(CpuTrainer, "resumes_mid_epoch", False)  # as the device engines
    capsys.readouterr()
    run_in_process("--resume", out, "--epochs", "3", expect=2)
    assert capsys.readouterr().err.strip() == (
        f"error: {out}/checkpoint.npz was saved inside epoch 2 (40 of {N_TRAIN} training images), and only the CPU "
        f"trainer resumes inside an epoch: finish it with --resume {out} --device cpu --epochs 2, then resume on "
        f"this device with --epochs 3")
    assert [r["epoch"] for r in RunDir(out).read_metrics()] == [1, 2], "the refused resume changed the metrics"


def test_a_checkpoint_in_the_old_format_still_resumes(tmp_path, same_digits):
    """Checkpoints written before mid-epoch positions existed hold exactly these arrays; they
    load as the state after their epoch."""
    import numpy as np
    out = tmp_path / "old"
    run_in_process(*SLOW, "--epochs", "1", "--out", out)
    with np.load(out / "checkpoint.npz") as data:
        arrays = {name: data[name] for name in data.files}
    old_names = {"epoch", "best_epoch", "best_val_error", "W0", "b0", "W1", "b1",
                 "velocity_W0", "velocity_b0", "velocity_W1", "velocity_b1"}
    np.savez(out / "checkpoint.npz", **{name: arrays[name] for name in old_names})
    assert RunDir(out).epoch_in_progress() is None
    run_in_process("--resume", out, "--epochs", "2")
    run_in_process(*SLOW, "--epochs", "2", "--out", tmp_path / "whole")
    assert sha(out) == sha(tmp_path / "whole")


# -- 5, 6: what a resume may change, and the plan it keeps ----------------------------------------
@pytest.mark.parametrize("flags, named", [(["--lr", "0.5"], "--lr"), (["--hidden=50"], "--hidden"),
                                          (["--out", "OTHER"], "--out"), (["--mom", "0.5"], "--momentum"),
                                          (["--lr", "0.5", "--hidden", "50"], "--hidden, --lr")])
def test_resume_refuses_flags_it_would_drop_and_names_them(tmp_path, same_digits, capsys, flags, named):
    out = tmp_path / "run"
    run_in_process(*SLOW, "--epochs", "1", "--out", out)
    capsys.readouterr()
    run_in_process("--resume", out, *flags, expect=2)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named} cannot be changed on --resume") and "--config" in err, err
    assert not (tmp_path / "OTHER").exists()


def test_resume_applies_an_abbreviated_epochs_and_remembers_the_extension(tmp_path, same_digits, monkeypatch):
    from gpumlp.train_cpu import CpuTrainer
    out = tmp_path / "run"
    run_in_process(*SLOW, "--epochs", "2", "--out", out)
    real_train_epoch = CpuTrainer.train_epoch

    def interrupted_in_epoch_4(self, epoch, *args, **kwargs):
        if epoch == 4:
            raise KeyboardInterrupt
        return real_train_epoch(self, epoch, *args, **kwargs)

    monkeypatch.setattr(CpuTrainer, "train_epoch", interrupted_in_epoch_4)
    run_in_process("--resume", out, "--epoch", "5", expect=130)  # argparse's abbreviation of --epochs
    assert json.loads((out / "config.json").read_text())["settings"]["epochs"] == 5
    monkeypatch.setattr(CpuTrainer, "train_epoch", real_train_epoch)
    run_in_process("--resume", out)  # no --epochs: the plan of 5 stands
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == summary["epochs_planned"] == 5
    run_in_process(*SLOW, "--epochs", "5", "--out", tmp_path / "whole")
    assert sha(out) == sha(tmp_path / "whole")


def test_resume_refuses_to_shrink_below_what_is_done(tmp_path, same_digits, capsys):
    out = tmp_path / "run"
    run_in_process(*SLOW, "--epochs", "3", "--out", out)
    capsys.readouterr()
    run_in_process("--resume", out, "--epochs", "2", expect=2)
    assert capsys.readouterr().err.strip() == f"error: --epochs 2 is fewer than the 3 epochs already done in {out}"
    run_in_process("--resume", out, "--epochs", "3")


def test_data_paths_are_absolute_so_a_resume_from_elsewhere_works(tmp_path, same_digits, monkeypatch):
    asked = []
    monkeypatch.setattr("gpumlp.data.load_mnist", lambda directory, *a, **k: (asked.append(directory), same_digits)[1])
    (tmp_path / "project" / "mnist").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    run_in_process(*SLOW, "--epochs", "1", "--data-dir", "mnist", "--out", "run")
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_in_process("--resume", tmp_path / "project" / "run", "--epochs", "2")
    assert asked == [str(tmp_path / "project" / "mnist")] * 2
    assert list((tmp_path / "elsewhere").iterdir()) == []
    settings = json.loads((tmp_path / "project" / "run" / "config.json").read_text())["settings"]
    assert settings["data_dir"] == str(tmp_path / "project" / "mnist")
    monkeypatch.setenv("GPUMLP_DATA", str(tmp_path / "elsewhere"))  # moved data: the environment applies
    run_in_process("--resume", tmp_path / "project" / "run", "--epochs", "3")
    assert asked[-1] == str(tmp_path / "elsewhere")
    run_in_process("--resume", tmp_path / "project" / "run", "--epochs", "4", "--data-dir", tmp_path / "project" / "mnist")
    assert asked[-1] == str(tmp_path / "project" / "mnist")


def test_resume_may_change_device_and_checkpoint_flags(tmp_path, same_digits):
    out = tmp_path / "run"
    run_in_process(*SLOW, "--epochs", "1", "--out", out)
    run_in_process("--resume", out, "--epochs", "2", "--checkpoint-every", "3", "--checkpoint-minutes", "5",
                   "--device", "cpu")
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert (settings["checkpoint_every"], settings["checkpoint_minutes"], settings["epochs"]) == (3, 5.0, 2)


# -- 7, 8: one line, never a traceback ------------------------------------------------------------
def one_line_error(args, cwd=None, timeout=60):
    result = subprocess.run([sys.executable, str(TESTS.parent / "reproduce_2010.py"), *map(str, args)],
                            capture_output=True, text=True, cwd=cwd, timeout=timeout)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("config_json, fragment", [("{}", 'has no "settings"'), ("[1]", 'has no "settings"'),
                                                   ('{"settings": {}}', "lacks the settings"),
                                                   ("{not json", "is not valid JSON")])
def test_resume_of_a_broken_config_json_is_one_line(tmp_path, config_json, fragment):
    (tmp_path / "config.json").write_text(config_json)
    assert fragment in one_line_error(["--resume", tmp_path])


def test_resume_of_a_broken_checkpoint_is_one_line(tmp_path, same_digits, capsys):
    out = tmp_path / "run"
    run_in_process(*SLOW, "--epochs", "1", "--out", out)
    (out / "checkpoint.npz").write_bytes(b"not a zip file")
    assert "checkpoint.npz is unreadable" in one_line_error(["--resume", out])


def test_a_net_too_big_for_host_memory_is_refused_before_anything_is_allocated(tmp_path):
    message = one_line_error(["--device", "cpu", "--hidden", "1000000", "1000000", "--out", tmp_path / "big"])
    assert "GiB of host memory" in message and "choose a smaller net" in message, message
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("flags, fragment", [(["--graph-steps", "-5"], "--graph-steps"),
                                             (["--lr", "inf"], "--lr must be a finite number"),
                                             (["--lr", "nan"], "--lr must be a finite number"),
                                             (["--momentum", "nan"], "--momentum must be a finite number"),
                                             (["--checkpoint-minutes", "0"], "--checkpoint-minutes")])
def test_settings_that_cannot_work_are_refused(flags, fragment):
    assert fragment in one_line_error(["--device", "cpu", *flags])


# -- 9: no 37-day run on the CPU by accident ------------------------------------------------------
def test_auto_without_a_gpu_refuses_a_run_estimated_over_the_limit(tmp_path, same_digits, monkeypatch, capsys):
    monkeypatch.setattr(cli, "choose_device", lambda requested, log: None)  # no usable GPU
    monkeypatch.setattr(cli, "CPU_AUTO_LIMIT_HOURS", 1e-9)
    run_in_process("--hidden", "8", "--epochs", "2", "--out", tmp_path / "auto", expect=2)
    out, err = capsys.readouterr()
    assert "estimated time on the CPU:" in out
    assert err.startswith("error: no usable GPU") and "quick recipe: python reproduce_2010.py --device cpu" in err
    assert err.strip().endswith(f"--hidden 8 --epochs 2 --out {tmp_path / 'auto'} --device cpu")
    assert not (tmp_path / "auto").exists()
    run_in_process("--hidden", "8", "--epochs", "1", "--device", "cpu", "--out", tmp_path / "insist")
    assert "estimated time on the CPU:" in capsys.readouterr().out


def test_the_estimate_adds_steps_deformation_and_evaluation(same_digits, monkeypatch):
    from gpumlp import nets, training
    from gpumlp.train_cpu import CpuTrainer
    config = TrainConfig(hidden=[8], batch_size=4)
    split = training.make_split(same_digits, config)
    trainer = CpuTrainer(nets.init_params(config.sizes, 0), split.train_images, split.train_labels, 4, 0.0,
                         config.deform_config(), 0)
    before = trainer.get_state()
    monkeypatch.setattr(training, "_seconds_per_call", lambda action: (action(), 0.01)[1])
    seconds, rate = training.estimate_cpu_seconds(trainer, split, config, epochs=3)
    per_image = 0.01 / 4 + 0.01 / min(N_TRAIN, training.CALIBRATION_IMAGES["deform"])
    evaluate = 0.01 / min(N_TRAIN, training.CALIBRATION_IMAGES["evaluate"])
    assert seconds == pytest.approx(3 * (N_TRAIN * per_image + (N_TRAIN + N_TEST) * evaluate))
    assert rate == pytest.approx(1 / per_image)
    for (W, _), (W0, _) in zip(trainer.get_state()["params"], before["params"]):
        assert (W == W0).all(), "timing the steps changed the weights"


# -- 10: progress and the header ------------------------------------------------------------------
class FakeTerminal:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bar_shows_rate_and_eta_and_is_cleared(monkeypatch):
    from gpumlp.training import Progress
    terminal = FakeTerminal()
    progress = Progress(1000, 3, terminal)
    progress(500, stage="deforming")
    progress(1000, stage="deforming")
    progress(400)
    progress.close()
    assert "epoch 3 deforming" in terminal.text and "epoch 3 training" in terminal.text
    assert "img/s" in terminal.text and "<" in terminal.text  # tqdm's elapsed<remaining
    assert terminal.text.rstrip(" \r").endswith("\r") or terminal.text.endswith("\r"), repr(terminal.text[-80:])
    assert terminal.text.split("\r")[-1].strip() == "" and terminal.text.split("\r")[-2].strip() == ""


def test_without_a_terminal_a_plain_progress_line_at_most_every_30_s(monkeypatch, capsys):
    import io
    from gpumlp import training
    stream, now = io.StringIO(), [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    progress = training.Progress(1000, 2, stream)
    for t, done in [(0, 0), (10, 100), (31, 310), (40, 400), (62, 620)]:  # lines at 31 s and 62 s only
        now[0] = t
        progress(done)
    lines = stream.getvalue().splitlines()
    assert lines == ["  epoch 2 training: 310/1,000 images, 10.0 images/s, 69.0 s to the end of the stage",
                     "  epoch 2 training: 620/1,000 images, 10.0 images/s, 38.0 s to the end of the stage"]


def test_an_interrupted_bar_is_cleared_before_the_interrupted_line(tmp_path, same_digits, monkeypatch, capsys):
    from gpumlp import training
    from gpumlp.train_cpu import CpuTrainer
    terminal = FakeTerminal()
    real_progress = training.Progress
    monkeypatch.setattr(training, "Progress", lambda total, epoch, stream: real_progress(total, epoch, terminal))

    def interrupted_half_way(self, epoch, lr, order, progress, **kwargs):
        progress(len(order) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(CpuTrainer, "train_epoch", interrupted_half_way)
    run_in_process(*SLOW, "--epochs", "2", "--out", tmp_path / "run", expect=130)
    assert "epoch 1 training" in terminal.text and terminal.text.split("\r")[-1].strip() == ""
    assert capsys.readouterr().err.strip().endswith(f"interrupted: epoch 0 is saved in {tmp_path / 'run'}; "
                                                   f"continue with --resume {tmp_path / 'run'}")


def test_on_a_terminal_the_bar_is_cleared_before_the_interrupted_line(tmp_path):
    import fcntl
    import pty
    import struct
    import termios
    pid, terminal = pty.fork()
    if pid == 0:  # the child, on a terminal 100 columns wide
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
            os.environ.update(SLOW_ENV)
            os.execv(sys.executable, [sys.executable, "-c", DRIVER, *SLOW, "--epochs", "3", "--out", str(tmp_path / "run")])
        finally:
            os._exit(127)
    output, signalled = b"", False
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child has closed the terminal
            break
        if not chunk:
            break
        output += chunk
        if not signalled and b"epoch 2 training:" in output:
            os.kill(pid, signal.SIGINT)
            signalled = True
    _, status = os.waitpid(pid, 0)
    text = output.decode()
    assert os.waitstatus_to_exitcode(status) == 130, text
    before, _ = text.rsplit("interrupted: epoch 1", 1)
    bar, clearing, rest = before.split("\r")[-3:]
    assert "epoch 2 training:" in bar and "img/s" in bar and clearing.strip() == "" and rest == "", repr(before[-300:])


def test_closing_the_terminal_stops_the_run_like_sighup_and_the_log_says_so(tmp_path):
    """The terminal closes (the kernel sends SIGHUP, and later writes to it fail): the run saves
    its last finished epoch, exits 129, and train.log holds the line the terminal no longer can."""
    import pty
    out = tmp_path / "run"
    pid, terminal = pty.fork()
    if pid == 0:
        try:
            os.environ.update(SLOW_ENV)
            os.execv(sys.executable, [sys.executable, "-c", DRIVER, *SLOW, "--epochs", "3", "--out", str(out)])
        finally:
            os._exit(127)
    output = b""
    while not re.search(rb"\n\s+1\s+0\.01", output):  # the line of epoch 1
        output += os.read(terminal, 4096)
    os.close(terminal)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129, output
    assert RunDir(out).checkpoint_epoch() >= 1
    last = (out / "train.log").read_text().splitlines()[-1]
    epoch = RunDir(out).checkpoint_epoch()
    images_saved(last, saved_line("stopped by SIGHUP", out, epoch))


def test_header_states_images_device_and_each_epoch_line_the_run_eta(tmp_path, same_digits, capsys):
    run_in_process(*SLOW, "--epochs", "2", "--validation", "holdout", "--out", tmp_path / "run")
    out = capsys.readouterr().out.splitlines()
    assert "images: 167 training (undeformed), 33 validation (held out from the training images), 50 test; from " \
        in "\n".join(out)
    assert "device: cpu (numpy reference)" in out
    assert any(line.startswith("net: 841-8-10 (6,826 weights), batch size 1, 2 epochs") for line in out)
    epochs = [line for line in out if re.match(epoch_line(1), line) or re.match(epoch_line(2), line)]
    assert "run ETA" in epochs[0] and "run ETA" not in epochs[1], epochs


def test_one_epoch_is_singular(tmp_path, same_digits, capsys):
    run_in_process(*SLOW, "--epochs", "1", "--out", tmp_path / "run")
    out = capsys.readouterr().out
    assert "batch size 1, 1 epoch\n" in out and "for 1 epoch (" in out and "1 epochs" not in out


# -- 11: train.log --------------------------------------------------------------------------------
def test_train_log_holds_everything_printed_and_is_appended_on_resume(tmp_path, same_digits, capsys):
    out = tmp_path / "run"
    run_in_process(*SLOW, "--epochs", "1", "--out", out)
    first = capsys.readouterr()
    run_in_process("--resume", out, "--epochs", "2")
    second = capsys.readouterr()
    log = (out / "train.log").read_text().splitlines()
    titles = [i for i, line in enumerate(log) if line.startswith("=== ")]
    assert len(titles) == 2 and log[titles[1]].endswith(f"reproduce_2010.py --resume {out} --epochs 2")
    printed = [(first.out + first.err).splitlines(), (second.out + second.err).splitlines()]
    assert sorted(log[1:titles[1]]) == sorted(printed[0]) and sorted(log[titles[1] + 1:]) == sorted(printed[1])
    assert any(line.startswith("estimated time on the CPU") for line in log[1:titles[1]])  # printed before the directory existed


def test_train_log_keeps_the_stop_line_of_a_signal(tmp_path):
    out = tmp_path / "run"
    child = Child([*SLOW, "--epochs", "3", "--out", out], SLOW_ENV)
    child.wait_for(epoch_line(1))
    child.send(signal.SIGTERM)
    _, lines = child.finish()
    log = (out / "train.log").read_text().splitlines()
    assert log[-1] == lines[-1] and log[-1].startswith("stopped by SIGTERM")


# -- 12: say what is used -------------------------------------------------------------------------
def test_clamped_counts_are_stated(tmp_path, same_digits, capsys):
    run_in_process("--device", "cpu", "--hidden", "8", "--epochs", "1", "--batch-size", "1000",
                   "--train-images", "999999", "--test-images", "20", "--out", tmp_path / "run")
    out = capsys.readouterr().out
    assert f"--train-images 999,999: the data has {N_TRAIN} training images; using all {N_TRAIN}" in out
    assert f"--batch-size 1,000 is more than the {N_TRAIN} training images: each step takes all {N_TRAIN}" in out
    assert "--test-images" not in out.split("net:")[0]  # 20 of 50 is not clamped


def test_a_data_dir_that_does_not_exist_is_an_error_and_creates_nothing(tmp_path):
    message = one_line_error(["--device", "cpu", "--data-dir", tmp_path / "mnsit", "--out", tmp_path / "run"])
    assert message.startswith(f"error: the MNIST directory {tmp_path / 'mnsit'} (--data-dir) does not exist")
    assert list(tmp_path.iterdir()) == []


# -- polish: --help and --config ------------------------------------------------------------------
def test_help_shows_each_default_once_and_explains_every_flag():
    text = subprocess.run([sys.executable, str(TESTS.parent / "reproduce_2010.py"), "--help"],
                          capture_output=True, text=True, check=True).stdout
    flat = " ".join(text.split())
    flat = flat[flat.index("options:"):]  # past the usage lines
    assert "(default: True)" not in flat and "(default: None)" not in flat
    assert "train on the undeformed digits (default: deformed, as in the paper)" in flat
    for flag in ("--epochs N", "--momentum MOMENTUM", "--checkpoint-minutes M", "--config FILE"):
        help_text = flat.split(flag, 1)[1].split(" --", 1)[0]
        assert len(help_text.split()) > 3, (flag, help_text)
    for flag in ("--data-dir DIR", "--out DIR"):
        assert flat.split(flag, 1)[1].split(" --", 1)[0].count("default") == 1, flag


def test_config_file_starts_a_new_run_with_those_settings_and_flags_override(tmp_path, same_digits):
    run_in_process(*SLOW, "--epochs", "2", "--seed", "3", "--out", tmp_path / "a")
    run_in_process("--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b")
    assert sha(tmp_path / "b") == sha(tmp_path / "a")
    run_in_process("--config", tmp_path / "a", "--seed", "4", "--out", tmp_path / "c")
    settings = json.loads((tmp_path / "c" / "config.json").read_text())["settings"]
    assert (settings["seed"], settings["hidden"], settings["lr"], settings["augment"]) == (4, [8], 0.01, False)
    assert sha(tmp_path / "c") != sha(tmp_path / "a")
    run_in_process("--config", tmp_path / "a", "--net", "1", "--epochs", "1", "--train-images", "20",
                   "--out", tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["sizes"] == [841, 1000, 500, 10]


def test_a_config_file_that_cannot_be_used_is_one_line(tmp_path):
    assert one_line_error(["--config", tmp_path / "missing.json"]) == f"error: {tmp_path / 'missing.json'} not found"
    (tmp_path / "other.json").write_text('{"settings": {"lr": 0.1}}')
    assert "lacks the settings" in one_line_error(["--config", tmp_path / "other.json"])
    (tmp_path / "bad.json").write_text(json.dumps({"settings": {**TrainConfig().to_dict(), "lr": "fast"}}))
    assert "holds an unusable setting" in one_line_error(["--config", tmp_path / "bad.json"])
