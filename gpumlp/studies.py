"""`python -m gpumlp.studies ablation|seeds --out DIR [training flags]`: small experiments around
the paper's claim, each a markdown table.

    ablation   the same net, seed and epochs trained with and without the deformation
    seeds      N seeds of one setting: the test error's mean and standard deviation

Every training flag not named here goes unchanged to reproduce_2010.py (e.g. --hidden 300
--epochs 20 --device cpu). The runs live under --out, one folder each; a study started again
reuses the runs that finished and resumes the ones that were interrupted.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from gpumlp import cli
from gpumlp.commands import EXIT_INTERRUPTED, OneLineErrorParser, run_command
from gpumlp.config import TrainConfig
from gpumlp.errors import UserError
from gpumlp.results import FinishedRun, duration, load_run, markdown_table, percent, plural
from gpumlp.rundir import RunDir


class TrainingFailed(Exception):
    """reproduce_2010.py failed and has already printed its one-line error; carries its exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def refuse_flags(passthrough: list[str], flags: tuple, why: str) -> None:
    """The study sets these flags itself; a copy among the user's would fight it."""
    for argument in passthrough:
        if argument.split("=")[0] in flags:
            raise UserError(f"{argument.split('=')[0]} cannot be passed through: {why}")


# Settings that say where a run reads and writes, not what it computes: a rerun may change them.
WHERE_SETTINGS = ("out", "data_dir", "checkpoint_every")


def settings_of(flags: list[str]) -> dict:
    """The settings reproduce_2010.py would train with under these flags (in any order or spelling)."""
    return cli.config_from_args(cli.build_parser().parse_args(flags)).to_dict()


def differing_settings(recorded: dict, wanted: dict) -> list[str]:
    """'name RECORDED, not WANTED' for every setting that changes what the run computes."""
    recorded = TrainConfig.from_dict(recorded).to_dict()   # a setting added since takes its default
    return [f"{name} {recorded[name]}, not {wanted[name]}" for name in wanted
            if name not in WHERE_SETTINGS and recorded[name] != wanted[name]]


def train_run(run_dir: Path, flags: list[str], log=print) -> FinishedRun:
    """reproduce_2010.py FLAGS --out RUN_DIR, unless RUN_DIR already holds that run: finished, it is
    reused; interrupted, it is resumed. A RUN_DIR made with other settings is an error."""
    run_dir = Path(run_dir)
    wanted = settings_of([*flags, "--out", str(run_dir)])
    if (run_dir / "config.json").is_file():
        recorded = RunDir(run_dir).load_config()["settings"]   # one error line when there are none
        differences = differing_settings(recorded, wanted)
        if differences:
            raise UserError(f"{run_dir} holds a run made with other settings ({'; '.join(differences)}); "
                            "choose another --out")
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if summary and summary["epochs_completed"] == summary["epochs_planned"]:
            log(f"{run_dir}: finished earlier, reused")
            return load_run(run_dir)
        log(f"{run_dir}: unfinished, resuming")
        data_dir = ["--data-dir", wanted["data_dir"]] if wanted["data_dir"] else []
        code = cli.main(["--resume", str(run_dir), *data_dir])
    else:
        log(f"training: reproduce_2010.py {' '.join(flags)} --out {run_dir}")
        code = cli.main([*flags, "--out", str(run_dir)])
    if code == EXIT_INTERRUPTED:
        advise_rerun(f", and {run_dir} up to its last saved epoch")
    if code != 0:
        raise TrainingFailed(code)
    return load_run(run_dir)


def advise_rerun(kept: str = "") -> None:
    print(f"interrupted: every finished run is kept{kept}; run the same command again to continue",
          file=sys.stderr)


def run_study(action) -> int:
    """run_command, plus: a failed training run returns its own exit code (its error is printed),
    and Ctrl-C between the runs says how to continue."""
    def guarded() -> int:
        try:
            return action()
        except TrainingFailed as failure:
            return failure.code
        except KeyboardInterrupt:
            advise_rerun()
            return EXIT_INTERRUPTED
    return run_command(guarded)


def result_columns(run: FinishedRun) -> list[str]:
    s = run.summary
    return [f"{percent(s['test_error_at_best_val'])} (epoch {s['best_val_epoch']})",
            f"{percent(s['best_test_error'])} (epoch {s['best_test_epoch']})",
            percent(s["final_test_error"]), duration(s["total_seconds"])]


RESULT_HEADER = ["test error at best validation [%]", "best test error [%]", "final test error [%]",
                 "training time"]


def describe_setting(run: FinishedRun) -> str:
    from gpumlp import nets
    s, settings = run.summary, run.settings
    images = (f"{plural(run.config.get('train_images'), 'training image')} and "
              f"{plural(run.config.get('test_images'), 'test image')}")
    return (f"net {nets.describe(run.sizes)}, {plural(s['epochs_completed'], 'epoch')}, batch size "
            f"{settings['batch_size']}, learning rate {settings['lr']:g}, momentum {settings['momentum']:g}, "
            f"{images}, on {s['device']}")


def write_table(out: Path, name: str, text: str) -> None:
    (out / name).write_text(text)
    print(text, end="")
    print(f"(written to {out / name})")


# -- ablation --------------------------------------------------------------------------------------
def ablation(out: Path, passthrough: list[str]) -> int:
    refuse_flags(passthrough, ("--no-augment", "--out", "--resume"),
                 "the ablation trains both with and without deformation, under --out")
    variants = [("deformed anew every epoch (the paper)", "deformed", []),
                ("undeformed (--no-augment)", "undeformed", ["--no-augment"])]
    runs = [(label, train_run(out / folder, [*passthrough, *extra])) for label, folder, extra in variants]
    rows = [[label, *result_columns(run), percent(run.metrics[-1]["train_error"])] for label, run in runs]
    text = ("## Ablation: training digits deformed or not\n\n"
            f"Both runs: {describe_setting(runs[0][1])}, seed {runs[0][1].settings['seed']}.\n\n"
            + markdown_table(["training digits", *RESULT_HEADER, "training error in the last epoch [%]"], rows))
    write_table(out, "ablation.md", text)
    return 0


# -- seeds -----------------------------------------------------------------------------------------
def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seeds(out: Path, count: int, first_seed: int, passthrough: list[str]) -> int:
    refuse_flags(passthrough, ("--seed", "--out", "--resume"), "the study sets a seed per run, under --out")
    if count < 1:
        raise UserError("--seeds must be at least 1")
    runs = [(seed, train_run(out / f"seed_{seed}", [*passthrough, "--seed", str(seed)]))
            for seed in range(first_seed, first_seed + count)]
    rows = [[seed, *result_columns(run)] for seed, run in runs]
    at_best_val = mean_and_std([run.summary["test_error_at_best_val"] for _, run in runs])
    best_test = mean_and_std([run.summary["best_test_error"] for _, run in runs])
    final = mean_and_std([run.summary["final_test_error"] for _, run in runs])
    rows.append([f"**mean ± std of {count}**", *[f"**{percent(m)} ± {percent(s)}**" for m, s in
                                                (at_best_val, best_test, final)], ""])
    text = (f"## Seeds: {plural(count, 'run')} differing only in the seed\n\n"
            f"Every run: {describe_setting(runs[0][1])}. The seed sets the initial weights, the order "
            "of the digits and the deformations. Standard deviation: the sample one (n - 1).\n\n"
            + markdown_table(["seed", *RESULT_HEADER], rows))
    write_table(out, "seeds.md", text)
    return 0


def build_parser():
    parser = OneLineErrorParser(
        prog="python -m gpumlp.studies", allow_abbrev=False,
        description="Small studies trained through reproduce_2010.py; every flag not listed here "
                    "(e.g. --hidden 300 --epochs 20 --device cpu --train-images 10000) is passed to it. "
                    "Finished runs under --out are reused and interrupted ones resumed.")
    passthrough = ("Every other flag goes to reproduce_2010.py, e.g. --hidden 300 --epochs 20 "
                   "--batch-size 16 --lr 0.02 --device cpu --train-images 10000.")
    commands = parser.add_subparsers(dest="study", required=True, metavar="{ablation,seeds}",
                                     parser_class=OneLineErrorParser)
    ablate = commands.add_parser("ablation", allow_abbrev=False,
                                 help="the same run with and without the deformation",
                                 description="Train the same net at the same seed and epochs with and "
                                             "without the per-epoch deformation; writes OUT/ablation.md.",
                                 epilog=passthrough)
    ablate.add_argument("--out", required=True, metavar="DIR", help="folder for the two runs and the table")
    seed = commands.add_parser("seeds", allow_abbrev=False, help="N seeds of one setting: mean and std",
                               description="Train N runs differing only in --seed; writes OUT/seeds.md "
                                           "with each run and the mean and standard deviation.",
                               epilog=passthrough)
    seed.add_argument("--seeds", type=int, required=True, metavar="N", help="number of runs")
    seed.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST_SEED .. FIRST_SEED+N-1")
    seed.add_argument("--out", required=True, metavar="DIR", help="folder for the runs and the table")
    return parser


def main(argv=None) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    out = Path(args.out)

    def command() -> int:
        if args.study == "ablation":
            return ablation(out, passthrough)
        return seeds(out, args.seeds, args.first_seed, passthrough)

    return run_study(command)


if __name__ == "__main__":
    sys.exit(main())
