"""`python -m gpumlp.paper_table`: the paper's Table 1 (its five nets) beside this reproduction's.

Trains the nets through reproduce_2010.py (one folder per net under --out; every flag not named
here, e.g. --epochs 20 --device cuda --train-images 10000, is passed to it), or collects finished
run directories with --collect, and writes the table in markdown.
"""
from __future__ import annotations

import sys
from pathlib import Path

from gpumlp import nets
from gpumlp.commands import OneLineErrorParser
from gpumlp.errors import UserError
from gpumlp.results import PAPER_EPOCHS, FinishedRun, duration, load_run, markdown_table, paper_net_id, percent
from gpumlp.studies import refuse_flags, run_study, train_run

HEADER = ["ID", "architecture (neurons per layer)", "weights [millions]", "epochs",
          "test error for best validation [%]", "paper", "best test error [%]", "paper",
          "training time", f"paper (GTX 280, {PAPER_EPOCHS} epochs)", "device"]


def table_row(run: FinishedRun) -> list:
    net = paper_net_id(run.sizes)
    s = run.summary
    paper = nets.PAPER_RESULTS.get(net)
    return [net if net is not None else "-", nets.describe(run.sizes), f"{nets.count_weights(run.sizes) / 1e6:.2f}",
            s["epochs_completed"],
            percent(s["test_error_at_best_val"]), f"{paper[0]:.2f}" if paper else "-",
            percent(s["best_test_error"]), f"{paper[1]:.2f}" if paper else "-",
            duration(s["total_seconds"]), f"{paper[2]} h" if paper else "-", s["device"]]


def paper_table_markdown(runs: list[FinishedRun]) -> str:
    ordered = sorted(runs, key=lambda run: (paper_net_id(run.sizes) or len(nets.PAPER_NETS) + 1, str(run.path)))
    images = sorted({f"{run.config.get('train_images', '?')} training / {run.config.get('test_images', '?')} test"
                     for run in runs})
    return ("## Table 1 of Ciresan et al. (2010), reproduced\n\n"
            + markdown_table(HEADER, [table_row(run) for run in ordered])
            + f"\nThis reproduction: {'; '.join(images)} images; runs: "
            + ", ".join(f"`{run.path}`" for run in ordered)
            + f".\nPaper: {PAPER_EPOCHS} epochs on 60,000 deformed training digits, tested on 10,000, trained "
              "on a GTX 280. Test error for best validation: the test error at the epoch of lowest "
              "validation error.\n")


def build_parser():
    parser = OneLineErrorParser(
        prog="python -m gpumlp.paper_table", allow_abbrev=False,
        description="Train the paper's five nets (or collect finished runs) and write the paper's "
                    "Table 1 beside this reproduction's numbers, in markdown. Every flag not listed "
                    "here (e.g. --epochs 20 --device cuda --train-images 10000) is passed to "
                    "reproduce_2010.py; finished runs under --out are reused, interrupted ones resumed.")
    parser.add_argument("--nets", type=int, nargs="+", choices=sorted(nets.PAPER_NETS), metavar="ID",
                        default=sorted(nets.PAPER_NETS), help="which of the five nets to train (default: all)")
    parser.add_argument("--out", default="runs/paper_table", metavar="DIR",
                        help="folder for the runs (DIR/net1 ...) and DIR/paper_table.md")
    parser.add_argument("--collect", nargs="+", metavar="RUN_DIR",
                        help="tabulate these finished run directories instead of training")
    parser.add_argument("--table", metavar="FILE", help="write the markdown here (default: "
                        "DIR/paper_table.md when training; only printed when collecting)")
    return parser


def main(argv=None) -> int:
    args, passthrough = build_parser().parse_known_args(argv)

    def command() -> int:
        if args.collect:
            if passthrough:
                raise UserError(f"training flags ({' '.join(passthrough)}) have no effect with --collect")
            runs = [load_run(path) for path in args.collect]
            table = Path(args.table) if args.table else None
        else:
            refuse_flags(passthrough, ("--net", "--hidden", "--out", "--resume"),
                         "the table trains each of --nets under --out")
            out = Path(args.out)
            runs = [train_run(out / f"net{net}", ["--net", str(net), *passthrough]) for net in args.nets]
            table = Path(args.table) if args.table else out / "paper_table.md"
        text = paper_table_markdown(runs)
        print(text, end="")
        if table:
            table.write_text(text)
            print(f"(written to {table})")
        return 0

    return run_study(command)


if __name__ == "__main__":
    sys.exit(main())
