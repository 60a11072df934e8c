"""The paper's table, the ablation and the seed study, on tiny CPU runs of the synthetic set."""
import json
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpumlp import cli, paper_table, studies

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--hidden", "8", "--epochs", "2", "--batch-size", "4", "--lr", "0.02"]


def train(out, *extra):
    assert cli.main([*TINY, *map(str, extra), "--out", str(out)]) == 0
    return out


def one_error_line(capsys, code, fragment):
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err


def summary(run):
    return json.loads((Path(run) / "summary.json").read_text())


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# -- the paper's table -----------------------------------------------------------------------------
def test_paper_table_trains_a_paper_net_and_collects_others(synthetic_mnist, tmp_path, capsys):
    out = tmp_path / "table"
    code = paper_table.main(["--nets", "1", "--out", str(out), "--device", "cpu", "--epochs", "1",
                             "--batch-size", "8", "--no-augment"])
    assert code == 0
    text = (out / "paper_table.md").read_text()
    net1 = summary(out / "net1")
    assert (f"| 1 | 841-1000-500-10 | 1.35 | 1 | {100 * net1['test_error_at_best_val']:.2f} | 0.49 | "
            f"{100 * net1['best_test_error']:.2f} | 0.44 |") in text
    assert "| 23.4 h | cpu (numpy reference) |" in text

    small = train(tmp_path / "small", "--no-augment")
    capsys.readouterr()
    assert paper_table.main(["--collect", str(small), str(out / "net1")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| 1 | 841-1000-500-10 |")          # paper nets first, by ID
    cells = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert cells[:2] == ["-", "841-8-10"] and cells[5] == cells[7] == cells[9] == "-"   # no paper numbers


def test_paper_table_refuses_flags_it_sets(tmp_path, capsys):
    one_error_line(capsys, paper_table.main(["--out", str(tmp_path), "--hidden", "8"]), "--hidden")
    one_error_line(capsys, paper_table.main(["--collect", str(tmp_path), "--epochs", "2"]), "no effect with --collect")
    one_error_line(capsys, paper_table.main(["--collect", str(tmp_path / "nowhere")]), "no such run directory")


# -- ablation and seeds ------------------------------------------------------------------------------
def test_ablation_trains_with_and_without_deformation_at_one_seed(synthetic_mnist, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert studies.main(["ablation", "--out", str(out), *TINY, "--seed", "5"]) == 0
    settings = {name: json.loads((out / name / "config.json").read_text())["settings"]
                for name in ("deformed", "undeformed")}
    assert settings["deformed"]["augment"] and not settings["undeformed"]["augment"]
    assert settings["deformed"]["seed"] == settings["undeformed"]["seed"] == 5
    assert settings["deformed"]["epochs"] == settings["undeformed"]["epochs"] == 2
    table = (out / "ablation.md").read_text()
    for name in ("deformed", "undeformed"):
        s = summary(out / name)
        assert f"| {100 * s['test_error_at_best_val']:.2f} (epoch {s['best_val_epoch']}) |" in table
    assert "| deformed anew every epoch (the paper) |" in table and "| undeformed (--no-augment) |" in table

    capsys.readouterr()
    assert studies.main(["ablation", "--out", str(out), *TINY, "--seed", "5"]) == 0   # a second call reuses
    assert capsys.readouterr().out.count("finished earlier, reused") == 2
    one_error_line(capsys, studies.main(["ablation", "--out", str(out), *TINY, "--seed", "6"]),
                   "holds a run made with other settings (seed 5, not 6)")


def test_a_study_compares_settings_not_the_text_of_the_flags(synthetic_mnist, tmp_path, capsys):
    out = tmp_path / "seeds"
    assert studies.main(["seeds", "--seeds", "1", "--out", str(out), *TINY]) == 0
    assert "## Seeds: 1 run differing only in the seed" in (out / "seeds.md").read_text()
    assert "120 training images and 60 test images" in (out / "seeds.md").read_text()
    capsys.readouterr()
    reordered = ["--lr=0.02", "--hidden=8", "--batch-size", "4", "--epochs", "2", "--device", "cpu",
                 "--checkpoint-every", "5"]     # where checkpoints go is not a setting of the result
    assert studies.main(["seeds", "--seeds", "1", "--out", str(out), *reordered]) == 0
    assert "finished earlier, reused" in capsys.readouterr().out
    one_error_line(capsys, studies.main(["seeds", "--seeds", "1", "--out", str(out), *TINY, "--hidden", "9"]),
                   "other settings (hidden [8], not [9])")
    (out / "seed_0" / "config.json").write_text("{}")
    one_error_line(capsys, studies.main(["seeds", "--seeds", "1", "--out", str(out), *TINY]),
                   'has no "settings"')


STUDY_ON_SYNTHETIC_DIGITS = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import make_synthetic_mnist
import gpumlp.data
data = make_synthetic_mnist(n_train=1000)
gpumlp.data.load_mnist = lambda *args, **kwargs: data
from gpumlp import studies
sys.exit(studies.main(sys.argv[1:]))
"""


def test_ctrl_c_in_a_study_advises_rerunning_it_and_the_rerun_resumes(tmp_path):
    script = tmp_path / "study.py"
    script.write_text(STUDY_ON_SYNTHETIC_DIGITS)
    out = tmp_path / "seeds"
    command = [sys.executable, "-u", str(script), "seeds", "--seeds", "2", "--out", str(out), "--device", "cpu",
               "--hidden", "50", "--epochs", "4", "--batch-size", "1", "--lr", "0.01", "--no-augment"]
    study = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in study.stdout:                  # the first member has finished epoch 1 of 4
        if re.match(r"\s+1\s", line):
            break
    study.send_signal(signal.SIGINT)
    _, err = study.communicate(timeout=120)
    assert study.returncode == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: every finished run is kept, and {out / 'seed_0'} "
                                            "up to its last saved epoch; run the same command again to continue")
    stopped_at = summary(out / "seed_0")["epochs_completed"]
    assert 1 <= stopped_at < 4 and not (out / "seed_1").exists()

    rerun = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{out / 'seed_0'}: unfinished, resuming" in rerun.stdout
    for seed in (0, 1):
        assert summary(out / f"seed_{seed}")["epochs_completed"] == 4
        assert [r["epoch"] for r in metrics(out / f"seed_{seed}")] == [1, 2, 3, 4]
    assert (out / "seeds.md").is_file()


def test_seed_study_reports_mean_and_standard_deviation(synthetic_mnist, tmp_path):
    out = tmp_path / "seeds"
    assert studies.main(["seeds", "--seeds", "3", "--first-seed", "2", "--out", str(out), *TINY]) == 0
    runs = [out / f"seed_{seed}" for seed in (2, 3, 4)]
    assert [json.loads((run / "config.json").read_text())["settings"]["seed"] for run in runs] == [2, 3, 4]
    table = (out / "seeds.md").read_text()
    errors = [summary(run)["test_error_at_best_val"] for run in runs]
    best = [summary(run)["best_test_error"] for run in runs]
    mean_std = lambda values: (f"{100 * statistics.fmean(values):.2f} ± "         # noqa: E731
                               f"{100 * float(np.std(values, ddof=1)):.2f}")
    assert f"| **mean ± std of 3** | **{mean_std(errors)}** | **{mean_std(best)}** |" in table


def test_ctrl_c_between_the_runs_of_a_study_advises_rerunning_it(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(studies, "train_run", interrupted)
    assert studies.main(["seeds", "--seeds", "2", "--out", str(tmp_path), *TINY]) == 130
    assert capsys.readouterr().err == ("interrupted: every finished run is kept; run the same command "
                                       "again to continue\n")


def test_studies_refuse_flags_they_set(tmp_path, capsys):
    one_error_line(capsys, studies.main(["seeds", "--seeds", "2", "--out", str(tmp_path), "--seed", "3"]), "--seed")
    one_error_line(capsys, studies.main(["ablation", "--out", str(tmp_path), "--no-augment"]), "--no-augment")
    one_error_line(capsys, studies.main(["seeds", "--seeds", "0", "--out", str(tmp_path)]), "at least 1")


@pytest.mark.parametrize("module, words", [("gpumlp.committee", ["RUN_DIR", "--out", "--show-errors"]),
                                           ("gpumlp.paper_table", ["--collect", "--nets", "--table"]),
                                           ("gpumlp.studies", ["ablation", "seeds"])])
def test_every_command_has_help(module, words):
    text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout
    for word in words:
        assert word in text, word
