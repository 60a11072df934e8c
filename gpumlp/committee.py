"""`python -m gpumlp.committee RUN_DIR [RUN_DIR ...]`: a committee of trained nets.

The committee averages its members' softmax outputs on the test set (each member's predictions at
its best-validation epoch, predictions.npz `best_val_probs`) and answers with the largest mean;
ties go to the lower digit, as numpy's argmax. The members must have been tested on the same
digits: their test labels are compared before anything is averaged.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpumlp import nets
from gpumlp.commands import OneLineErrorParser, run_command
from gpumlp.errors import UserError
from gpumlp.results import load_predictions, markdown_table, percent
from gpumlp.rundir import RunDirError


@dataclass
class Member:
    name: str
    net: str
    probs: np.ndarray     # (N, 10) softmax outputs on the test set
    labels: np.ndarray    # (N,)


@dataclass
class Committee:
    probs: np.ndarray         # (N, 10) mean of the members' outputs, float64
    predictions: np.ndarray   # (N,)
    labels: np.ndarray
    member_predictions: np.ndarray   # (members, N)

    @property
    def wrong(self) -> np.ndarray:
        return np.flatnonzero(self.predictions != self.labels)

    def error(self) -> float:
        return len(self.wrong) / len(self.labels)


def load_member(path) -> Member:
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    probs, labels = load_predictions(path)
    config = path / "config.json"
    net = nets.describe(json.loads(config.read_text())["sizes"]) if config.is_file() else "?"
    return Member(str(path), net, probs, labels)


def check_same_test_set(members: list[Member]) -> None:
    first = members[0]
    for other in members[1:]:
        if len(other.labels) != len(first.labels):
            difference = f"{len(other.labels)} test digits against {len(first.labels)}"
        elif not np.array_equal(other.labels, first.labels) or other.probs.shape != first.probs.shape:
            difference = "the same number of test digits but other labels"
        else:
            continue
        raise UserError(f"{other.name} was tested on other digits than {first.name} ({difference}); "
                        "committee members must share the test set (--test-images, data)")


def form_committee(members: list[Member]) -> Committee:
    check_same_test_set(members)
    stacked = np.stack([m.probs.astype(np.float64) for m in members])
    mean = stacked.mean(axis=0)
    return Committee(mean, mean.argmax(axis=1), members[0].labels, stacked.argmax(axis=2))


def committee_markdown(members: list[Member], committee: Committee) -> str:
    n = len(committee.labels)
    rows = []
    for member, predicted in zip(members, committee.member_predictions):
        wrong = int((predicted != committee.labels).sum())
        rows.append([member.name, member.net, f"{percent(wrong / n)}% ({wrong})"])
    rows.append([f"**committee of {len(members)}**", "mean of the softmax outputs",
                 f"**{percent(committee.error())}% ({len(committee.wrong)})**"])
    text = (f"## Committee of {len(members)} nets on {n:,} test digits\n\n"
            + markdown_table(["member", "net", "test error (errors)"], rows))
    wrong_rows = [[int(i), int(committee.labels[i]), int(committee.predictions[i]),
                   f"{committee.probs[i, committee.predictions[i]]:.3f}",
                   " ".join(str(int(p)) for p in committee.member_predictions[:, i])]
                  for i in committee.wrong]
    text += f"\n### Test digits the committee still gets wrong ({len(wrong_rows)})\n\n"
    if wrong_rows:
        text += markdown_table(["test index", "true", "committee", "committee's mean probability",
                                "members' answers"], wrong_rows)
    else:
        text += "None.\n"
    return text


def build_parser():
    parser = OneLineErrorParser(
        prog="python -m gpumlp.committee",
        description="Average the softmax outputs of several trained nets on the test set (each at its "
                    "best-validation epoch) and compare the committee's test error with each member's. "
                    "Prints a markdown table, and the test digits the committee still gets wrong.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories tested on the same digits")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown to FILE")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        members = [load_member(path) for path in args.run_dirs]
        text = committee_markdown(members, form_committee(members))
        print(text, end="")
        if args.out:
            Path(args.out).write_text(text)
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
