"""bench/gpu_acceptance.sh --emulate: the acceptance script's own sequence at tiny sizes on the CPU
emulator, proving the script works (steps, timeouts, the summary) before a GPU slot is spent on it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpumlp.data import SHARED_MNIST_DIR

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_acceptance.sh"

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="needs bash and coreutils' timeout")


def acceptance(*args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def steps(summary: str) -> dict:
    """step -> (status, result) from the summary's table."""
    rows = [line.split(" | ") for line in summary.splitlines() if line.startswith("| ") and " | " in line]
    return {cells[0][2:]: (cells[1], cells[3].rstrip(" |")) for cells in rows[1:]}


def test_emulated_acceptance_run_passes_and_prints_its_summary_last(tmp_path):
    out = tmp_path / "acceptance"
    done = acceptance("--emulate", "--out", out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    assert done.stdout.endswith(summary) and summary.strip().splitlines()[-1].startswith("verdict: PASSED")
    table = steps(summary)
    for name in ("environment", "selfcheck", "pytest-gpu", "profile-net1", "profile-net4", "profile-net1-persistent",
                 "profile-net4-persistent", "bench-cpu"):
        assert table[name][0] == "pass", (name, table[name])
        assert (out / f"{name}.log").is_file(), name
    assert table["selfcheck"][1].startswith("selfcheck passed")
    assert "skipped" in table["pytest-gpu"][1]
    assert "148.098 MB" in table["profile-net4"][1]          # net 4's step, from the cost model
    assert table["profile-net4-persistent"][1].startswith("model: expected: ")
    for name in ("bench-net1-net4", "sanitizer-memcheck", "sanitizer-racecheck"):
        assert table[name][0] == "skipped" and "needs a GPU" in table[name][1], (name, table[name])
    if SHARED_MNIST_DIR.is_dir():
        for engine in ("graph", "persistent"):
            assert table[f"train-emulated-{engine}"][0] == "pass", table[f"train-emulated-{engine}"]
            assert "2 epochs, seconds per epoch" in table[f"train-emulated-{engine}"][1]
        assert table["engines-agree"][0] == "pass" and "the same weights_sha256" in table["engines-agree"][1]
    else:
        assert table["data"][0] == "skipped"


def test_a_step_the_budget_has_no_time_for_fails_the_run(tmp_path):
    done = acceptance("--emulate", "--out", tmp_path / "out", "--budget", "5")
    assert done.returncode == 1
    table = steps(done.stdout)
    assert table["selfcheck"] == ("not run", "no time left in the 5 s budget")
    assert "verdict: FAILED: environment, selfcheck" in done.stdout


def test_a_bad_flag_is_one_error_line(tmp_path):
    done = acceptance("--emulat")
    assert done.returncode == 2 and done.stderr.strip() == "error: unknown argument --emulat (see --help)"
