"""`python -m gpumlp.bench`: gpumlp's training throughput side by side with the same workload written
the way a PyTorch user would write it, timed in one run and written up as a markdown table.

The workload is the paper's recipe without the deformation (its cost is measured separately, by the
profiler): N training images, one net, plain SGD with a fixed learning rate, batch size 1 by default
(the paper's online mode). Every implementation starts from the same initial weights
(gpumlp.nets.init_params) and sees the images in the same order, so their mean losses over the last
pass must agree roughly; the run checks that, as proof that the rows measure the same recipe.

On a GPU: gpumlp's hand-written kernels (DeviceTrainer replaying CUDA graphs, and at batch size 1
also the cooperative kernels of PersistentTrainer and SpreadTrainer: --engine) against a PyTorch `nn.Linear` stack run
eagerly and with the whole step captured in a CUDA graph, all with the data already on the GPU.
On the CPU: gpumlp's numpy path (CpuTrainer) against PyTorch eager on the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpumlp import nets
from gpumlp.commands import OneLineErrorParser, run_command
from gpumlp.errors import UserError
from gpumlp.reference import TANH_A, TANH_B
from gpumlp.train_cpu import CpuTrainer, available_cores
from gpumlp.training import epoch_order

# The loss over a pass is a mean over hundreds of online steps; float32 rounding differences between
# implementations move the trajectories apart slightly, but not by more than this (relative).
LOSS_AGREEMENT = 0.05
EXIT_LOSSES_DISAGREE = 1
# Side-stream steps before capture, as in the PyTorch docs' whole-network capture recipe.
TORCH_GRAPH_WARMUP_STEPS = 3
DEFAULT_IMAGES = {"cpu": 256, "cuda": 20000}
# The performance target: gpumlp net 4, online SGD, on an H100.
TARGET_NET, TARGET_BATCH, TARGET_RATIO = 4, 1, 3.0
EAGER = "PyTorch eager"
# Variables that change the CPU figures (OPENBLAS_CORETYPE picks OpenBLAS's kernels for the CPU).
THREAD_ENVIRONMENT = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
                      "OPENBLAS_L2_SIZE")


class BenchError(UserError):
    """A setting or environment the benchmark cannot run with; reported as one line."""


@dataclass
class Workload:
    sizes: list[int]
    images: np.ndarray          # (N, 841) float32
    labels: np.ndarray          # (N,) int32
    source: str
    lr: float
    seed: int
    repeats: int

    def images_per_pass(self, batch_size: int) -> int:
        """Whole batches only, so that one graph-captured step of fixed shape serves every step."""
        return len(self.labels) - len(self.labels) % batch_size

    def order(self, pass_index: int, batch_size: int) -> np.ndarray:
        """The order of pass `pass_index` (0 is the warm-up) over the first images_per_pass images."""
        return epoch_order(self.seed, pass_index + 1, self.images_per_pass(batch_size))


@dataclass
class Result:
    implementation: str
    device: str
    batch_size: int
    images_per_s: list[float] = field(default_factory=list)
    loss: float = float("nan")

    @property
    def best(self) -> float:
        """The fastest pass: other processes can only slow a pass down, never speed it up."""
        return max(self.images_per_s)


# -- the PyTorch side ------------------------------------------------------------------------------
def torch_model(params, device="cpu"):
    """The paper's net as a PyTorch user writes it: nn.Sequential of nn.Linear and a scaled-tanh
    module, holding copies of `params` ([(W (n_out, n_in), b (n_out,)), ...])."""
    import torch
    from torch import nn

    class ScaledTanh(nn.Module):
        """y = 1.7159 tanh(0.6666 a), with the reference's float32 constants."""

        def forward(self, a):
            return float(TANH_A) * torch.tanh(float(TANH_B) * a)

    layers = []
    for layer, (W, b) in enumerate(params):
        linear = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if layer < len(params) - 1:
            layers.append(ScaledTanh())
    return nn.Sequential(*layers).to(device)


class TorchEager:
    """The ordinary training loop: zero_grad, forward, loss, backward, step, once per batch. The
    loss is summed on the device (no .item() per step) so the loop never waits for the GPU."""

    def __init__(self, workload: Workload, batch_size: int, device: str):
        import torch
        self.torch = torch
        self.device = device
        self.batch_size = batch_size
        self.model = torch_model(nets.init_params(workload.sizes, workload.seed), device)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=workload.lr)
        self.images = torch.from_numpy(workload.images).to(device)
        self.labels = torch.from_numpy(workload.labels).long().to(device)

    def run_pass(self, order: np.ndarray) -> float:
        torch, B = self.torch, self.batch_size
        order = torch.from_numpy(order).long().to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        for start in range(0, len(order), B):
            batch = order[start:start + B]
            self.optimizer.zero_grad()
            loss = self.criterion(self.model(self.images[batch]), self.labels[batch])
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach()
        return loss_sum.item() * B / len(order)

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


class TorchCudaGraph(TorchEager):
    """The whole step (forward, loss, backward, optimizer step) captured once in a CUDA graph with
    static input tensors, following the PyTorch docs' whole-network capture recipe; each step copies
    the next batch into the static inputs and replays the graph."""

    def __init__(self, workload: Workload, batch_size: int, device: str):
        super().__init__(workload, batch_size, device)
        torch = self.torch
        initial_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.static_images = torch.zeros((batch_size, workload.sizes[0]), device=device)
        self.static_labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), device=device)

        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(TORCH_GRAPH_WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self.criterion(self.model(self.static_images), self.static_labels).backward()
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side_stream)

        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            loss = self.criterion(self.model(self.static_images), self.static_labels)
            loss.backward()
            self.optimizer.step()
            self.loss_sum += loss.detach()
        # The warm-up steps trained on the placeholder inputs: start from the shared weights again
        # (load_state_dict copies in place, so the graph keeps pointing at the same tensors).
        self.model.load_state_dict(initial_state)

    def run_pass(self, order: np.ndarray) -> float:
        torch, B = self.torch, self.batch_size
        order = torch.from_numpy(order).long().to(self.device)
        self.loss_sum.zero_()
        for start in range(0, len(order), B):
            batch = order[start:start + B]
            self.static_images.copy_(self.images[batch])
            self.static_labels.copy_(self.labels[batch])
            self.graph.replay()
        return self.loss_sum.item() * B / len(order)


# -- the gpumlp side -------------------------------------------------------------------------------
class GpumlpCpu:
    def __init__(self, workload: Workload, batch_size: int):
        self.workload = workload
        # as many BLAS threads as PyTorch gets (cpu_threads), whatever the trainer would choose
        self.trainer = CpuTrainer(nets.init_params(workload.sizes, workload.seed), workload.images,
                                  workload.labels, batch_size, momentum=0.0, deform_config=None,
                                  seed=workload.seed, threads=cpu_threads())

    def run_pass(self, order: np.ndarray) -> float:
        return self.trainer.train_epoch(1, self.workload.lr, order)[0]

    def synchronize(self) -> None:
        pass


ENGINE_ROWS = {"graph": "gpumlp (hand-written kernels, CUDA graphs)",
               "persistent": "gpumlp (persistent kernel, cooperative launches)",
               "spread": "gpumlp (spread kernel: layers over the whole grid, its own summation order)"}


class GpumlpCuda(GpumlpCpu):
    """DeviceTrainer (engine "graph"): the images uploaded once, steps replayed from captured CUDA
    graphs; or PersistentTrainer ("persistent") or SpreadTrainer ("spread"): a cooperative launch
    per chunk of images. Its
    train_epoch synchronises and reads the loss back, like TorchEager.run_pass. The graphs are
    captured once, here, outside the timing, as TorchCudaGraph captures its own."""

    def __init__(self, workload: Workload, batch_size: int, device, engine: str = "graph"):
        from gpumlp.config import TrainConfig
        from gpumlp.train_spread import trainer_class
        from gpumlp.training import Split
        self.workload = workload
        self.device = device
        config = TrainConfig(net=None, hidden=workload.sizes[1:-1], batch_size=batch_size,
                             lr=workload.lr, momentum=0.0, seed=workload.seed, augment=False,
                             device="cuda")
        # DeviceTrainer trains on every image of its split each epoch.
        n = workload.images_per_pass(batch_size)
        images, labels = workload.images[:n], workload.labels[:n]
        no_images = np.zeros((0, workload.sizes[0]), np.float32)
        split = Split(images, labels, images, labels, no_images, np.zeros(0, np.int32))
        self.trainer = trainer_class(engine)(device, nets.init_params(workload.sizes, workload.seed), split,
                                     config, log=lambda message: print(message, file=sys.stderr))
        if engine == "graph":
            self.trainer.capture_graphs(n)

    def synchronize(self) -> None:
        self.device.synchronize()


def time_interleaved(plan, batch_size: int, workload: Workload) -> list[Result]:
    """One untimed warm-up pass of every implementation, then `repeats` rounds in which each times
    one pass in turn: interleaving spreads any change in the machine's load over all of them
    alike. The loss is the mean over each one's last pass."""
    results = [Result(name, device_label, batch_size) for name, device_label, _ in plan]
    implementations = [make() for _, _, make in plan]
    for implementation in implementations:
        implementation.run_pass(workload.order(0, batch_size))
    for repeat in range(1, workload.repeats + 1):
        order = workload.order(repeat, batch_size)
        for implementation, result in zip(implementations, results):
            implementation.synchronize()
            started = time.perf_counter()
            result.loss = implementation.run_pass(order)
            implementation.synchronize()
            result.images_per_s.append(len(order) / (time.perf_counter() - started))
            print(f"  {result.implementation}, batch {batch_size}, pass {repeat}/{workload.repeats}: "
                  f"{result.images_per_s[-1]:,.0f} images/s, loss {result.loss:.4f}", file=sys.stderr, flush=True)
    return results


# -- the run ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m gpumlp.bench",
        description="Time gpumlp's training against the same workload in PyTorch (nn.Linear stack, "
                    "online SGD; on a GPU also with CUDA graphs) and write a markdown table.")
    p.add_argument("--net", type=int, default=4, choices=sorted(nets.PAPER_NETS),
                   help="one of the paper's nets (default 4)")
    p.add_argument("--hidden", type=int, nargs="+", metavar="N", help="hidden layer sizes (overrides --net)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1], metavar="B",
                   help="one or more batch sizes, each timed on every implementation (default 1)")
    p.add_argument("--images", type=int, metavar="N",
                   help=f"training images per timed pass (default {DEFAULT_IMAGES['cuda']} on a GPU, "
                        f"{DEFAULT_IMAGES['cpu']} on the CPU)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes of each implementation after one warm-up pass; the fastest is "
                        "reported (default 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 0.001)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and image order (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): the GPU if there is one, else the CPU")
    p.add_argument("--engine", nargs="+", choices=tuple(ENGINE_ROWS), default=list(ENGINE_ROWS), metavar="ENGINE",
                   help="on a GPU, gpumlp's online engines to time: graph, persistent, spread (these two batch "
                        "size 1 only; default all three)")
    p.add_argument("--synthetic", action="store_true", help="random images of MNIST's shape instead of MNIST")
    p.add_argument("--data-dir", help="MNIST directory (default ../shared/mnist if present, else "
                                      "$GPUMLP_DATA or ~/.cache/gpumlp, downloaded there when missing)")
    p.add_argument("--require-torch", action="store_true",
                   help="fail instead of reporting gpumlp alone when PyTorch is missing")
    p.add_argument("--out", help="markdown file to write (default results-<gpu or hostname>.md in the "
                                 "current directory)")
    return p


def check_args(args) -> None:
    checks = [
        (not args.hidden or all(h > 0 for h in args.hidden), "--hidden sizes must be positive"),
        (all(b >= 1 for b in args.batch_size), "--batch-size must be at least 1"),
        ("graph" in args.engine or args.batch_size == [1] * len(args.batch_size),
         "--engine persistent and spread train batch size 1 only: add graph to --engine for larger batches"),
        (args.images is None or args.images >= max(args.batch_size),
         "--images must be at least the largest --batch-size"),
        (args.repeats >= 1, "--repeats must be at least 1"),
        (args.lr > 0, "--lr must be positive"),
        (0 <= args.seed < 2 ** 32, "--seed must be in [0, 2^32)"),
    ]
    for ok, message in checks:
        if not ok:
            raise BenchError(f"{message} (see --help)")


def synthetic_images(n: int, seed: int):
    """A learnable stand-in of MNIST's shape: a fixed random 29x29 pattern per class plus noise."""
    rng = np.random.default_rng([seed, 0xB37C])
    prototypes = rng.uniform(-1, 1, size=(nets.N_CLASSES, nets.N_INPUTS)).astype(np.float32)
    labels = rng.integers(0, nets.N_CLASSES, size=n).astype(np.int32)
    noise = rng.normal(scale=0.6, size=(n, nets.N_INPUTS)).astype(np.float32)
    return np.clip(prototypes[labels] + noise, -1, 1).astype(np.float32), labels


def load_workload(args, n_images: int) -> Workload:
    sizes = nets.layer_sizes(args.hidden or nets.PAPER_NETS[args.net])
    if args.synthetic:
        images, labels = synthetic_images(n_images, args.seed)
        source = f"{n_images} synthetic images of MNIST's shape"
    else:
        from gpumlp.data import SHARED_MNIST_DIR, load_mnist
        data_dir = args.data_dir or (SHARED_MNIST_DIR if SHARED_MNIST_DIR.is_dir() else None)
        mnist = load_mnist(data_dir)
        if n_images > len(mnist.train_labels):
            raise BenchError(f"--images {n_images} exceeds the {len(mnist.train_labels)} MNIST "
                             f"training images (use --synthetic for more)")
        images, labels = mnist.train_images[:n_images], mnist.train_labels[:n_images]
        source = f"the first {n_images} MNIST training images"
    return Workload(sizes, np.ascontiguousarray(images), np.ascontiguousarray(labels), source,
                    args.lr, args.seed, args.repeats)


def import_torch(require: bool, need_cuda: bool):
    """torch, or None with the reason it cannot take part."""
    try:
        import torch
    except ImportError:
        reason = "PyTorch is not installed (pip install 'gpumlp[bench]')"
    else:
        if not need_cuda or torch.cuda.is_available():
            return torch, None
        reason = f"this PyTorch ({torch.__version__}) cannot use the GPU"
    if require:
        raise BenchError(f"--require-torch: {reason}")
    return None, reason


def cpu_threads() -> int:
    """Threads for PyTorch on the CPU: OMP_NUM_THREADS where set, as numpy's OpenBLAS also obeys
    it (so one variable limits both sides alike), else every core available."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return available_cores()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """Other processes' load skews CPU figures most of all, so the report records it."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


def numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # older numpy has no mode="dicts"; the BLAS name is a nicety
        return "unknown BLAS"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_lines(gpu_name: str | None, torch, torch_missing: str | None, load_at_start: str) -> list[str]:
    cores = available_cores()
    software = [f"Python {platform.python_version()}", f"numpy {np.__version__} ({numpy_blas()})",
                f"torch {torch.__version__}" if torch else f"torch: {torch_missing}"]
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {socket.gethostname()}; CPU: {cpu_model()}, {cores} cores available "
             f"(of {os.cpu_count()}), load average {load_at_start} at the start; GPU: {gpu_name or 'none'}",
             f"- software: {', '.join(software)}"]
    settings = [f"{name}={os.environ[name]}" for name in THREAD_ENVIRONMENT if os.environ.get(name)]
    if settings:
        lines.append(f"- environment: {', '.join(settings)}")
    return lines


def markdown_report(argv, workload: Workload, results: list[Result], header: list[str], notes: list[str]) -> str:
    eager = {r.batch_size: r.best for r in results if r.implementation == EAGER}
    rows = [f"| implementation | device | net | batch | images/s (best of {workload.repeats}) | slowest "
            f"| vs PyTorch eager | loss (last pass) |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r.best / eager[r.batch_size]:.2f}x" if r.batch_size in eager else "n/a"
        rows.append(f"| {r.implementation} | {r.device} | {nets.describe(workload.sizes)} | {r.batch_size} "
                    f"| {r.best:,.0f} | {min(r.images_per_s):,.0f} | {ratio} "
                    f"| {r.loss:.4f} |")
    workload_line = (f"- workload: {workload.source}, undeformed (the deformation's cost is measured "
                     f"separately, by the profiler); plain SGD, learning rate {workload.lr:g}, seed "
                     f"{workload.seed}; every implementation starts from the same weights and sees the "
                     f"same order, in whole batches (a pass leaves out the last images mod the batch "
                     f"size); 1 warm-up pass each, then {workload.repeats} rounds of one timed pass "
                     f"each, interleaved")
    command = "python -m gpumlp.bench " + " ".join(argv)
    return "\n".join(["# gpumlp vs PyTorch: training throughput", "", f"`{command.strip()}`", "",
                      *header, workload_line, "", *rows, "", *notes]) + "\n"


def loss_notes(results: list[Result]) -> tuple[list[str], bool]:
    """One line per batch size comparing every PyTorch row's loss with gpumlp's; False if any is off."""
    notes, agree = [], True
    for B in sorted({r.batch_size for r in results}):
        same_batch = [r for r in results if r.batch_size == B]
        ours, others = same_batch[0], same_batch[1:]
        for other in others:
            gap = abs(ours.loss - other.loss) / max(abs(ours.loss), abs(other.loss), 1e-12)
            ok = gap <= LOSS_AGREEMENT
            agree &= ok
            notes.append(f"- batch {B}: last-pass loss of {ours.implementation} {ours.loss:.4f} vs "
                         f"{other.implementation} {other.loss:.4f}: {100 * gap:.1f}% apart "
                         + ("(agree: the same recipe)" if ok else
                            f"(WARNING: more than {100 * LOSS_AGREEMENT:.0f}% apart: not the same recipe?)"))
    return notes, agree


def target_note(args, device_kind: str, gpu_name: str | None, results: list[Result]) -> list[str]:
    if device_kind != "cuda" or args.hidden or args.net != TARGET_NET:
        return []
    at_target = [r for r in results if r.batch_size == TARGET_BATCH]
    eager = next((r for r in at_target if r.implementation == EAGER), None)
    if eager is None:
        return []
    ratio = at_target[0].best / eager.best
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    return [f"- target (on an H100): gpumlp net {TARGET_NET} online >= {TARGET_RATIO:g}x PyTorch eager: "
            f"{ratio:.2f}x on {gpu_name}: {verdict}"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args, argv))


def run(args, argv) -> int:
    from gpumlp.device import gpu_available

    check_args(args)
    load_at_start = load_average()
    device_kind = args.device if args.device != "auto" else ("cuda" if gpu_available() else "cpu")
    device, gpu_name = None, None
    if device_kind == "cuda":
        if not gpu_available():
            raise BenchError("--device cuda: no CUDA GPU was found (is CuPy installed with a working driver?)")
        from gpumlp.device import CudaDevice
        device = CudaDevice()
        gpu_name = device.name
    torch, torch_missing = import_torch(args.require_torch, need_cuda=device_kind == "cuda")
    if torch is not None and device_kind == "cpu":
        torch.set_num_threads(cpu_threads())

    workload = load_workload(args, args.images or DEFAULT_IMAGES[device_kind])

    threads = cpu_threads()
    cpu_label = f"CPU ({threads} thread{'s' if threads > 1 else ''})"
    results = []
    for B in args.batch_size:
        if device_kind == "cuda":
            plan = [(ENGINE_ROWS[engine], gpu_name, functools.partial(GpumlpCuda, workload, B, device, engine))
                    for engine in dict.fromkeys(args.engine) if engine == "graph" or B == 1]
            if torch:
                plan += [(EAGER, gpu_name, functools.partial(TorchEager, workload, B, "cuda")),
                         ("PyTorch + CUDA graph (whole step)", gpu_name,
                          functools.partial(TorchCudaGraph, workload, B, "cuda"))]
        else:
            plan = [("gpumlp (numpy reference)", cpu_label, functools.partial(GpumlpCpu, workload, B))]
            if torch:
                plan.append((EAGER, cpu_label, functools.partial(TorchEager, workload, B, "cpu")))
        results += time_interleaved(plan, B, workload)

    notes, losses_agree = loss_notes(results)
    if torch is None:
        notes.append(f"- PyTorch rows left out: {torch_missing}")
    notes += target_note(args, device_kind, gpu_name, results)
    header = machine_lines(gpu_name, torch, torch_missing, load_at_start)
    report = markdown_report(argv, workload, results, header, notes)
    out = Path(args.out) if args.out else Path(f"results-{slug(gpu_name or socket.gethostname())}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report, end="")
    print(f"written to {out.resolve()}", file=sys.stderr)
    return 0 if losses_agree else EXIT_LOSSES_DISAGREE


if __name__ == "__main__":
    sys.exit(main())
