"""`python reproduce_2010.py`: parse the flags, pick the device, load the data, train, and leave a
run directory. Every failure the user can cause ends in one `error:` line and a non-zero exit."""
from __future__ import annotations

import argparse
import sys

from gpumlp import nets
from gpumlp.commands import EXIT_INTERRUPTED, OneLineErrorParser, run_command
from gpumlp.config import DEFAULT_LR_DECAY, TrainConfig, validate


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="reproduce_2010.py",
        description="Reproduce Ciresan et al. (2010): a deep, big, simple MLP trained by online "
                    "back-propagation on MNIST digits deformed anew every epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    net = p.add_argument_group("network")
    net.add_argument("--net", type=int, default=4, choices=sorted(nets.PAPER_NETS),
                     help="one of the paper's nets: " + "; ".join(
                         f"{k}: {nets.describe(nets.layer_sizes(v))}" for k, v in nets.PAPER_NETS.items()))
    net.add_argument("--hidden", type=int, nargs="+", metavar="N",
                     help="hidden layer sizes of any other net (overrides --net)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=800)
    train.add_argument("--batch-size", type=int, default=1, help="1 is the paper's online mode; "
                       "larger batches take the mean gradient")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate of epoch 1")
    train.add_argument("--lr-decay", type=float, default=DEFAULT_LR_DECAY,
                       help="factor applied to the learning rate after every epoch")
    train.add_argument("--lr-min", type=float, default=1e-6, help="floor of the learning rate")
    train.add_argument("--momentum", type=float, default=0.0)
    train.add_argument("--seed", type=int, default=0, help="makes a run repeatable bit for bit on one device")
    train.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                       help="write checkpoint.npz every N epochs (and always at exit)")
    deform = p.add_argument_group("deformation (regenerated for every image every epoch)")
    deform.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train on the undeformed digits")
    deform.add_argument("--beta", type=float, default=15.0, help="max rotation and shear angle, degrees")
    deform.add_argument("--beta-1-7", type=float, default=7.5, help="max rotation and shear for digits 1 and 7")
    deform.add_argument("--gamma", type=float, default=15.0, help="max scaling, percent, per axis")
    deform.add_argument("--sigma", type=float, default=6.0, help="elastic: Gaussian smoothing sigma, pixels")
    deform.add_argument("--alpha", type=float, default=36.0, help="elastic: displacement scale, pixels")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help="MNIST directory (default $GPUMLP_DATA or ~/.cache/gpumlp; "
                      "downloaded there when missing)")
    data.add_argument("--validation", choices=("train", "holdout"), default="train",
                      help="train: the undeformed training images; holdout: the last 10,000 held out")
    data.add_argument("--train-images", type=int, metavar="N", help="use the first N training images")
    data.add_argument("--test-images", type=int, metavar="N", help="use the first N test images")
    run = p.add_argument_group("run")
    run.add_argument("--device", choices=("auto", "cuda", "cpu", "emulate"), default="auto",
                     help="auto: the GPU if there is one, else the numpy reference on the CPU; "
                          "emulate: the GPU code path on the CPU emulator (slow; for testing)")
    run.add_argument("--graph-steps", type=int, default=0, metavar="K",
                     help="training steps per captured CUDA graph (0: chosen automatically)")
    run.add_argument("--engine", choices=("auto", "graph", "persistent"), default="auto",
                     help="online training on a device: graph replays ~20 launches per image from CUDA "
                          "graphs; persistent trains many images per cooperative launch, each block's "
                          "weights on chip where they fit; auto takes persistent where the device and the net allow it")
    run.add_argument("--out", help="run directory (default runs/<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint "
                     "(its settings are kept; --epochs may extend it)")
    return p


def config_from_args(args) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**values)
    if config.hidden:
        config.net = None
    validate(config)
    return config


def choose_device(requested: str, log):
    """Returns a gpumlp.device.Device, or None for the numpy reference."""
    from gpumlp.device import CudaDevice, EmulatedDevice, gpu_unavailable_reason
    from gpumlp.errors import UserError
    if requested == "cpu":
        return None
    if requested == "emulate":
        return EmulatedDevice()
    why_not = gpu_unavailable_reason()
    if why_not is None:
        return CudaDevice()
    if requested == "cuda":
        raise UserError(f"--device cuda: no CUDA GPU is usable: {why_not}")
    log(f"no GPU found ({why_not}): training with the numpy reference on the CPU instead "
        f"(--device cpu); for the GPU run install gpumlp[cuda13] (or [cuda12]) on a machine with an NVIDIA GPU")
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    log = lambda message: print(message, flush=True)  # noqa: E731
    return run_command(lambda: run(args, argv, log))


def run(args, argv, log) -> int:
    from gpumlp.data import load_mnist
    from gpumlp.rundir import RunDir, code_version, default_run_dir
    from gpumlp.training import Run, TrainingDiverged, make_split

    if args.resume:
        run_dir = RunDir(args.resume)
        saved = run_dir.load_config()
        config = TrainConfig.from_dict(saved["settings"])
        if any(a == "--epochs" or a.startswith("--epochs=") for a in argv):
            config.epochs = args.epochs
        if any(a == "--device" or a.startswith("--device=") for a in argv):
            config.device = args.device
        # the engine the run started with, unless --engine is given again
        config.engine = saved.get("engine") or config.engine
        if any(a == "--engine" or a.startswith("--engine=") for a in argv):
            config.engine = args.engine
        validate(config)
    else:
        config = config_from_args(args)
        run_dir = RunDir(config.out or default_run_dir())

    device = choose_device(config.device, log)
    mnist = load_mnist(config.data_dir)
    split = make_split(mnist, config)
    trainer = make_trainer(config, split, device, log)
    if not args.resume:
        run_dir.create({"settings": config.to_dict(), "sizes": config.sizes,
                        "weights": nets.count_weights(config.sizes), "code_version": code_version(),
                        "device": trainer.device_name, "engine": getattr(trainer, "engine", None),
                        "command": ["reproduce_2010.py", *argv],
                        "train_images": len(split.train_labels), "val_images": len(split.val_labels),
                        "test_images": len(split.test_labels)})
    log(f"net {nets.describe(config.sizes)} ({nets.count_weights(config.sizes):,} weights), "
        f"batch size {config.batch_size}, {config.epochs} epochs, on {trainer.device_name}")
    log(f"run directory: {run_dir.path}")

    training = Run(config, split, trainer, run_dir, out=log)
    first_epoch = training.resume() if args.resume else 1
    try:
        summary = training.train(first_epoch)
    except KeyboardInterrupt:
        training.checkpoint()
        training.write_summary()
        print(f"interrupted: epoch {training.last_good[0]} is saved in {run_dir.path}; "
              f"continue with --resume {run_dir.path}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged:
        training.checkpoint()
        raise
    log(f"test error at best validation (epoch {summary['best_val_epoch']}): "
        f"{100 * summary['test_error_at_best_val']:.2f}%, best test error: {100 * summary['best_test_error']:.2f}%, "
        f"{summary['total_seconds']:.1f} s; weights_sha256 {summary['weights_sha256'][:16]}...")
    return 0


def make_trainer(config: TrainConfig, split, device, log):
    params = nets.init_params(config.sizes, config.seed)
    if device is None:
        if config.engine == "persistent":
            from gpumlp.errors import UserError
            raise UserError("--engine persistent needs a device (--device cuda or emulate), "
                            "but the run is on the CPU reference")
        from gpumlp.train_cpu import CpuTrainer
        return CpuTrainer(params, split.train_images, split.train_labels, config.batch_size,
                          config.momentum, config.deform_config(), config.seed)
    from gpumlp.train_gpu import DeviceTrainer
    from gpumlp.train_persistent import PersistentTrainer, choose_engine
    engine, why = choose_engine(config.engine, device, config.sizes, config.batch_size)
    log(f"engine: {engine} ({why})")
    trainer_class = PersistentTrainer if engine == "persistent" else DeviceTrainer
    return trainer_class(device, params, split, config, log)
