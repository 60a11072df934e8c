"""`python -m gpumlp.committee RUN_DIR RUN_DIR [...] [--show-errors N]`: a committee of trained nets.

The committee averages its members' softmax outputs on the test set (each member's predictions at
its best-validation epoch, predictions.npz `best_val_probs`) and answers with the largest mean;
ties go to the lower digit, as numpy's argmax. The members must have been tested on the same
digits: their test labels are compared before anything is averaged. One member, or one run given
twice (the same folder, or identical outputs), is refused.
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
from gpumlp.results import load_predictions, markdown_table, percent, plural
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
            difference = f"{plural(len(other.labels), 'test digit')} against {len(first.labels):,}"
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


def check_distinct(members: list[Member]) -> None:
    """A committee of one net, or of one net twice, is that net: refused as a mistake."""
    if len(members) < 2:
        raise UserError(f"a committee needs at least 2 run directories, got {len(members)}")
    for k, member in enumerate(members):
        for earlier in members[:k]:
            if Path(member.name).resolve() == Path(earlier.name).resolve():
                raise UserError(f"{member.name} is given twice; a committee needs different nets")
            if np.array_equal(member.probs, earlier.probs):
                raise UserError(f"{member.name} and {earlier.name} have identical test outputs (one run "
                                "twice?); a committee needs different nets")


def error_summary(committee: Committee, most_common: int = 5) -> str:
    """Where the committee's errors come from, in a few lines: how many every member shares, how
    many it fixes or adds, and its most frequent confusions."""
    labels, wrong = committee.labels, committee.wrong
    members_wrong = committee.member_predictions != labels            # (members, N)
    all_wrong = int(members_wrong[:, wrong].all(axis=0).sum())
    right = committee.predictions == labels
    fixed = int((right & members_wrong.any(axis=0)).sum())
    lines = [f"- the committee is right on {plural(fixed, 'test digit')} that at least one member gets wrong"]
    if len(wrong):
        lines.insert(0, f"- every member is wrong on {all_wrong} of them too; at least one member is right "
                        f"on {len(wrong) - all_wrong}")
        pairs, counts = np.unique(np.stack([labels[wrong], committee.predictions[wrong]]), axis=1,
                                  return_counts=True)
        order = np.lexsort((pairs[1], pairs[0], -counts))[:most_common]
        lines.append("- most frequent confusions (true → committee's answer): "
                     + ", ".join(f"{pairs[0, k]} → {pairs[1, k]} ({counts[k]})" for k in order))
    return "\n".join(lines) + "\n"


def committee_markdown(members: list[Member], committee: Committee, show_errors: int = 0) -> str:
    n = len(committee.labels)
    rows = []
    for member, predicted in zip(members, committee.member_predictions):
        wrong = int((predicted != committee.labels).sum())
        rows.append([member.name, member.net, f"{percent(wrong / n)}% ({wrong})"])
    rows.append([f"**committee of {len(members)}**", "mean of the softmax outputs",
                 f"**{percent(committee.error())}% ({len(committee.wrong)})**"])
    text = (f"## Committee of {len(members)} nets on {plural(n, 'test digit')}\n\n"
            + markdown_table(["member", "net", "test error (errors)"], rows))
    text += (f"\n### The committee's errors: {plural(len(committee.wrong), 'test digit')}\n\n"
             + error_summary(committee))
    listed = committee.wrong[:show_errors]
    if len(listed):
        more = f"the first {len(listed)} of {len(committee.wrong)}" if len(listed) < len(committee.wrong) else "all"
        text += f"\nThe wrong digits ({more}):\n\n" + markdown_table(
            ["test index", "true", "committee", "committee's mean probability", "members' answers"],
            [[int(i), int(committee.labels[i]), int(committee.predictions[i]),
              f"{committee.probs[i, committee.predictions[i]]:.3f}",
              " ".join(str(int(p)) for p in committee.member_predictions[:, i])] for i in listed])
    elif len(committee.wrong):
        text += "\n`--show-errors N` lists the first N of them digit by digit.\n"
    return text


def build_parser():
    parser = OneLineErrorParser(
        prog="python -m gpumlp.committee",
        description="Average the softmax outputs of several trained nets on the test set (each at its "
                    "best-validation epoch) and compare the committee's test error with each member's. "
                    "Prints a markdown table and a summary of the digits the committee still gets wrong.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories tested on the same digits")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown to FILE")
    parser.add_argument("--show-errors", type=int, default=0, metavar="N",
                        help="list the first N test digits the committee gets wrong (default: a summary only)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        if args.show_errors < 0:
            raise UserError(f"--show-errors must be at least 0, got {args.show_errors}")
        members = [load_member(path) for path in args.run_dirs]
        check_distinct(members)
        text = committee_markdown(members, form_committee(members), args.show_errors)
        print(text, end="")
        if args.out:
            Path(args.out).write_text(text)
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
