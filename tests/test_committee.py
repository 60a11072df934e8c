"""`python -m gpumlp.committee`: the mean of the members' softmax outputs, the summary of its errors,
and the one-line refusals, on tiny CPU runs of the synthetic set."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpumlp import committee
from test_studies import ROOT, one_error_line, summary, train


def best_val_probs(run):
    with np.load(Path(run) / "predictions.npz") as data:
        return data["best_val_probs"], data["test_labels"]


@pytest.fixture
def three_runs(synthetic_mnist, tmp_path):
    return [train(tmp_path / f"seed{seed}", "--seed", seed, "--hidden", 4 + 2 * seed) for seed in range(3)]


def test_committee_of_a_run_with_itself_is_the_run(synthetic_mnist, tmp_path):
    run = train(tmp_path / "a", "--no-augment")
    members = [committee.load_member(run)] * 2
    result = committee.form_committee(members)
    probs, labels = best_val_probs(run)
    np.testing.assert_array_equal(result.predictions, probs.argmax(axis=1))
    assert result.error() == pytest.approx(summary(run)["test_error_at_best_val"])


def test_committee_answers_the_argmax_of_the_mean_probabilities(three_runs, tmp_path, capsys):
    out_file = tmp_path / "committee.md"
    capsys.readouterr()
    assert committee.main([*map(str, three_runs), "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert printed == out_file.read_text()

    probs = [best_val_probs(run)[0] for run in three_runs]
    labels = best_val_probs(three_runs[0])[1]
    expected = np.mean(np.stack(probs).astype(np.float64), axis=0).argmax(axis=1)
    result = committee.form_committee([committee.load_member(run) for run in three_runs])
    np.testing.assert_array_equal(result.predictions, expected)
    wrong = np.flatnonzero(expected != labels)
    np.testing.assert_array_equal(result.wrong, wrong)
    assert f"| **committee of 3** | mean of the softmax outputs | **{100 * len(wrong) / len(labels):.2f}% " \
           f"({len(wrong)})** |" in printed
    for run, p in zip(three_runs, probs):
        member_wrong = int((p.argmax(axis=1) != labels).sum())
        assert f"| {run} | 841-" in printed and f"% ({member_wrong}) |" in printed


def test_the_errors_are_summarised_and_listed_only_on_request(three_runs, capsys):
    probs = np.stack([best_val_probs(run)[0] for run in three_runs])
    labels = best_val_probs(three_runs[0])[1]
    answers = probs.astype(np.float64).mean(axis=0).argmax(axis=1)
    members_wrong = probs.argmax(axis=2) != labels
    wrong = np.flatnonzero(answers != labels)
    assert len(wrong) >= 2, "the tiny nets must leave errors to summarise"
    capsys.readouterr()
    assert committee.main(list(map(str, three_runs))) == 0
    printed = capsys.readouterr().out
    assert f"### The committee's errors: {len(wrong)} test digits" in printed
    all_wrong = int(members_wrong[:, wrong].all(axis=0).sum())
    assert (f"every member is wrong on {all_wrong} of them too; at least one member is right on "
            f"{len(wrong) - all_wrong}") in printed
    fixed = int(((answers == labels) & members_wrong.any(axis=0)).sum())
    assert f"the committee is right on {fixed} test digit{'' if fixed == 1 else 's'} that" in printed
    assert "| test index |" not in printed and "--show-errors N" in printed

    assert committee.main([*map(str, three_runs), "--show-errors", "2"]) == 0
    printed = capsys.readouterr().out
    listed = [line for line in printed.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:].isdigit()]
    assert len(listed) == 2 and f"the first 2 of {len(wrong)}" in printed
    for line, i in zip(listed, wrong[:2]):
        assert line.startswith(f"| {i} | {labels[i]} | {answers[i]} |")


def test_committee_refuses_one_member_and_one_run_twice(synthetic_mnist, tmp_path, capsys):
    run = train(tmp_path / "a", "--no-augment")
    one_error_line(capsys, committee.main([str(run)]), "at least 2 run directories, got 1")
    one_error_line(capsys, committee.main([str(run), str(tmp_path / "." / "a")]), "is given twice")
    shutil.copytree(run, tmp_path / "copy")
    one_error_line(capsys, committee.main([str(run), str(tmp_path / "copy")]), "identical test outputs")
    other = train(tmp_path / "b", "--no-augment", "--seed", "1")
    one_error_line(capsys, committee.main([str(run), str(other), "--show-errors", "-1"]), "--show-errors")


def test_committee_refuses_members_tested_on_other_digits(synthetic_mnist, tmp_path, capsys):
    full = train(tmp_path / "full", "--no-augment")
    fewer = train(tmp_path / "fewer", "--no-augment", "--test-images", "30")
    one_error_line(capsys, committee.main([str(full), str(fewer)]), "must share the test set")
    one_error_line(capsys, committee.main([str(full), str(tmp_path / "nowhere")]), "no such run directory")
    (fewer / "predictions.npz").unlink()
    one_error_line(capsys, committee.main([str(full), str(fewer)]), "no predictions.npz")


def test_committee_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpumlp.committee", str(tmp_path / "missing"),
                             str(tmp_path / "other")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
