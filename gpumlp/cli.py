"""`python reproduce_2010.py`: parse the flags, pick the device, load the data, train, and leave a
run directory. Every failure the user can cause ends in one `error:` line and a non-zero exit."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from gpumlp import nets, stop_signals
from gpumlp.commands import EXIT_INTERRUPTED, OneLineErrorParser, Transcript, run_command
from gpumlp.config import DEFAULT_LR_DECAY, RESUMABLE, TrainConfig, validate
from gpumlp.data import DATA_DIR_ENV, resolve_data_dir
from gpumlp.errors import UserError
from gpumlp.rundir import RunDir, code_version, default_run_dir, read_config
from gpumlp.training import (Run, TrainingDiverged, clamp_notes, count, estimate_cpu_seconds, long_duration,
                             make_split)

# With --device auto and no usable GPU, a run estimated to take longer than this on the CPU is not
# started (--device cpu insists). Tests lower it.
CPU_AUTO_LIMIT_HOURS = 24
MNIST_TRAIN_IMAGES, MNIST_TEST_IMAGES = 60_000, 10_000
# The README's CPU quick recipe: an 841-800-10 net in minibatches, minutes per epoch on a laptop.
CPU_QUICK_RECIPE = "--device cpu --hidden 800 --batch-size 64 --lr 0.02 --momentum 0.9 --lr-decay 0.92 --epochs 40"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it is a value: not for switches (`--no-augment` would read
    "(default: True)") nor for flags whose help already says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="reproduce_2010.py",
        description="Reproduce Ciresan et al. (2010): a deep, big, simple MLP trained by online "
                    "back-propagation on MNIST digits deformed anew every epoch.",
        formatter_class=HelpFormatter)
    net = p.add_argument_group("network")
    net.add_argument("--net", type=int, default=4, choices=sorted(nets.PAPER_NETS),
                     help="one of the paper's nets: " + "; ".join(
                         f"{k}: {nets.describe(nets.layer_sizes(v))}" for k, v in nets.PAPER_NETS.items()))
    net.add_argument("--hidden", type=int, nargs="+", metavar="N",
                     help="hidden layer sizes of any other net (overrides --net)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=800, metavar="N",
                       help="passes over the training set (800 in the paper); on --resume, the new total")
    train.add_argument("--batch-size", type=int, default=1, help="1 is the paper's online mode; "
                       "larger batches take the mean gradient")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate of epoch 1")
    train.add_argument("--lr-decay", type=float, default=DEFAULT_LR_DECAY,
                       help="factor applied to the learning rate after every epoch")
    train.add_argument("--lr-min", type=float, default=1e-6, help="floor of the learning rate")
    train.add_argument("--momentum", type=float, default=0.0,
                       help="fraction of the previous update added to each update (0: none, as in the paper)")
    train.add_argument("--seed", type=int, default=0, help="makes a run repeatable bit for bit on one device")
    deform = p.add_argument_group("deformation (regenerated for every image every epoch)")
    deform.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train on the undeformed digits (default: deformed, as in the paper)")
    deform.add_argument("--beta", type=float, default=15.0, help="max rotation and shear angle, degrees")
    deform.add_argument("--beta-1-7", type=float, default=7.5, help="max rotation and shear for digits 1 and 7")
    deform.add_argument("--gamma", type=float, default=15.0, help="max scaling, percent, per axis")
    deform.add_argument("--sigma", type=float, default=6.0, help="elastic: Gaussian smoothing sigma, pixels")
    deform.add_argument("--alpha", type=float, default=36.0, help="elastic: displacement scale, pixels")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", metavar="DIR", help="MNIST directory, which must exist (default: "
                      "$GPUMLP_DATA, else ~/.cache/gpumlp; MNIST is downloaded there when missing)")
    data.add_argument("--validation", choices=("train", "holdout"), default="train",
                      help="train: the undeformed training images; holdout: the last 10,000 held out")
    data.add_argument("--train-images", type=int, metavar="N", help="use the first N training images (default: all)")
    data.add_argument("--test-images", type=int, metavar="N", help="use the first N test images (default: all)")
    run = p.add_argument_group("run")
    run.add_argument("--device", choices=("auto", "cuda", "cpu", "emulate"), default="auto",
                     help="auto: the GPU if there is one, else the numpy reference on the CPU (a run "
                          f"estimated above {CPU_AUTO_LIMIT_HOURS} h there is refused: --device cpu insists); "
                          "emulate: the GPU code path on the CPU emulator (slow; for testing)")
    run.add_argument("--graph-steps", type=int, default=0, metavar="K",
                     help="training steps per captured CUDA graph (0: chosen automatically)")
    run.add_argument("--engine", choices=("auto", "graph", "persistent", "spread"), default="auto",
                     help="online training on a device: graph replays ~18 launches per image (net 4) from CUDA "
                          "graphs; persistent trains many images per cooperative launch, each block's "
                          "weights on chip where they fit; auto takes persistent where the device and the net "
                          "allow it (both give the same weights, bit for bit); spread (only when asked for) "
                          "spreads every layer over the whole grid, weights in registers, shared memory and L2, "
                          "and sums in another order (the reference's result within its tolerance, not the "
                          "same bits); on --resume, the run's engine unless given")
    run.add_argument("--skip-selfcheck", action="store_true",
                     help="on a GPU, train without first checking the kernels against the reference "
                          "(the quick part of python -m gpumlp.selfcheck, a few seconds)")
    run.add_argument("--threads", type=int, metavar="N", help="BLAS threads of the CPU path (default: "
                     "chosen from the batch size and the cores; the header line says which)")
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/<timestamp>)")
    run.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                     help="write checkpoint.npz every N epochs (and at the end, and on a stop)")
    run.add_argument("--checkpoint-minutes", type=float, default=10.0, metavar="M",
                     help="also write it after any epoch that ends M minutes or more after the last one")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint; its "
                     f"settings are kept, only {', '.join(resumable_flags())} may be given")
    run.add_argument("--config", metavar="FILE", help="start a new run with the settings of a run's "
                     "config.json; flags given beside it override them")
    return p


def resumable_flags() -> list[str]:
    return ["--" + name.replace("_", "-") for name in RESUMABLE]


def given_dests(argv) -> set[str]:
    """The settings the command line sets itself (abbreviations and --flag=value included): argv
    parsed again with every default suppressed, so only what was given appears."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def flag_name(parser: argparse.ArgumentParser, dest: str) -> str:
    action = next(a for a in parser._actions if a.dest == dest)
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def config_from_args(args, given: set[str] = frozenset(), base: TrainConfig | None = None) -> TrainConfig:
    """The settings of a new run: `base` (from --config) with the given flags over it, or every
    flag's value (given or default) when there is no base."""
    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields and (base is None or k in given)}
    config = dataclasses.replace(base, **values) if base is not None else TrainConfig(**values)
    if "net" in given and "hidden" not in given:
        config.hidden = None
    if config.hidden:
        config.net = None
    config.out = args.out
    validate(config)
    return config


def choose_device(requested: str, log):
    """Returns a gpumlp.device.Device, or None for the numpy reference."""
    from gpumlp.device import CudaDevice, EmulatedDevice, probe_gpu
    from gpumlp.errors import UserError
    if requested == "cpu":
        return None
    if requested == "emulate":
        return EmulatedDevice()
    probe = probe_gpu()
    if probe.ok:
        log(f"GPU: {probe.description}")
        return CudaDevice()
    if requested == "cuda":
        raise UserError(f"--device cuda: no usable CUDA GPU: {probe.why}")
    log(f"no usable CUDA GPU ({probe.why}): training with the numpy reference on the CPU instead (--device cpu)")
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    with Transcript() as transcript, stop_signals.handled():
        return run_command(lambda: run(args, argv, parser, transcript))


def run(args, argv, parser, transcript) -> int:
    from gpumlp.data import load_mnist  # looked up at call time, so a test can substitute it
    log = transcript.print
    given = given_dests(argv)
    if args.resume:
        run_dir = RunDir(args.resume)
        config = resumed_config(run_dir, args, given, parser)
    else:
        base = None
        if args.config:
            config_file = Path(args.config) / "config.json" if Path(args.config).is_dir() else Path(args.config)
            base = TrainConfig.from_saved(read_config(config_file)["settings"], str(config_file))
        config = config_from_args(args, given, base)
        config.data_dir = os.path.abspath(resolve_data_dir(config.data_dir))
        run_dir = RunDir(config.out or default_run_dir())
        run_dir.check_new()

    device = choose_device(config.device, log)
    if device is not None and not device.is_emulated and not args.skip_selfcheck:
        from gpumlp.selfcheck import quick_check
        quick_check(device, log)
    check_host_memory(config, device)
    mnist = load_mnist(config.data_dir)
    for note in clamp_notes(mnist, config):
        log(note)
    split = make_split(mnist, config)
    trainer = make_trainer(config, split, device, log)
    first_epoch = run_dir.checkpoint_epoch() + 1 if args.resume else 1
    epochs_left = config.epochs - first_epoch + 1
    if device is None and epochs_left:
        seconds, rate = estimate_cpu_seconds(trainer, split, config, epochs_left)
        log(f"estimated time on the CPU: {long_duration(seconds)} for {count(epochs_left, 'epoch')} "
            f"({rate:,.1f} training images/s, timed on the first images)")
        if config.device == "auto" and seconds > CPU_AUTO_LIMIT_HOURS * 3600:
            raise UserError(refusal(seconds, argv))

    training = None
    try:
        with stop_signals.held():  # a stop while the directory is made takes effect once it is whole
            if args.resume:
                run_dir.update_config({name: getattr(config, name) for name in RESUMABLE},
                                      {"engine": getattr(trainer, "engine", None)})
            else:
                run_dir.create({"settings": config.to_dict(), "sizes": config.sizes,
                                "weights": nets.count_weights(config.sizes), "code_version": code_version(),
                                "device": trainer.device_name, "engine": getattr(trainer, "engine", None),
                                "command": ["reproduce_2010.py", *argv],
                                "train_images": len(split.train_labels), "val_images": len(split.val_labels),
                                "test_images": len(split.test_labels),
                                "blas_threads": getattr(trainer, "blas_threads", None)}, trainer.get_state())
            transcript.attach(run_dir.log_path(), f"reproduce_2010.py {' '.join(argv)}")
            for name, value in header_facts(config, split, trainer, run_dir).items():
                log(f"{name}: {value}")
            training = Run(config, split, trainer, run_dir, out=log, progress_stream=transcript.terminal_stderr)
            if args.resume:
                training.resume()
            else:
                training.write_summary()
        summary = training.train(first_epoch)
    except (KeyboardInterrupt, stop_signals.StopRequested) as stop:
        if training is None:
            raise
        stop_signals.stopping()
        training.checkpoint()
        training.write_summary()
        signal_name = getattr(stop, "name", "SIGINT")
        what = "interrupted" if signal_name == "SIGINT" else f"stopped by {signal_name}"
        try:
            print(f"{what}: {training.saved_text()} in {run_dir.path}; "
                  f"continue with --resume {run_dir.path}", file=sys.stderr)
        except OSError:  # the terminal that hung up is gone; train.log has the line
            pass
        return getattr(stop, "exit_code", EXIT_INTERRUPTED)
    except TrainingDiverged:
        training.checkpoint()
        raise
    log(f"test error at best validation (epoch {summary['best_val_epoch']}): "
        f"{100 * summary['test_error_at_best_val']:.2f}%, best test error: {100 * summary['best_test_error']:.2f}%, "
        f"{summary['total_seconds']:.1f} s; weights_sha256 {summary['weights_sha256'][:16]}...")
    return 0


def resumed_config(run_dir, args, given: set[str], parser) -> TrainConfig:
    """The run's recorded settings, with the flags a resume may change applied; any other flag
    given is an error, as it would be silently dropped."""
    refused = sorted(given - set(RESUMABLE) - {"resume", "skip_selfcheck"}, key=lambda d: argparse_order(parser, d))
    if refused:
        flags = ", ".join(flag_name(parser, d) for d in refused)
        raise UserError(f"{flags} cannot be changed on --resume (a run keeps its settings; only "
                        f"{', '.join(resumable_flags())} may be given); to train with other settings, "
                        f"start a new run from this one's: --config {run_dir.path / 'config.json'}")
    saved = run_dir.load_config()
    config = TrainConfig.from_saved(saved["settings"], f"{run_dir.path}/config.json")
    # the BLAS threads change the float32 sums on the CPU: keep the ones the run started with
    config.threads = config.threads or saved.get("blas_threads")
    for name in RESUMABLE:
        if name in given:
            setattr(config, name, getattr(args, name))
    if "engine" not in given and saved.get("engine") and config.device != "cpu":
        config.engine = saved["engine"]   # the engine the run trained with, not auto's choice made anew
    if "data_dir" not in given and os.environ.get(DATA_DIR_ENV):
        config.data_dir = os.environ[DATA_DIR_ENV]
    config.data_dir = os.path.abspath(resolve_data_dir(config.data_dir))
    validate(config)
    done = run_dir.checkpoint_epoch()
    if config.epochs < done:
        raise UserError(f"--epochs {config.epochs} is fewer than the {count(done, 'epoch')} already done "
                        f"in {run_dir.path}")
    return config


def argparse_order(parser, dest: str) -> int:
    return next(i for i, a in enumerate(parser._actions) if a.dest == dest)


def refusal(seconds: float, argv) -> str:
    """The one-line reason a run on the CPU fallback is not started, and what to run instead."""
    command = " ".join(["python reproduce_2010.py", *argv])
    return (f"no usable GPU (see above), and on the CPU this run would take about {long_duration(seconds)}, "
            f"more than {CPU_AUTO_LIMIT_HOURS} h, so it was not started; for a CPU run of minutes use "
            f"the quick recipe: python reproduce_2010.py {CPU_QUICK_RECIPE}; to train this net on the "
            f"CPU anyway: {command} --device cpu")


def header_facts(config: TrainConfig, split, trainer, run_dir) -> dict:
    """What the run is, one line each, printed before training (and so kept in train.log)."""
    validation = ("the training images, undeformed" if config.validation == "train"
                  else "held out from the training images")
    return {
        "net": f"{nets.describe(config.sizes)} ({nets.count_weights(config.sizes):,} weights), batch size "
               f"{config.batch_size}, {count(config.epochs, 'epoch')}",
        "images": f"{len(split.train_labels):,} training ({'deformed anew every epoch' if config.augment else 'undeformed'}), "
                  f"{len(split.val_labels):,} validation ({validation}), {len(split.test_labels):,} test; "
                  f"from {config.data_dir}",
        "device": trainer.device_name,
        **({"engine": f"{trainer.engine} ({trainer.engine_reason})"} if hasattr(trainer, "engine") else {}),
        "BLAS threads": getattr(trainer, "threads_note", "none used (the arithmetic runs on the device)"),
        "run directory": str(run_dir.path),
    }


def host_memory_needed(config: TrainConfig, on_device: bool) -> int:
    """Bytes of host memory the run holds at its peak, before any data is read: float32 weights
    (the trainer's, momentum velocities, the last finished epoch's copy and the next one being
    taken, gradients on the CPU) and the images (MNIST's counts or fewer; on the CPU, plus the
    deformed copy)."""
    weight_copies = 5 if on_device else 8
    n_train = min(config.train_images or MNIST_TRAIN_IMAGES, MNIST_TRAIN_IMAGES)
    n_test = min(config.test_images or MNIST_TEST_IMAGES, MNIST_TEST_IMAGES)
    images = n_train * (2 if config.augment and not on_device else 1) + n_test
    return 4 * (weight_copies * nets.count_weights(config.sizes) + nets.N_INPUTS * images)


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), else the physical memory, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_host_memory(config: TrainConfig, device) -> None:
    needed, available = host_memory_needed(config, device is not None), available_host_memory()
    if available is not None and needed > available:
        raise UserError(f"net {nets.describe(config.sizes)} needs about {needed / 2**30:,.1f} GiB of host memory "
                        f"({nets.count_weights(config.sizes):,} weights, kept in several float32 copies, and the "
                        f"images), but {available / 2**30:,.1f} GiB is available: choose a smaller net")


def make_trainer(config: TrainConfig, split, device, log):
    params = nets.init_params(config.sizes, config.seed)
    if device is None:
        if config.engine in ("persistent", "spread"):
            raise UserError(f"--engine {config.engine} needs a device (--device cuda or emulate), "
                            "but the run is on the CPU reference")
        from gpumlp.train_cpu import CpuTrainer
        return CpuTrainer(params, split.train_images, split.train_labels, config.batch_size,
                          config.momentum, config.deform_config(), config.seed,
                          threads=config.threads, last_epoch=config.epochs)
    from gpumlp.train_gpu import DeviceTrainer
    from gpumlp.train_persistent import PersistentTrainer, choose_engine
    from gpumlp.train_spread import SpreadTrainer
    engine, why = choose_engine(config.engine, device, config.sizes, config.batch_size)
    trainer_class = {"persistent": PersistentTrainer, "spread": SpreadTrainer}.get(engine, DeviceTrainer)
    trainer = trainer_class(device, params, split, config, log)
    trainer.engine_reason = why
    return trainer
