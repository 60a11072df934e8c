"""The profiler's model of the spread engine (`python -m gpumlp.profile --engine spread`): where each
weight lives (spread_plan: registers, shared memory, global memory), where each byte of an image's
step comes from, the grid-wide barriers, the kernel's resources, and the expected time per image
with what bounds it. Nothing here has been measured on a GPU; the device and its assumptions are
engine_model's, shared with the persistent engine's model.

One block per SM (G = SMs blocks of spread_plan.THREADS threads). A phase is the work between two
grid barriers, or on block 0 alone between the last forward barrier and the first backward one
(the output layer's forward, the softmax, the output layer's backward); it lasts as long as its
slowest block, so every block's phase is costed (engine_model.phase_cost) and the slowest kept.
What a block moves in each phase, as cuda_kernels/mlp_spread.cu does it:
- forward l: x = y_{l-1} (n_in) from L2 into shared memory; the register rows by thread per column
  (x read once) and a block reduction through shared memory; the other rows warp per row (W row
  from shared memory or L2, x from shared memory); the bias read and y written for each row;
- softmax: the output layer's y, the label, and the loss and error totals (read and written);
- backward l: each row's delta from the partials of the owners of layer l + 1 (G floats n_in
  apart: one 32-byte L2 sector each) and its y (for f'), into shared memory; then, after a block
  barrier, x again from L2 and for every column one fmaf chain down the block's rows, which reads
  delta[r] from shared memory for every weight (a broadcast: one wavefront per warp), reads and
  writes each weight where it lives (and its velocity in global memory, with momentum), and
  writes the block's partial row (n_in) for layer l >= 1; the biases' steps in global memory.
Shared-memory traffic is counted in wavefronts of 128 bytes (the SM's bandwidth per clock): a
coalesced warp access moves 128 bytes, a broadcast or one-lane access costs the same clock.
L2 round trips: a phase waits for one at its start; a hidden layer's backward waits for a second
(x, after the deltas' block barrier). The loads and stores of the shared memory fill and write-back
at the start and end of a launch are spread over its images and left out.
"""
from __future__ import annotations

from dataclasses import dataclass

from gpumlp import compile_gate, nets
from gpumlp.device import KERNEL_DIR
from gpumlp.engine_model import F32, H100_SXM, ModelDevice, Phase, closing_lines, global_share, mb, phase_cost
from gpumlp.gpu_limits import arch_limits, theoretical_occupancy
from gpumlp.spread_plan import (REGISTER_COLUMNS, REGISTER_ROWS, THREADS, block_rows, block_storage,
                                grid_syncs_per_image, owners, partial_floats, register_layer, scratch_floats,
                                shared_weight_floats_needed, unsupported_reason)
from gpumlp.train_spread import KERNEL, SOURCE

WARPS = THREADS // 32
NOT_COUNTED = ("latency within a phase beyond its L2 round trips (a column's walk down its rows waits for each "
               "row's load in turn), the issue slots of the multiplies and subtractions beside the FMAs, the "
               "shared memory's fill and write-back once per launch")
WAVEFRONT = 128     # bytes: one shared-memory access of a warp, one clock of the SM's shared memory
SECTOR = 32         # bytes: what L2 sends for a lone 4-byte load


@dataclass
class SpreadPhase:
    cost: Phase           # of the slowest block
    block: int            # which block that is
    blocks: int           # the blocks working in this phase
    register_bytes: int   # weight bytes the slowest block reads and writes in its register tile
    round_trips: int


@dataclass
class _BlockWork:
    """What one block does in one phase."""
    rows: int
    register_bytes: int = 0
    shared_bytes: int = 0
    exchange_bytes: int = 0   # global: activations, partials, label, totals (always from L2)
    resident_bytes: int = 0   # global: weights in W, biases, velocities (L2, or HBM when they do not fit)
    flops: int = 0
    round_trips: int = 1


def _warp_accesses(n: int) -> int:
    """Warp accesses that cover n consecutive floats."""
    return -(-n // 32)


def _forward(sizes, l, storage, rows) -> _BlockWork:
    n_in = sizes[l]
    reg, shared, global_ = storage.register_rows[l], storage.shared_rows[l], storage.global_rows[l]
    memory_rows = shared + global_
    shared_traffic = WAVEFRONT * _warp_accesses(n_in)                               # x stored
    if reg:   # x read once by thread per column, then the 8 warps' sums of each row
        shared_traffic += WAVEFRONT * (_warp_accesses(n_in) + WARPS * REGISTER_ROWS + WARPS)
    shared_traffic += F32 * n_in * (memory_rows + shared)                             # x per row, shared W rows
    # a register row's bias and y are read and written by consecutive threads, a memory row's by
    # one lane of its warp (a sector each)
    return _BlockWork(rows, register_bytes=F32 * reg * n_in, shared_bytes=shared_traffic,
                      exchange_bytes=F32 * n_in + F32 * reg + SECTOR * memory_rows,   # x read, y written
                      resident_bytes=F32 * reg + SECTOR * memory_rows + F32 * global_ * n_in,   # biases, W rows
                      flops=2 * rows * n_in)


def _softmax(n_classes) -> _BlockWork:
    # y read; one sector each for the label and for reading and writing the loss and error totals
    return _BlockWork(n_classes, shared_bytes=WAVEFRONT * _warp_accesses(n_classes),   # the deltas written
                      exchange_bytes=SECTOR * (-(-F32 * n_classes // SECTOR) + 1 + 2 + 2), flops=5 * n_classes)


def _backward(sizes, l, storage, rows, last, blocks, momentum) -> _BlockWork:
    n_in = sizes[l]
    reg, shared, global_ = storage.register_rows[l], storage.shared_rows[l], storage.global_rows[l]
    work = _BlockWork(rows, register_bytes=2 * F32 * reg * n_in, round_trips=1 if last else 2)
    if not last:   # the deltas: every owner's partial of each row, and the row's y
        work.exchange_bytes += SECTOR * rows * (len(owners(sizes, l + 1, blocks)) + 1)
        work.shared_bytes += WAVEFRONT * rows                                           # delta stored
    work.exchange_bytes += F32 * n_in + (F32 * n_in if l else 0)                         # x; the partial row
    work.shared_bytes += WAVEFRONT * rows * _warp_accesses(n_in) + 2 * F32 * shared * n_in   # delta[r]; W
    work.shared_bytes += WAVEFRONT * _warp_accesses(rows)                                 # delta for the biases
    velocities = 2 * F32 * rows * (n_in + 1) if momentum else 0
    work.resident_bytes = 2 * F32 * global_ * n_in + 2 * F32 * rows + velocities         # W rows, biases
    work.flops = (2 + (5 if momentum else 3)) * rows * n_in + (5 if momentum else 3) * rows
    return work


def model(sizes, arch: str = "sm_90", momentum: bool = False, device: ModelDevice = H100_SXM) -> dict:
    reason = unsupported_reason(sizes, 1)
    if reason is not None:
        raise ValueError(f"the spread engine cannot train {nets.describe(sizes)}: {reason}")
    limits = arch_limits(arch)
    used = compile_gate.resources_by_kernel(compile_gate.compile_all([arch], [KERNEL_DIR / SOURCE]))[(KERNEL, arch)]
    grid = device.sms   # one block per SM: 256 threads of ~250 registers (train_spread.plan_launch's grid)
    scratch = scratch_floats(sizes, grid)
    # train_spread.plan_launch: every non-register row of the busiest block, if the opt-in maximum
    # of dynamic shared memory holds them beside the scratch, else as many as it holds
    room = (limits.shared_per_sm - limits.shared_reserved_per_block - used.shared_bytes) // F32 - scratch
    if room < 0:
        raise ValueError(f"the spread engine cannot train {nets.describe(sizes)}: its {F32 * scratch:,} bytes of "
                         f"shared scratch per block exceed {arch}'s shared memory")
    capacity = min(shared_weight_floats_needed(sizes, grid), room)
    storages = [block_storage(sizes, b, grid, capacity) for b in range(grid)]
    dynamic = F32 * (scratch + capacity)
    registers = used.registers
    occupancy = theoretical_occupancy(limits, THREADS, registers, used.shared_bytes + dynamic)
    if occupancy.blocks_per_sm < 1:
        raise ValueError(f"the spread engine cannot train {nets.describe(sizes)}: a block of {THREADS} threads "
                         f"with {registers} registers each does not fit one {arch} SM")
    n_layers = len(sizes) - 1
    weights = nets.count_weights(sizes)
    layer_weights = [n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    in_registers = sum(s.register_rows[l] * sizes[l] for s in storages for l in range(n_layers))
    in_shared = sum(s.shared_floats(sizes) for s in storages)
    in_global = sum(layer_weights) - in_registers - in_shared
    biases = activations = sum(sizes[1:])
    in_global_memory = F32 * (in_global + biases + (weights if momentum else 0) + partial_floats(sizes, grid)
                              + activations)
    from_hbm = in_global_memory > device.l2_bytes

    def phase(name, works) -> SpreadPhase:
        """The slowest of the blocks' `works` ({block: _BlockWork}) in one phase."""
        bandwidth = global_share(device, len(works), from_hbm)
        costs = {b: phase_cost(name, w.rows, w.shared_bytes, w.exchange_bytes + w.resident_bytes, w.flops,
                               bandwidth, device, w.round_trips) for b, w in works.items()}
        slowest = max(costs, key=lambda b: costs[b].seconds)
        return SpreadPhase(costs[slowest], slowest, len(works), works[slowest].register_bytes,
                           works[slowest].round_trips)

    def rows_of(l, b):
        begin, end = block_rows(sizes, l, b, grid)
        return end - begin

    totals = {"register": 0, "shared": 0, "l2": 0, "hbm": F32 * sizes[0]}   # the image comes from HBM

    def working(l, make) -> dict:
        works = {b: make(b) for b in range(grid) if rows_of(l, b)}
        for w in works.values():
            totals["register"] += w.register_bytes
            totals["shared"] += w.shared_bytes
            totals["l2"] += w.exchange_bytes + (0 if from_hbm else w.resident_bytes)
            totals["hbm"] += w.resident_bytes if from_hbm else 0
        return works

    last = n_layers - 1
    phases = [phase(f"forward {l}", working(l, lambda b: _forward(sizes, l, storages[b], rows_of(l, b))))
              for l in range(n_layers)]
    phases.append(phase("softmax", working(last, lambda b: _softmax(sizes[-1]))))
    phases += [phase(f"backward {l}", working(l, lambda b: _backward(sizes, l, storages[b], rows_of(l, b), l == last,
                                                                     grid, momentum)))
               for l in reversed(range(n_layers))]
    syncs = grid_syncs_per_image(sizes)
    compute = sum(p.cost.seconds for p in phases)
    round_trips = sum(p.round_trips for p in phases) * device.l2_round_trip_seconds
    parts = {"grid barriers": syncs * device.grid_sync_seconds, "L2 round trips": round_trips,
             "the phases' traffic and FLOPs": compute - round_trips}
    slowest = max(phases, key=lambda p: p.cost.seconds)
    reg_layer = register_layer(sizes, grid)
    return {
        "net": nets.describe(sizes), "sizes": list(sizes), "weights": weights, "arch": arch, "device": device.name,
        "momentum": momentum, "grid": grid, "threads": THREADS, "registers": registers,
        "spill_bytes": used.spill_store_bytes + used.spill_load_bytes, "static_shared": used.shared_bytes,
        "dynamic_shared": dynamic, "scratch_bytes": F32 * scratch,
        "shared_capacity_floats": capacity, "blocks_per_sm": occupancy.blocks_per_sm,
        "occupancy": occupancy.fraction, "occupancy_limiter": occupancy.limiter, "register_layer": reg_layer,
        "storages": storages, "floats_in_registers": in_registers, "floats_in_shared": in_shared,
        "floats_in_global": in_global, "biases": biases, "global_home": "HBM" if from_hbm else "L2",
        "bytes_in_registers": totals["register"], "bytes_on_chip": totals["shared"], "bytes_l2": totals["l2"],
        "bytes_hbm": totals["hbm"], "grid_syncs": syncs, "sync_seconds": parts["grid barriers"],
        "round_trip_seconds": round_trips, "compute_seconds": compute,
        "per_image_seconds": compute + parts["grid barriers"], "phases": phases, "parts": parts,
        "bound": max(parts, key=parts.get), "slowest_phase": f"{slowest.cost.name} ({slowest.cost.bound})",
    }


def _kib(floats: int) -> str:
    return f"{F32 * floats / 1024:,.1f}"


def render(m: dict) -> str:
    sizes, storages, grid = m["sizes"], m["storages"], m["grid"]
    n_layers = len(sizes) - 1
    per_image = m["per_image_seconds"]
    tile = (f"layer {m['register_layer']}'s first {REGISTER_ROWS} rows of each block"
            f" ({REGISTER_ROWS} x {REGISTER_COLUMNS} weights per thread)"
            if m["register_layer"] >= 0 else "none (no hidden layer has n_in <= 2560)")
    lines = [
        f"spread engine model (nothing measured): net {m['net']} ({m['weights']:,} weights), online"
        f"{' with momentum' if m['momentum'] else ''}, {m['arch']} on an {m['device']}",
        f"grid {grid} blocks (one per SM) x {m['threads']} threads, {m['registers']} registers/thread "
        f"({m['spill_bytes']} B spilled; NVRTC), shared memory {m['static_shared']:,} B static + "
        f"{m['dynamic_shared']:,} B dynamic per block ({m['scratch_bytes']:,} B of it scratch), "
        f"{m['blocks_per_sm']} block/SM resident (occupancy {100 * m['occupancy']:.1f}%, limited by "
        f"{m['occupancy_limiter']})",
        f"register tile: {tile}; weights left in global memory are read from {m['global_home']}",
    ]
    if m["spill_bytes"]:
        lines.append(f"warning: the kernel spills {m['spill_bytes']} B: register rows are costed as registers, "
                     f"so the figure below is optimistic")
    kinds = {"registers": lambda s: sum(r * n for r, n in zip(s.register_rows, sizes)),
             "shared memory": lambda s: s.shared_floats(sizes),
             "global memory": lambda s: sum(r * n for r, n in zip(s.global_rows, sizes))}
    grid_floats = {"registers": m["floats_in_registers"], "shared memory": m["floats_in_shared"],
                   "global memory": m["floats_in_global"]}
    lines += ["", "| weights in | KiB per block (fewest - most) | whole grid | share of the net |", "|---|---:|---:|---:|"]
    for kind, floats_of in kinds.items():
        per = [floats_of(s) for s in storages]
        lines.append(f"| {kind} | {_kib(min(per))} - {_kib(max(per))} | {mb(F32 * grid_floats[kind])} | "
                     f"{grid_floats[kind] / m['weights']:.1%} |")
    lines.append(f"| biases (global memory) | | {mb(F32 * m['biases'])} | {m['biases'] / m['weights']:.1%} |")
    lines.append(f"| all | | {mb(F32 * m['weights'])} | 100.0% |")
    lines += ["", "| layer | n_in x n_out | rows per block | rows in registers | in shared memory | in global memory |",
              "|---|---|---:|---:|---:|---:|"]
    for l in range(n_layers):
        owning = [e - s for s, e in (block_rows(sizes, l, b, grid) for b in range(grid)) if e > s]
        span = f"{min(owning)}" if min(owning) == max(owning) else f"{min(owning)} - {max(owning)}"
        span += f" on {len(owning)} blocks" if len(owning) < grid else ""
        lines.append(f"| {l} | {sizes[l]} x {sizes[l + 1]} | {span} | "
                     f"{sum(s.register_rows[l] for s in storages)} | {sum(s.shared_rows[l] for s in storages)} | "
                     f"{sum(s.global_rows[l] for s in storages)} |")
    lines += [
        "",
        "| per image | value |",
        "|---|---:|",
        f"| weight bytes touched in registers | {mb(m['bytes_in_registers'])} |",
        f"| bytes from on-chip shared memory (128-B wavefronts) | {mb(m['bytes_on_chip'])} |",
        f"| bytes from L2 | {mb(m['bytes_l2'])} |",
        f"| bytes from HBM | {mb(m['bytes_hbm'])} |",
        f"| grid-wide syncs | {m['grid_syncs']} ({m['sync_seconds'] * 1e6:.1f} us) |",
        f"| phases (slowest block each) | {m['compute_seconds'] * 1e6:.1f} us, of which L2 round trips "
        f"{m['round_trip_seconds'] * 1e6:.1f} us |",
        f"| expected time | {per_image * 1e6:.1f} us |",
        "",
        "| phase | blocks | slowest block | its rows | its register bytes | its shared bytes | its L2/HBM bytes "
        "| its FLOPs | L2 round trips | us | bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {p.cost.name} | {p.blocks} | {p.block} | {p.cost.rows} | {p.register_bytes:,} | {p.cost.shared_bytes:,} "
              f"| {p.cost.global_bytes:,} | {p.cost.flops:,} | {p.round_trips} | {p.cost.seconds * 1e6:.2f} | {p.cost.bound} |"
              for p in m["phases"]]
    parts = "; ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in m["parts"].items())
    lines += ["", *closing_lines(per_image, f"{m['bound']} ({parts}; slowest phase {m['slowest_phase']})"),
              f"not counted: {NOT_COUNTED}"]
    return "\n".join(lines)
