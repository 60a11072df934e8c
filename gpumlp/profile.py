"""`python -m gpumlp.profile`: what each kernel of a training step costs, and how far the whole step
is from the memory-bandwidth bound of online SGD.

The kernels and their launch shapes are not listed here: the profiler runs the trainer's own epoch
(`DeviceTrainer.train_epoch`, hence `launch_step`) against a device that records every launch
(kernel, grid, block, arguments) instead of running it. Launches made while the trainer captures a
graph are the per-step kernels; the others (the deformation) run once per epoch. Each recorded
launch is then costed from its arguments by an explicit model (bytes that must cross DRAM at least
once, floating-point operations as written in the kernel), matched with its registers and shared
memory from the NVRTC compile gate, and given a theoretical occupancy.

On a GPU every launch is also timed alone (CUDA events, median of --repeats after --warmup, the
L2 cache flushed before each repeat), and --graph-steps whole steps are captured with the trainer's
own capture and replayed as a CUDA graph, which gives the real time per image (launch overheads
included, L2 warm as in training). Without a GPU the static and analytical part is printed alone.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

from gpumlp import compile_gate, nets
from gpumlp.device import KERNEL_DIR, CudaDevice, Device, Graph, check_kernel_args, gpu_available
from gpumlp.gpu_limits import (A100, ARCH_LIMITS, GTX_280, H100, ArchLimits, Peak, arch_limits, arch_number,
                               fp32_lanes_per_sm, known_peak, theoretical_occupancy)
from gpumlp.kernel_costs import BYTES_PER_WEIGHT_ONLINE, bound_seconds, launch_cost, online_bytes_per_image
from gpumlp.results import PAPER_EPOCHS, paper_net_id, plural

MNIST_TRAIN_IMAGES = 60_000
DEFAULT_ARCH = "sm_90"


# -- recording the launches ------------------------------------------------------------------------
class KernelHandle:
    """What the recording device's `kernel()` returns: the kernel's file and name, and the real
    compiled function on a GPU (None on the host, where nothing runs)."""

    def __init__(self, source: str, name: str, function):
        self.source, self.name, self.function = source, name, function

    def __call__(self, grid, block, args, **options):   # shared_mem=, and stream= on some devices
        self.function(grid, block, args, **options)


@dataclass
class Launch:
    source: str
    kernel: str
    grid: tuple
    block: tuple
    args: tuple
    shared_mem: int
    phase: str          # "step": inside the trainer's graph capture; "epoch": once per epoch
    handle: KernelHandle = field(repr=False)

    @property
    def blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def threads_per_block(self) -> int:
        return math.prod(self.block)


class LaunchRecorder:
    """Device mixin: inside `recording()`, launches are appended to a list instead of run, and a
    graph capture only marks the launches made inside it as per-step. Outside, the device works
    as usual (so the same trainer can be recorded and then timed)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.launches: list[Launch] | None = None
        self.captures = 0
        self._phase = "epoch"

    def kernel(self, filename: str, kernel_name: str):
        return KernelHandle(filename, kernel_name, super().kernel(filename, kernel_name))

    def launch(self, kernel, grid, block, args, shared_mem: int = 0) -> None:
        if self.launches is None:
            super().launch(kernel, grid, block, args, shared_mem)
            return
        check_kernel_args(kernel.name, args)
        self.launches.append(Launch(kernel.source, kernel.name, tuple(int(g) for g in grid),
                                    tuple(int(b) for b in block), tuple(args), int(shared_mem),
                                    self._phase, kernel))

    @contextmanager
    def recording(self):
        self.launches, self.captures = [], 0
        try:
            yield self.launches
        finally:
            self.launches = None

    @contextmanager
    def capture(self):
        if self.launches is None:
            with super().capture() as graph:
                yield graph
            return
        self._phase, self.captures = "step", self.captures + 1
        try:
            yield Graph(self, launches=[])   # replays nothing: the launches were recorded once
        finally:
            self._phase = "epoch"


class _NoModule:
    def get_function(self, name):
        return None


class HostRecorder(LaunchRecorder, Device):
    """Records on the host: arrays are numpy arrays, kernels are never compiled or run. Marked as
    emulated so the trainer does not ask CUDA for free memory."""

    name = "recorder"
    is_emulated = True

    def _load_module(self, filename):
        return _NoModule()


class CudaRecorder(LaunchRecorder, CudaDevice):
    """A real GPU whose launches can be recorded, then replayed one at a time under CUDA events."""


# -- the workload ----------------------------------------------------------------------------------
@dataclass
class Workload:
    sizes: list[int]
    batch_size: int
    momentum: float
    images: int          # images of the profiled epoch (the deformation's batch)


def record_epoch(device, workload: Workload, lr: float = 1e-3):
    """Run one epoch of the trainer against a LaunchRecorder; returns (trainer, launches). Every
    step of an epoch launches the same kernels with the same arguments (the position lives in a
    device counter), so one captured step stands for all of them."""
    from gpumlp.config import TrainConfig
    from gpumlp.train_gpu import DeviceTrainer
    from gpumlp.training import Split
    config = TrainConfig(hidden=workload.sizes[1:-1], net=None, batch_size=workload.batch_size,
                         momentum=workload.momentum, graph_steps=1)
    n = workload.images
    if device.is_emulated:
        images = np.zeros((n, nets.N_INPUTS), np.float32)
        params = [(np.zeros((o, i), np.float32), np.zeros(o, np.float32))
                  for i, o in zip(workload.sizes[:-1], workload.sizes[1:])]
    else:
        rng = np.random.default_rng(0)
        images = rng.random((n, nets.N_INPUTS), dtype=np.float32) * 2 - 1   # digits' [-1, 1] range
        params = nets.init_params(workload.sizes, seed=0)
    labels = (np.arange(n) % nets.N_CLASSES).astype(np.int32)
    split = Split(images, labels, images, labels, images[:1], labels[:1])
    trainer = DeviceTrainer(device, params, split, config, log=lambda line: print(line, file=sys.stderr))
    with device.recording() as launches:
        trainer.train_epoch(1, lr, np.arange(n, dtype=np.int32))
    trainer.graphs.clear()   # what the recorder "captured" replays nothing: never reuse it
    if device.captures != 1:
        raise RuntimeError(f"the trainer captured {device.captures} graphs for an epoch of {n} images "
                           f"at batch size {workload.batch_size}; the profiler expects exactly one step")
    return trainer, launches


# -- rows of the report ----------------------------------------------------------------------------
@dataclass
class Row:
    index: int
    phase: str
    source: str
    kernel: str
    shape: str
    grid: list
    block: list
    blocks: int
    threads_per_block: int
    dynamic_shared: int
    bytes: int | None
    flops: int | None
    registers: int | None = None
    static_shared: int | None = None
    stack_bytes: int | None = None
    spill_bytes: int | None = None
    occupancy: float | None = None
    occupancy_limiter: str | None = None
    blocks_per_sm: int | None = None
    waves: float | None = None      # grid blocks / (resident blocks per SM x SMs); below 1: SMs idle
    time_us: float | None = None
    gb_per_s: float | None = None
    bandwidth_share: float | None = None
    gflop_per_s: float | None = None
    fp32_share: float | None = None
    step_share: float | None = None


def build_rows(launches, arch: str, limits: ArchLimits | None = None, sms: int | None = None) -> list[Row]:
    """Cost, resources and occupancy of every launch; resources from NVRTC for `arch`, and the
    waves of blocks where the number of SMs is known."""
    limits = limits or arch_limits(arch)
    sources = sorted({KERNEL_DIR / launch.source for launch in launches})
    resources = compile_gate.resources_by_kernel(compile_gate.compile_all([arch], sources))
    rows = []
    for index, launch in enumerate(launches):
        cost = launch_cost(launch.source, launch.kernel, launch.args)
        row = Row(index=index, phase=launch.phase, source=launch.source, kernel=launch.kernel,
                  shape=cost.shape if cost else "?", grid=list(launch.grid), block=list(launch.block),
                  blocks=launch.blocks, threads_per_block=launch.threads_per_block,
                  dynamic_shared=launch.shared_mem,
                  bytes=cost.bytes if cost else None, flops=cost.flops if cost else None)
        used = resources.get((launch.kernel, arch))
        if used is not None:
            row.registers, row.static_shared = used.registers, used.shared_bytes
            row.stack_bytes, row.spill_bytes = used.stack_bytes, used.spill_store_bytes + used.spill_load_bytes
            occupancy = theoretical_occupancy(limits, launch.threads_per_block, used.registers,
                                              used.shared_bytes + launch.shared_mem)
            row.occupancy, row.occupancy_limiter = occupancy.fraction, occupancy.limiter
            row.blocks_per_sm = occupancy.blocks_per_sm
            if sms and occupancy.blocks_per_sm:
                row.waves = launch.blocks / (occupancy.blocks_per_sm * sms)
        rows.append(row)
    return rows


def totals(rows: list[Row]) -> dict:
    """Per phase: launches, and the sums of bytes, FLOPs and (when timed) microseconds."""
    result = {}
    for phase in ("step", "epoch"):
        chosen = [r for r in rows if r.phase == phase]
        entry = {"launches": len(chosen),
                 "bytes": sum(r.bytes or 0 for r in chosen),
                 "flops": sum(r.flops or 0 for r in chosen)}
        if chosen and all(r.time_us is not None for r in chosen):
            entry["time_us"] = sum(r.time_us for r in chosen)
        result[phase] = entry
    return result


# -- timing on a GPU -------------------------------------------------------------------------------
@dataclass
class GpuInfo:
    name: str
    arch: str
    sms: int
    l2_bytes: int
    peak: Peak
    peak_source: str
    limits: ArchLimits


def gpu_info(device: CudaDevice) -> GpuInfo:
    """Name, architecture, peaks and per-SM limits of the GPU, from its attributes. The peaks come
    from the memory clock and bus width (and SMs x FP32 lanes x clock) where the driver reports
    them, else from the table of known parts."""
    from cupy.cuda import runtime
    device_id = device.cupy.cuda.Device().id

    def attribute(name: str) -> int:
        try:
            return runtime.deviceGetAttribute(getattr(runtime, name), device_id)
        except (AttributeError, runtime.CUDARuntimeError):   # not in this CUDA version
            return 0

    major, minor = device.properties["major"], device.properties["minor"]
    sms = attribute("cudaDevAttrMultiProcessorCount")
    memory_khz, bus_bits = attribute("cudaDevAttrMemoryClockRate"), attribute("cudaDevAttrGlobalMemoryBusWidth")
    clock_khz = attribute("cudaDevAttrClockRate")
    table = known_peak(device.name)
    if memory_khz and bus_bits and clock_khz:
        # double data rate: two transfers per memory clock over the whole bus; an FMA is two FLOPs
        peak = Peak(device.name, 2 * memory_khz * 1e3 * bus_bits / 8,
                    2 * fp32_lanes_per_sm(major, minor) * sms * clock_khz * 1e3)
        source = "device attributes"
    elif table is not None:
        peak, source = table, f"the table of known peaks ({table.name})"
    else:
        raise RuntimeError(f"{device.name} reports no memory clock and is not in the table of known peaks "
                           f"(gpumlp/gpu_limits.py KNOWN_PEAKS)")
    fallback = arch_limits(f"sm_{major}{minor}")
    limits = ArchLimits(
        max_threads_per_sm=attribute("cudaDevAttrMaxThreadsPerMultiProcessor") or fallback.max_threads_per_sm,
        max_blocks_per_sm=attribute("cudaDevAttrMaxBlocksPerMultiprocessor") or fallback.max_blocks_per_sm,
        shared_per_sm=attribute("cudaDevAttrMaxSharedMemoryPerMultiprocessor") or fallback.shared_per_sm,
        shared_reserved_per_block=attribute("cudaDevAttrReservedSharedMemoryPerBlock"),
        shared_granularity=fallback.shared_granularity,
        registers_per_sm=attribute("cudaDevAttrMaxRegistersPerMultiprocessor") or fallback.registers_per_sm)
    return GpuInfo(device.name, f"sm_{major}{minor}", sms, attribute("cudaDevAttrL2CacheSize"), peak, source, limits)


class Timer:
    """CUDA-event timing on the device's stream, with the L2 flushed before every repeat by
    writing a buffer twice its size, so each launch starts from DRAM as it would after the other
    layers of a step have passed through the cache."""

    def __init__(self, device: CudaDevice, info: GpuInfo, warmup: int, repeats: int):
        cupy = device.cupy
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.flush_buffer = cupy.empty(max(2 * info.l2_bytes, 1 << 20) // 4, dtype=cupy.float32)
        self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()

    def median_us(self, run, before=None, flush=True) -> float:
        """Median microseconds of `run()`; `before()` (untimed) runs ahead of each call. Everything
        goes to the device's stream, where the events are recorded."""
        stream = self.device.stream
        with stream:
            for _ in range(self.warmup):
                if before:
                    before()
                run()
            times = []
            for _ in range(self.repeats):
                if before:
                    before()
                if flush:
                    self.flush_buffer.fill(0)
                self.start.record(stream)
                run()
                self.end.record(stream)
                self.end.synchronize()
                times.append(self.device.cupy.cuda.get_elapsed_time(self.start, self.end) * 1e3)
        return statistics.median(times)


def time_launches(device, trainer, launches, rows: list[Row], info: GpuInfo, timer: Timer) -> None:
    """Fill the timing columns, launching each recorded launch again through the device. The epoch cursor goes back to 0 before every repeat: softmax_xent
    advances it, and the first layer's gathers (layer_forward_mv_gather, layer_forward_gemm_gather) load nothing past the end of the epoch."""
    reset = lambda: trainer.cursor.fill(0)  # noqa: E731
    for launch, row in zip(launches, rows):
        run = lambda launch=launch: device.launch(launch.handle, launch.grid, launch.block,  # noqa: E731
                                                  launch.args, launch.shared_mem)
        row.time_us = timer.median_us(run, before=reset)
        seconds = row.time_us * 1e-6
        if row.bytes is not None:
            row.gb_per_s = row.bytes / seconds / 1e9
            row.bandwidth_share = row.bytes / seconds / info.peak.bandwidth
            row.gflop_per_s = row.flops / seconds / 1e9
            row.fp32_share = row.flops / seconds / info.peak.fp32
    step_us = sum(r.time_us for r in rows if r.phase == "step")
    for row in rows:
        if row.phase == "step":
            row.step_share = row.time_us / step_us


def time_graph(trainer, workload: Workload, steps: int, timer: Timer) -> dict:
    """`steps` whole steps captured by the trainer itself (capture_steps -> launch_step) and
    replayed as one CUDA graph: the time per image as training sees it, L2 warm (with the lr
    record_epoch left in the trainer's device memory)."""
    graph = trainer.capture_steps(steps, workload.batch_size)
    replay_us = timer.median_us(graph.replay, before=lambda: trainer.cursor.fill(0), flush=False)
    images = steps * workload.batch_size
    return {"steps": steps, "images": images, "replay_us": replay_us, "per_image_us": replay_us / images}


# -- the report ------------------------------------------------------------------------------------
def profile(workload: Workload, arch: str | None, timed: bool, warmup: int, repeats: int,
            graph_steps: int) -> dict:
    if timed:
        device = CudaRecorder()
        info = gpu_info(device)
        arch = info.arch
        trainer, launches = record_epoch(device, workload)
        rows = build_rows(launches, _gate_arch(arch), info.limits, info.sms)
        timer = Timer(device, info, warmup, repeats)
        time_launches(device, trainer, launches, rows, info, timer)
        graph = time_graph(trainer, workload, graph_steps, timer)
    else:
        info = graph = None
        _, launches = record_epoch(HostRecorder(), workload)
        rows = build_rows(launches, arch)
    return make_report(workload, arch, rows, info, graph)


def make_report(workload: Workload, arch: str, rows: list[Row], info: GpuInfo | None, graph: dict | None) -> dict:
    """The report as a dict (what --json writes); `info` and `graph` are None when nothing was timed."""
    report = {
        "sizes": workload.sizes, "weights": nets.count_weights(workload.sizes),
        "batch_size": workload.batch_size, "momentum": workload.momentum,
        "epoch_images": workload.images, "arch": arch,
        "device": None if info is None else {"name": info.name, "sms": info.sms, "l2_bytes": info.l2_bytes,
                                             "peak_bandwidth": info.peak.bandwidth, "peak_fp32": info.peak.fp32,
                                             "peak_source": info.peak_source},
        "missing_cost_models": sorted({r.kernel for r in rows if r.bytes is None}),
        "rows": [asdict(r) for r in rows],
        "totals": totals(rows),
        "online_bytes_per_image": online_bytes_per_image(workload.sizes),
        "graph": graph,
    }
    report["summary"] = summarise(report, info)
    return report


def _gate_arch(arch: str) -> str:
    """The architecture to compile for: the device's, or the newest older one NVRTC knows."""
    supported = compile_gate.nvrtc_module().getSupportedArchs()
    older = [a for a in supported if a <= arch_number(arch)]
    return f"sm_{max(older)}" if older else arch


def summarise(report: dict, info: GpuInfo | None) -> dict:
    """Per-image and per-run figures: measured where timed, and the bandwidth bounds."""
    t, B, n = report["totals"], report["batch_size"], report["epoch_images"]
    summary = {"step_bytes_per_image": t["step"]["bytes"] / B,
               "epoch_bytes_per_image": t["epoch"]["bytes"] / n}
    peaks = [info.peak] if info else [H100, A100]
    summary["bounds"] = {}
    for peak in peaks:
        per_image = bound_seconds(report["sizes"], peak.bandwidth)
        summary["bounds"][peak.name] = {
            "bandwidth": peak.bandwidth, "per_image_us": per_image * 1e6,
            "epoch_s": per_image * MNIST_TRAIN_IMAGES, "run_hours": per_image * MNIST_TRAIN_IMAGES * PAPER_EPOCHS / 3600}
    if "time_us" in t["step"]:
        kernels_per_image = t["step"]["time_us"] / B
        deform_per_image = t["epoch"].get("time_us", 0.0) / n
        graph_per_image = report["graph"]["per_image_us"]
        epoch_s = (graph_per_image + deform_per_image) * 1e-6 * MNIST_TRAIN_IMAGES
        summary.update({
            "kernels_per_image_us": kernels_per_image,
            "graph_per_image_us": graph_per_image,
            "graph_minus_kernels_per_image_us": graph_per_image - kernels_per_image,
            "epoch_kernels_per_image_us": deform_per_image,
            "epoch_s": epoch_s,
            "run_hours": epoch_s * PAPER_EPOCHS / 3600,
            "fraction_of_bound": (summary["bounds"][info.peak.name]["per_image_us"]
                                  / (graph_per_image + deform_per_image)),
        })
    return summary


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def render(report: dict) -> str:
    timed = report["device"] is not None
    sizes = report["sizes"]
    head = (f"net {nets.describe(sizes)} ({report['weights'] / 1e6:.2f}M weights), batch size "
            f"{report['batch_size']}, momentum {report['momentum']}, {report['arch']}")
    lines = [head]
    if timed:
        d = report["device"]
        lines.append(f"device: {d['name']}, {d['sms']} SMs, L2 {d['l2_bytes'] / 2**20:.0f} MiB, peak "
                     f"{d['peak_bandwidth'] / 1e12:.3f} TB/s and {d['peak_fp32'] / 1e12:.1f} FP32 TFLOP/s "
                     f"from {d['peak_source']}")
        lines.append("times: median over repeats, L2 flushed before each; shares are of the device peaks")
    else:
        lines.append(f"no GPU: resources from NVRTC for {report['arch']}, bytes and FLOPs from the cost "
                     f"model; times need a GPU (run this on one)")
    columns = ["#", "phase", "kernel", "shape", "grid", "block", "regs", "smem", "spill", "occ", "limit",
               "MB", "MFLOP", "FLOP/B"]
    if timed:
        columns += ["waves", "us", "GB/s", "%BW", "GFLOP/s", "%FP32", "%step"]
    table = [columns]
    for r in report["rows"]:
        cells = [str(r["index"]), r["phase"], r["kernel"], r["shape"], "x".join(map(str, r["grid"])),
                 "x".join(map(str, r["block"])), _fmt(r["registers"], "d"),
                 _fmt(None if r["static_shared"] is None else r["static_shared"] + r["dynamic_shared"], "d"),
                 _fmt(r["spill_bytes"], "d"), _fmt(r["occupancy"], ".0%"), r["occupancy_limiter"] or "-",
                 _fmt(None if r["bytes"] is None else r["bytes"] / 1e6, ".3f", "?"),
                 _fmt(None if r["flops"] is None else r["flops"] / 1e6, ".3f", "?"),
                 _fmt(r["flops"] / r["bytes"] if r["bytes"] else None, ".2f")]
        if timed:
            cells += [_fmt(r["waves"], ".2f"), _fmt(r["time_us"], ".1f"), _fmt(r["gb_per_s"], ".0f"), _fmt(r["bandwidth_share"], ".0%"),
                      _fmt(r["gflop_per_s"], ".0f"), _fmt(r["fp32_share"], ".1%"), _fmt(r["step_share"], ".1%")]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    left = {"phase", "kernel", "shape", "limit"}
    for row in table:
        lines.append("  ".join(cell.ljust(w) if columns[i] in left else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    t, s, B = report["totals"], report["summary"], report["batch_size"]
    lines.append("")
    lines.append(f"step ({plural(t['step']['launches'], 'launch', 'launches')}, {plural(B, 'image')}; "
                 f"{t['step']['launches'] / B:.4g} launches per image): "
                 f"{t['step']['bytes'] / 1e6:.3f} MB, {t['step']['flops'] / 1e6:.3f} MFLOP"
                 + (f", {t['step']['time_us']:.1f} us in kernels" if "time_us" in t["step"] else ""))
    lines.append(f"epoch kernels ({plural(t['epoch']['launches'], 'launch', 'launches')} for "
                 f"{plural(report['epoch_images'], 'image')}): "
                 f"{t['epoch']['bytes'] / 1e6:.3f} MB, {t['epoch']['flops'] / 1e6:.3f} MFLOP"
                 + (f", {t['epoch']['time_us'] / 1e3:.2f} ms" if "time_us" in t["epoch"] else ""))
    lines.append(f"per image: {s['step_bytes_per_image'] / 1e6:.3f} MB in the step's kernels, "
                 f"{s['epoch_bytes_per_image'] / 1e3:.2f} kB in the deformation; online SGD (batch size 1) "
                 f"must move {report['online_bytes_per_image'] / 1e6:.3f} MB (3 x 4 bytes per weight)")
    for name, bound in s["bounds"].items():
        lines.append(f"online-SGD bound on {name} ({bound['bandwidth'] / 1e12:.3g} TB/s): {bound['per_image_us']:.1f} us "
                     f"per image, {_duration(bound['epoch_s'])} per epoch of {MNIST_TRAIN_IMAGES:,} images, "
                     f"{_duration(bound['run_hours'] * 3600)} for {PAPER_EPOCHS} epochs")
    if "graph_per_image_us" in s:
        g = report["graph"]
        lines.append(f"measured: {s['kernels_per_image_us']:.1f} us per image in kernels (sum of medians), "
                     f"{s['graph_per_image_us']:.1f} us per image replaying {g['steps']} captured steps as "
                     f"a CUDA graph, +{s['epoch_kernels_per_image_us']:.2f} us for the deformation; graph minus "
                     f"kernels {s['graph_minus_kernels_per_image_us']:+.1f} us per image (launch gaps, less "
                     f"the L2 reuse that the flushed per-kernel times do not get)")
        lines.append(f"implied: {_duration(s['epoch_s'])} per epoch, {_duration(s['run_hours'] * 3600)} for "
                     f"{PAPER_EPOCHS} epochs: {s['fraction_of_bound']:.0%} of the speed of the online-SGD bound")
    paper = nets.PAPER_RESULTS.get(paper_net_id(sizes))
    if paper:
        lines.append(f"paper (GTX 280): {paper[2]} h for {PAPER_EPOCHS} epochs")
    if report["missing_cost_models"]:
        lines.append("no cost model yet for: " + ", ".join(report["missing_cost_models"])
                     + " (add one to gpumlp/profile.py)")
    return "\n".join(lines)


def paper_table() -> str:
    """The five nets: the least time online SGD can take on today's GPUs beside the paper's."""
    header = ["net", "architecture", "weights [M]", "MB per image",
              "H100 per image", "H100 per epoch", f"H100 {PAPER_EPOCHS} epochs",
              "A100 per image", "A100 per epoch", f"A100 {PAPER_EPOCHS} epochs",
              f"GTX 280 bound {PAPER_EPOCHS} epochs", f"paper (GTX 280, {PAPER_EPOCHS} epochs)"]
    rows = []
    for net, hidden in nets.PAPER_NETS.items():
        sizes = nets.layer_sizes(hidden)
        cells = [str(net), nets.describe(sizes), f"{nets.count_weights(sizes) / 1e6:.2f}",
                 f"{online_bytes_per_image(sizes) / 1e6:.1f}"]
        for peak in (H100, A100):
            per_image = bound_seconds(sizes, peak.bandwidth)
            cells += [_duration(per_image), _duration(per_image * MNIST_TRAIN_IMAGES),
                      _duration(per_image * MNIST_TRAIN_IMAGES * PAPER_EPOCHS)]
        cells.append(_duration(bound_seconds(sizes, GTX_280.bandwidth) * MNIST_TRAIN_IMAGES * PAPER_EPOCHS))
        cells.append(f"{nets.PAPER_RESULTS[net][2]} h")
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines.append("")
    lines.append(f"Bound: {BYTES_PER_WEIGHT_ONLINE} bytes per weight and bias per image (read for the forward "
                 f"pass, read and written by backward+update) at the peak DRAM bandwidth: H100 SXM "
                 f"{H100.bandwidth / 1e12:.2f} TB/s, A100 {A100.bandwidth / 1e12:.1f} TB/s, GTX 280 "
                 f"{GTX_280.bandwidth / 1e12:.4f} TB/s; {MNIST_TRAIN_IMAGES:,} images per epoch. The deformation "
                 f"and the small kernels come on top.")
    return "\n".join(lines)


def engine_model_report(engine: str, sizes, arch: str, momentum: bool) -> str:
    """The model of a one-kernel engine; the spread engine's ends with the persistent one's time."""
    from gpumlp import persistent_model, spread_model
    if engine == "persistent":
        return persistent_model.render(persistent_model.model(sizes, arch, momentum))
    spread = spread_model.model(sizes, arch, momentum)
    try:
        persistent = persistent_model.model(sizes, arch, momentum)
        beside = (f"{persistent['per_image_seconds'] * 1e6:.1f} us per image, bound by {persistent['bound']} "
                  f"(spread: {spread['per_image_seconds'] * 1e6:.1f} us; persistent / spread = "
                  f"{persistent['per_image_seconds'] / spread['per_image_seconds']:.2f})")
    except ValueError as error:
        beside = str(error)
    return spread_model.render(spread) + f"\nthe persistent engine's model, same net: {beside}"


# -- command line ----------------------------------------------------------------------------------
EXAMPLES = """examples:
  python -m gpumlp.profile --net 4 --arch sm_90        static and analytical table (no GPU needed)
  python -m gpumlp.profile --net 4                     on a GPU: every kernel timed, the step as a graph
  python -m gpumlp.profile --hidden 32 --batch-size 8 --json profile.json
  python -m gpumlp.profile --paper-table               bandwidth bounds of the paper's five nets
  python -m gpumlp.profile --net 4 --engine spread     the spread engine's model beside the persistent one's

Bytes are what each kernel must move at least once (reads + writes); FLOPs count a multiply-add
as two. Registers, shared memory and spills come from NVRTC (see cuda_kernels/RESOURCES.md)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    from gpumlp.commands import OneLineErrorParser
    p = OneLineErrorParser(
        prog="python -m gpumlp.profile",
        description="Profile every kernel of one training step (and the per-epoch deformation) at the "
                    "shapes of a net: bytes moved and FLOPs from a cost model, registers, shared memory, "
                    "spills (NVRTC) and theoretical occupancy; on a GPU also the median time per kernel "
                    "(L2 flushed), achieved GB/s and GFLOP/s against the device's peaks, the time per "
                    "image of whole steps replayed as a CUDA graph, and the implied epoch and 800-epoch "
                    "times beside the bandwidth bound of online SGD. Without a GPU the static and "
                    "analytical part is printed.",
        epilog=EXAMPLES, formatter_class=_HelpFormatter)
    p.add_argument("--net", type=int, default=4, choices=sorted(nets.PAPER_NETS),
                   help="one of the paper's nets: " + "; ".join(
                       f"{k}: {nets.describe(nets.layer_sizes(v))}" for k, v in nets.PAPER_NETS.items()))
    p.add_argument("--hidden", type=int, nargs="+", metavar="N", help="hidden layer sizes (overrides --net)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="1 is the paper's online SGD")
    p.add_argument("--momentum", type=float, default=0.0, metavar="MU", help="profile the momentum variants of the updates")
    p.add_argument("--arch", metavar="sm_XX",
                   help=f"architecture for registers and occupancy (default: the GPU's, else {DEFAULT_ARCH}); "
                        "with a GPU only together with --static")
    p.add_argument("--static", action="store_true", help="skip the timing even where there is a GPU")
    p.add_argument("--repeats", type=int, default=30, metavar="R", help="timed runs per kernel and of the graph")
    p.add_argument("--warmup", type=int, default=3, metavar="W", help="untimed runs before the timed ones")
    p.add_argument("--graph-steps", type=int, default=200, metavar="K",
                   help="training steps captured in the timed CUDA graph")
    p.add_argument("--images", type=int, default=MNIST_TRAIN_IMAGES, metavar="N",
                   help="images in the profiled epoch on a GPU (the deformation's batch)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the report as JSON to PATH, or alone to stdout without PATH")
    p.add_argument("--engine", choices=("graph", "persistent", "spread"), default="graph",
                   help="graph: the launches of one step (above); persistent, spread: the model of that "
                        "engine's kernel (bytes on chip, in L2 and HBM, grid-wide syncs, expected time per "
                        "image; spread also where each weight lives, and the persistent model's time beside)")
    p.add_argument("--paper-table", action="store_true",
                   help="print the bandwidth bounds of the paper's five nets beside its training times, and exit")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.paper_table:
        print(paper_table())
        return 0
    sizes = nets.layer_sizes(args.hidden) if args.hidden else nets.layer_sizes(nets.PAPER_NETS[args.net])
    checks = [
        (not args.hidden or min(args.hidden) > 0, "--hidden sizes must be positive"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
        (args.repeats >= 1, "--repeats must be at least 1"),
        (args.warmup >= 0, "--warmup must be non-negative"),
        (args.graph_steps >= 1, "--graph-steps must be at least 1"),
        (args.arch is None or re.fullmatch(r"sm_\d+", args.arch) is not None,
         f"--arch must look like {DEFAULT_ARCH}, got {args.arch}"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if args.arch and arch_number(args.arch) < min(ARCH_LIMITS):
        parser.error(f"--arch must be sm_{min(ARCH_LIMITS)} or newer, got {args.arch}")
    if args.engine in ("persistent", "spread"):
        if args.batch_size != 1:
            parser.error(f"--engine {args.engine} trains online: --batch-size must be 1")
        try:
            print(engine_model_report(args.engine, sizes, args.arch or DEFAULT_ARCH, args.momentum != 0))
        except ValueError as error:   # a net the engine cannot train
            parser.error(str(error))
        return 0
    timed = not args.static and gpu_available()
    if timed and args.arch:
        parser.error("--arch applies to the static profile: with a GPU, add --static or leave --arch out")
    if timed:
        # a whole number of steps, enough for the graph, and never fewer than the graph needs
        images = max(args.images, args.graph_steps * args.batch_size)
        images -= images % args.batch_size
    else:
        images = args.batch_size   # the shapes alone matter; the deformation is costed per image
    workload = Workload(sizes, args.batch_size, args.momentum, images)
    report = profile(workload, args.arch or DEFAULT_ARCH, timed, args.warmup, args.repeats, args.graph_steps)
    if args.json == "-":
        print(json.dumps(report, indent=1))
        return 0
    print(render(report))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        except OSError as error:
            print(f"error: cannot write --json {args.json}: {error.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
