"""`python -m gpumlp.report RUN_DIR [--out DIR]`: the pictures a reader looks at after a run, and
report.md.

Written into the run directory (or into --out DIR, the run directory then only read):
    curves.png        loss; training, validation and test error per epoch (linear and log scale)
    filters.png       receptive fields of the first layer's first 100 units (best.npz)
    deformations.png  training digits beside their deformations in the run's first epochs, made
                      by the code the run used (CUDA kernel, emulated kernel, or numpy reference)
    errors.png        every misclassified test digit at the best-validation epoch, and correct ones
    training.gif      receptive fields and curves across the epochs (snapshots/)
    report.md         the summary beside the paper's numbers, linking the pictures; every setting

Matplotlib is imported only when drawing.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import textwrap
from pathlib import Path

import numpy as np

from gpumlp import nets
from gpumlp.commands import OneLineErrorParser, run_command
from gpumlp.errors import UserError
from gpumlp.results import (PAPER_EPOCHS, FinishedRun, duration, load_predictions, load_run, load_split,
                            markdown_table, paper_net_id, percent, plural)
from gpumlp.rundir import RunDir, RunDirError

SIDE = 29
DEFORMATION_TITLE_POINTS = 9
DEFORMED_EPOCHS = 6            # columns of deformations.png: what epochs 1..6 showed the net
MAX_ERRORS_SHOWN = 500         # an early, poor net can get thousands wrong; the picture stays legible
CORRECT_SAMPLE = 40
MOSAIC_COLUMNS = 20
MAX_GIF_BYTES = 2_000_000
GIF_FRAME_MS = 250


# -- images ----------------------------------------------------------------------------------------
def mosaic(images: np.ndarray, columns: int, gap: int = 1) -> np.ndarray:
    """(N, 841) -> one 2-D array of 29x29 tiles, `columns` per row; NaN between and after tiles."""
    n = len(images)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    step = SIDE + gap
    out = np.full((rows * step - gap, columns * step - gap), np.nan, np.float32)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        out[r * step:r * step + SIDE, c * step:c * step + SIDE] = image.reshape(SIDE, SIDE)
    return out


def normalise_units(W: np.ndarray) -> np.ndarray:
    """Each unit's weights scaled into [-1, 1] by its own largest magnitude, so weak units show."""
    W = np.asarray(W, np.float32)
    scale = np.abs(W).max(axis=1, keepdims=True)
    return W / np.where(scale > 0, scale, 1)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _gray(plt):
    """Gray colour map drawing NaN (the gaps of a mosaic) white."""
    return plt.get_cmap("gray").with_extremes(bad="white")


# -- curves.png ----------------------------------------------------------------------------------
def readable_axes(ax, log: bool) -> None:
    """Whole-epoch ticks (one at least, so a 1-epoch run gets its 1, not 0.995 and 1.005); on a log
    axis plain numbers (0.5, 2, 20, not 5x10^-1): at 1, 2, 3 and 5 of each decade, or at every tick
    when the axis spans less than a decade."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if log:
        def plain_label(value, _position):
            low, high = ax.get_ylim()
            mantissa = value / 10 ** np.floor(np.log10(value))
            wanted = np.arange(1, 10) if high < 10 * low else np.array([1, 2, 3, 5])
            return f"{value:g}" if np.isclose(mantissa, wanted).any() else ""
        ax.yaxis.set_major_formatter(FuncFormatter(plain_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(plain_label))
    ax.grid(alpha=0.3, which="both")


def epoch_limits(epochs: list) -> tuple[float, float]:
    """The x range of a curve: half an epoch beyond its ends, so even one epoch has a width."""
    pad = max(0.5, 0.02 * (epochs[-1] - epochs[0]))
    return epochs[0] - pad, epochs[-1] + pad


def log_error_limits(percents: list) -> tuple[float, float]:
    """The y range of a log error axis: the values with a margin, never above 110% (an error rate
    cannot pass 100%, and matplotlib widens a narrow log range by whole decades, to 1000%)."""
    low, high = min(percents), max(percents)
    return low / 1.3, min(high * 1.3, 110.0)


def line_style(points: int) -> str:
    """Markers only where they can be told apart."""
    return "o-" if points <= 60 else "-"


def error_series(validation: str):
    """(metric, legend label, colour) of the three error curves."""
    val_label = "validation (undeformed training digits)" if validation == "train" else "validation (held out)"
    return (("train_error", "training (deformed, during the epoch)", "tab:blue"),
            ("val_error", val_label, "tab:orange"),
            ("test_error", "test", "tab:green"))


def curves_figure(metrics: list, best_val_epoch: int, validation: str):
    plt = _pyplot()
    epochs = [r["epoch"] for r in metrics]
    style = line_style(len(epochs))
    fig, (loss_ax, err_ax, log_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    loss_ax.plot(epochs, [r["train_loss"] for r in metrics], style, ms=3, color="tab:purple")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="mean cross-entropy")
    logged = [100 * max(r[key], 1e-5) for r in metrics for key, _, _ in error_series(validation)]
    for ax, log in ((err_ax, False), (log_ax, True)):
        for key, label, colour in error_series(validation):
            ax.plot(epochs, [100 * (max(r[key], 1e-5) if log else r[key]) for r in metrics], style, ms=3,
                    label=label, color=colour)
        if best_val_epoch:
            ax.axvline(best_val_epoch, color="gray", ls=":", label=f"best validation (epoch {best_val_epoch})")
        ax.set(title=f"error rate ({'log' if log else 'linear'} scale)", xlabel="epoch", ylabel="error %",
               yscale="log" if log else "linear")
        if log:
            ax.set_ylim(*log_error_limits(logged))
    for ax in (loss_ax, err_ax, log_ax):
        ax.set_xlim(*epoch_limits(epochs))
        readable_axes(ax, log=ax is log_ax)
    err_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(metrics: list, best_val_epoch: int, validation: str, path: Path) -> None:
    fig = curves_figure(metrics, best_val_epoch, validation)
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)


# -- filters.png ---------------------------------------------------------------------------------
def plot_filters(W: np.ndarray, epoch: int, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 7.4))
    ax.imshow(mosaic(normalise_units(W), 10), cmap=_gray(plt), vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"first-layer receptive fields, {plural(len(W), 'unit')}, epoch {epoch} (best validation)\n"
                 "each unit scaled to its own largest weight; white = positive, black = negative",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- deformations.png ------------------------------------------------------------------------------
def deformation_engine(device_name: str) -> str:
    """The code a run deformed its digits with, from config.json's device name."""
    lowered = device_name.lower()
    if "emulat" in lowered:  # first: the emulator's name says it runs on the CPU too
        return "emulator"
    if "cpu" in lowered:
        return "reference"
    return "cuda"


def deform_with(engine: str, images, labels, indices, seed: int, epoch: int, cfg):
    """Deformed images (N, 841) from the given engine, keyed by dataset index like the training."""
    if engine == "reference":
        from gpumlp.deform import deform_images_ref
        return deform_images_ref(images, labels, indices, seed, epoch, cfg)[0]
    from gpumlp import ops_deform
    from gpumlp.device import CudaDevice, EmulatedDevice
    device = EmulatedDevice() if engine == "emulator" else CudaDevice()
    n = len(images)
    out, params = device.empty((n, images.shape[1])), device.empty((n, 4))
    ops_deform.deform_images(device, device.asarray(images, np.float32), device.asarray(labels, np.int32),
                             device.asarray(indices, np.int32), out, params, seed, epoch, cfg)
    return device.to_host(out)


def one_of_each_digit(labels: np.ndarray) -> np.ndarray:
    """Index of the first example of every digit present, in digit order."""
    return np.array([int(np.flatnonzero(labels == d)[0]) for d in range(10) if (labels == d).any()], np.int32)


def wrap_to_width(lines: list[str], width_inches: float, fontsize: float) -> str:
    """The lines, each wrapped to fit a figure this wide (a character is at most ~0.6 em wide)."""
    characters = max(20, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, characters) for line in lines)


def deformations_figure(originals, rows_of_deformed, epochs, title_lines: list[str]):
    plt = _pyplot()
    columns = [originals, *rows_of_deformed]
    tiles = np.stack(columns, axis=1).reshape(-1, originals.shape[1])   # digit-major: a row per digit
    width = 1 + 0.75 * len(columns)
    title = wrap_to_width(title_lines, width, DEFORMATION_TITLE_POINTS)
    fig, ax = plt.subplots(figsize=(width, 1 + 0.75 * len(originals) + 0.17 * (title.count("\n") + 1)))
    ax.imshow(mosaic(tiles, len(columns), gap=3), cmap=_gray(plt), vmin=-1, vmax=1, interpolation="nearest")
    step = SIDE + 3
    ax.set_xticks([SIDE / 2 + k * step for k in range(len(columns))],
                  ["original", *[f"epoch {e}" for e in epochs]], fontsize=8)
    ax.set_yticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=DEFORMATION_TITLE_POINTS)
    fig.tight_layout()
    return fig


def draw_deformations(run: FinishedRun, train_images, train_labels, path: Path) -> str:
    """deformations.png; returns the sentence report.md uses to say how it was made."""
    from gpumlp.config import TrainConfig
    from gpumlp.device import gpu_available
    settings = TrainConfig.from_dict(run.settings)
    cfg = dataclasses.replace(settings, augment=True).deform_config()
    engine = deformation_engine(run.config.get("device", "cpu"))
    note = ""
    if engine == "cuda" and not gpu_available():
        engine = "reference"
        note = " (the run used the CUDA kernel, but no GPU is here; the reference computes the same deformation)"
    indices = one_of_each_digit(train_labels)
    epochs = list(range(1, DEFORMED_EPOCHS + 1))
    deformed = [deform_with(engine, train_images[indices], train_labels[indices], indices, settings.seed, e, cfg)
                for e in epochs]
    engine_name = {"reference": "numpy reference", "emulator": "CUDA kernel on the CPU emulator",
                   "cuda": "CUDA kernel on the GPU"}[engine]
    unused = "NOT used by this run (--no-augment)"
    title = [f"training digits as epochs 1-{DEFORMED_EPOCHS} deform them (seed {settings.seed}; {engine_name})",
             *([] if settings.augment else [unused]),
             f"rotation/shear up to {cfg.beta:g} deg ({cfg.beta_1_7:g} for 1 and 7), scaling up to "
             f"{cfg.gamma:g}%, elastic sigma {cfg.sigma:g}, alpha {cfg.alpha:g}"]
    plt = _pyplot()
    fig = deformations_figure(train_images[indices], deformed, epochs, title)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"made by the {engine_name}{note}" + ("" if settings.augment else f" -- {unused}")


# -- errors.png ------------------------------------------------------------------------------------
def plot_errors(test_images, labels, predicted, path: Path, seed: int = 0) -> None:
    """Every misclassified digit (up to MAX_ERRORS_SHOWN) labelled `true -> predicted`, then a
    random sample of correctly classified ones."""
    plt = _pyplot()
    wrong = np.flatnonzero(predicted != labels)
    correct = np.flatnonzero(predicted == labels)
    shown_wrong = wrong[:MAX_ERRORS_SHOWN]
    rng = np.random.default_rng(seed)
    shown_correct = np.sort(rng.choice(correct, size=min(CORRECT_SAMPLE, len(correct)), replace=False))
    panels = [(shown_wrong, "tab:red", f"{plural(len(wrong), 'misclassified test digit')}"
               + (f" (first {MAX_ERRORS_SHOWN} shown)" if len(wrong) > MAX_ERRORS_SHOWN else "")
               + ": true label → network's answer"),
              (shown_correct, "tab:green", f"a sample of {len(shown_correct)} of the {len(correct)} correct "
               + ("one" if len(correct) == 1 else "ones"))]
    panels = [p for p in panels if len(p[0])]
    rows = [-(-len(p[0]) // MOSAIC_COLUMNS) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 0.56 * sum(rows) + 0.5 * len(panels)),
                             gridspec_kw={"height_ratios": rows}, squeeze=False)
    step = SIDE + 12          # room under each digit for its label
    for ax, (indices, colour, title) in zip(axes[:, 0], panels):
        ax.imshow(mosaic(test_images[indices], MOSAIC_COLUMNS, gap=12), cmap=_gray(plt), vmin=-1, vmax=1,
                  interpolation="nearest")
        for k, i in enumerate(indices):
            r, c = divmod(k, MOSAIC_COLUMNS)
            text = f"{labels[i]} → {predicted[i]}" if predicted[i] != labels[i] else str(labels[i])
            ax.text(c * step + SIDE / 2, r * step + SIDE + 1, text, ha="center", va="top", fontsize=7, color=colour)
        ax.set_xlim(-1, MOSAIC_COLUMNS * step)
        ax.set_ylim(max(1, -(-len(indices) // MOSAIC_COLUMNS)) * step, -1)
        ax.set_axis_off()
        ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


# -- training.gif ----------------------------------------------------------------------------------
def read_snapshots(run_path: Path) -> list[tuple[int, np.ndarray]]:
    snapshots = []
    for file in sorted((run_path / "snapshots").glob("epoch_*.npz")):
        with np.load(file) as data:
            snapshots.append((int(data["epoch"]), np.array(data["W"], np.float32)))
    return sorted(snapshots, key=lambda s: s[0])


def render_gif_frames(snapshots, metrics, validation: str) -> list:
    """One PIL frame per snapshot: its receptive fields beside the error curves up to its epoch.
    One figure is drawn once and updated, so a 40-frame GIF takes seconds."""
    from PIL import Image
    plt = _pyplot()
    by_epoch = {r["epoch"]: r for r in metrics}
    epochs = sorted(by_epoch)
    fig = plt.figure(figsize=(8, 4))
    filter_ax = fig.add_axes([0.01, 0.03, 0.46, 0.84])
    curve_ax = fig.add_axes([0.58, 0.13, 0.39, 0.74])
    picture = filter_ax.imshow(mosaic(normalise_units(snapshots[0][1]), 10), cmap=_gray(plt), vmin=-1, vmax=1,
                               interpolation="nearest")
    filter_ax.set_axis_off()
    lines = {}
    for key, label, colour in error_series(validation):
        lines[key], = curve_ax.plot([], [], line_style(len(epochs)), ms=2, label=label.split(" (")[0], color=colour)
    values = [100 * max(by_epoch[e][k], 1e-5) for e in epochs for k in lines]
    curve_ax.set(yscale="log", xlabel="epoch", ylabel="error %", xlim=(0.5, max(epochs[-1], 2) + 0.5),
                 ylim=(min(values) / 1.3, max(values) * 1.3))
    readable_axes(curve_ax, log=True)
    curve_ax.legend(fontsize=8, loc="upper right")
    title = fig.suptitle("")
    frames = []
    for epoch, W in snapshots:
        picture.set_data(mosaic(normalise_units(W), 10))
        shown = [e for e in epochs if e <= epoch]
        for key, line in lines.items():
            line.set_data(shown, [100 * max(by_epoch[e][key], 1e-5) for e in shown])
        record = by_epoch.get(epoch)
        test = f", test error {percent(record['test_error'])}%" if record else ""
        title.set_text(f"epoch {epoch}: first-layer receptive fields{test}")
        fig.canvas.draw()
        frames.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
    plt.close(fig)
    # One palette, from the last frame (it has every curve), keeps colours steady across frames.
    palette = frames[-1].quantize(colors=128, method=Image.Quantize.MAXCOVERAGE)
    return [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]


def encode_gif(frames) -> bytes:
    buffer = io.BytesIO()
    durations = [GIF_FRAME_MS] * (len(frames) - 1) + [GIF_FRAME_MS * 8]   # linger on the last epoch
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
                   loop=0, optimize=True)
    return buffer.getvalue()


def write_gif(snapshots, metrics, validation: str, path: Path) -> int:
    """training.gif under MAX_GIF_BYTES: every other frame is dropped (the last kept) until it fits.
    Returns the number of frames."""
    frames = render_gif_frames(snapshots, metrics, validation)
    data = encode_gif(frames)
    while len(data) > MAX_GIF_BYTES and len(frames) > 2:
        frames = frames[:-1:2] + frames[-1:]
        data = encode_gif(frames)
    path.write_bytes(data)
    return len(frames)


# -- report.md -------------------------------------------------------------------------------------
def summary_table(run: FinishedRun) -> str:
    s = run.summary
    rows = [["this run", f"{percent(s['test_error_at_best_val'])}% (epoch {s['best_val_epoch']})",
             f"{percent(s['best_test_error'])}% (epoch {s['best_test_epoch']})",
             f"{s['epochs_completed']}", f"{duration(s['total_seconds'])} on {s['device']}"]]
    net = paper_net_id(run.sizes)
    if net is not None:
        at_best_val, best_test, hours = nets.PAPER_RESULTS[net]
        rows.append([f"paper, net {net}", f"{at_best_val:.2f}%", f"{best_test:.2f}%", f"{PAPER_EPOCHS}",
                     f"{hours} h on a GTX 280"])
    return markdown_table(["", "test error at best validation", "best test error", "epochs", "training time"], rows)


def setting_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings_table(settings: dict) -> str:
    """Every setting of the run under the flag that sets it (config.json's `settings`)."""
    from gpumlp.config import TrainConfig
    complete = TrainConfig.from_dict(settings).to_dict()
    rows = [["deformation (off with --no-augment)" if name == "augment" else f"`--{name.replace('_', '-')}`",
             setting_value(value)] for name, value in complete.items()]
    return markdown_table(["setting", "value"], rows)


def write_markdown(run: FinishedRun, wrong: np.ndarray, n_test: int, deformation_note: str,
                   gif_frames: int, path: Path) -> None:
    settings, s = run.settings, run.summary
    net = paper_net_id(run.sizes)
    name = f"net {net} of the paper, " if net is not None else ""
    deformation = ("digits deformed anew every epoch" if settings["augment"]
                   else "undeformed, --no-augment")
    text = f"""# Run report: {run.path.name}

{name}{nets.describe(run.sizes)} ({nets.count_weights(run.sizes):,} weights); {s['epochs_completed']} of \
{plural(s['epochs_planned'], 'epoch')}, batch size {settings['batch_size']}, learning rate {settings['lr']:g} \
(x{settings['lr_decay']:g} per epoch, floor {settings['lr_min']:g}), momentum {settings['momentum']:g}, seed \
{settings['seed']}; {plural(run.config.get('train_images'), 'training image')} ({deformation}), \
{plural(n_test, 'test image')}; trained on \
{s['device']}; code {run.config.get('code_version', '?')}. Run directory: `{run.path}`.

{summary_table(run)}
The paper trained for {PAPER_EPOCHS} epochs on all 60,000 digits; a shorter or smaller run is not expected to reach
its numbers. "Test error at best validation" is the test error of the epoch with the lowest validation error.

## Training curves

![training curves](curves.png)

## First-layer receptive fields (best-validation weights, epoch {s['best_val_epoch']})

![receptive fields](filters.png)

## Deformations

The first training example of each digit beside the deformations that epochs 1-{DEFORMED_EPOCHS} draw for it with this
run's seed and settings (the same numbers the training saw), {deformation_note}.

![deformations](deformations.png)

## Test digits: {len(wrong)} of {n_test} misclassified ({100 * len(wrong) / max(n_test, 1):.2f}%) at the best-validation epoch

![errors](errors.png)

## Training, epoch by epoch ({plural(gif_frames, 'snapshot')})

![training](training.gif)

## Settings

{settings_table(settings)}"""
    path.write_text(text)


# -- the command -----------------------------------------------------------------------------------
def load_test_and_train_data(run: FinishedRun, data_dir, test_labels: np.ndarray):
    """The run's training and test images, from the run's data directory (or data_dir), checked
    against the labels predictions.npz was written with."""
    split = load_split(run.settings, data_dir)
    if not np.array_equal(split.test_labels, test_labels):
        raise UserError(f"{run.path}: the test labels in predictions.npz differ from the test set loaded "
                        "now; pass the run's data with --data-dir")
    return split.train_images, split.train_labels, split.test_images


def writable_folder(out: Path, run: FinishedRun) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        advice = "write the report elsewhere with --out DIR" if out == run.path else "choose another --out"
        raise UserError(f"cannot write into {out}: {advice}")
    return out


def write_report(run_path, data_dir=None, out=None, log=print) -> Path:
    """The pictures and report.md of a run, written into `out` (default: the run directory, which
    is only read otherwise)."""
    run = load_run(run_path)
    probs, test_labels = load_predictions(run.path)
    params = RunDir(run.path).load_params("best")
    train_images, train_labels, test_images = load_test_and_train_data(run, data_dir, test_labels)
    out = writable_folder(Path(out) if out else run.path, run)
    plot_curves(run.metrics, run.summary["best_val_epoch"], run.settings["validation"], out / "curves.png")
    plot_filters(params[0][0][:100], run.summary["best_val_epoch"], out / "filters.png")
    deformation_note = draw_deformations(run, train_images, train_labels, out / "deformations.png")
    predicted = probs.argmax(axis=1)
    plot_errors(test_images, test_labels, predicted, out / "errors.png")
    snapshots = read_snapshots(run.path)
    if not snapshots:
        raise RunDirError(f"{run.path}: no snapshots/epoch_*.npz for training.gif")
    gif_frames = write_gif(snapshots, run.metrics, run.settings["validation"], out / "training.gif")
    write_markdown(run, np.flatnonzero(predicted != test_labels), len(test_labels), deformation_note,
                   gif_frames, out / "report.md")
    log(f"wrote curves.png, filters.png, deformations.png, errors.png, training.gif "
        f"({plural(gif_frames, 'frame')}) and report.md in {out}")
    return out / "report.md"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m gpumlp.report",
        description="Draw a finished (or interrupted) run: training curves, first-layer receptive "
                    "fields, deformation samples, misclassified test digits, an animated GIF of the "
                    "training, and report.md tying them to the paper's numbers; all written into "
                    "the run directory, or into --out.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by reproduce_2010.py")
    parser.add_argument("--data-dir", help="MNIST directory, when it is not the one the run recorded")
    parser.add_argument("--out", metavar="DIR", help="write the report here (created if missing) instead "
                        "of into RUN_DIR, which is then only read (default: RUN_DIR)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        write_report(args.run_dir, args.data_dir, args.out)
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
