"""The profiler's model of the persistent engine (`python -m gpumlp.profile --engine persistent`):
where each byte of an image's step comes from (shared memory, L2, HBM), the grid-wide barriers,
the kernel's resources and occupancy, and the expected time per image with what bounds it.

Nothing here has been measured on a GPU. The kernel's registers and static shared memory come from
NVRTC (the compile gate); the launch plan is train_persistent's; the device figures are data-sheet
numbers of an H100 SXM plus the assumptions named in engine_model.ASSUMED (shared-memory and L2
bandwidth, the cost of one grid barrier, one L2 round trip per phase).

The step is a sequence of phases separated by grid barriers (forward of each layer, backward of
each layer), and a phase lasts as long as its busiest block: the one that owns the most chunks of
that layer. Within a block, a phase takes the longest of its shared-memory traffic at the SM's
shared-memory bandwidth, its global traffic at its share of L2 (or HBM) bandwidth and its FLOPs
at the SM's FP32 rate, plus one L2 round trip (each phase starts by reading what other blocks
wrote).
"""
from __future__ import annotations

from gpumlp import compile_gate, nets
from gpumlp.device import KERNEL_DIR
from gpumlp.engine_model import F32, H100_SXM, ModelDevice, closing_lines, global_share, mb, phase_cost
from gpumlp.gpu_limits import arch_limits, theoretical_occupancy
from gpumlp.train_persistent import (CHUNK_ROWS, KERNEL, PERSISTENT_THREADS, SOURCE, grid_syncs_per_image,
                                     layer_chunks, owned_weights, unsupported_reason)


def model(sizes, arch: str = "sm_90", momentum: bool = False, device: ModelDevice = H100_SXM) -> dict:
    reason = unsupported_reason(sizes, 1)
    if reason is not None:
        raise ValueError(f"the persistent engine cannot train {nets.describe(sizes)}: {reason}")
    used = compile_gate.resources_by_kernel(compile_gate.compile_all([arch], [KERNEL_DIR / SOURCE]))[(KERNEL, arch)]
    limits = arch_limits(arch)
    weights = nets.count_weights(sizes)
    chunks = layer_chunks(sizes)
    x_bytes = F32 * max(sizes[:-1])
    # the grid: one block per chunk, at most what is resident without weights in shared memory
    per_sm = theoretical_occupancy(limits, PERSISTENT_THREADS, used.registers, used.shared_bytes + x_bytes).blocks_per_sm
    grid = min(sum(chunks), per_sm * device.sms)
    owned_bytes = F32 * max(owned_weights(sizes, grid))
    with_weights = theoretical_occupancy(limits, PERSISTENT_THREADS, used.registers,
                                         used.shared_bytes + x_bytes + owned_bytes)
    in_shared = with_weights.blocks_per_sm * device.sms >= grid
    occupancy = with_weights if in_shared else theoretical_occupancy(
        limits, PERSISTENT_THREADS, used.registers, used.shared_bytes + x_bytes)
    dynamic = x_bytes + (owned_bytes if in_shared else 0)
    weight_bytes = F32 * weights * (2 if momentum else 1)   # with momentum the velocities too
    weights_home = "shared memory" if in_shared else ("L2" if weight_bytes <= device.l2_bytes else "HBM")

    phases, on_chip, l2, hbm = [], 0, 0, F32 * sizes[0]   # the image comes from HBM
    layers = list(zip(sizes[:-1], sizes[1:], chunks))
    for l, (n_in, n_out, layer_chunk_count) in enumerate(layers):
        rows = min(n_out, -(-layer_chunk_count // grid) * CHUNK_ROWS)
        bandwidth = global_share(device, min(grid, layer_chunk_count, device.sms), weights_home == "HBM")
        w = rows * n_in
        velocity = 2 * F32 * w if momentum else 0
        # forward: W and (per warp) x from shared memory, or W from L2/HBM; x once into shared
        shared = F32 * w * (2 if in_shared else 1)
        global_ = F32 * n_in + (0 if in_shared else F32 * w)
        phases.append(phase_cost(f"forward {l}", rows, shared, global_, 2 * w, bandwidth, device))
        # backward: W read and written, x per column, the partials written, the layer above's read
        above = chunks[l + 1] if l + 1 < len(chunks) else 0
        shared = 2 * F32 * w if in_shared else 0
        global_ = (F32 * n_in * -(-rows // CHUNK_ROWS) + (F32 * n_in * -(-rows // CHUNK_ROWS) if l else 0)
                   + F32 * above * rows + velocity + (0 if in_shared else 2 * F32 * w))
        phases.append(phase_cost(f"backward {l}", rows, shared, global_, (6 if momentum else 5) * w,
                             bandwidth, device))
    # bytes of the whole grid per image
    for l, (n_in, n_out, layer_chunk_count) in enumerate(layers):
        owners = min(grid, layer_chunk_count)
        w = n_in * n_out
        on_chip += F32 * (w * 2 + 2 * w if in_shared else w)              # W (fwd, bwd r/w) and x per warp
        exchange = F32 * (owners * n_in + n_out + layer_chunk_count * n_in)   # x reads, y writes, x per column
        exchange += 2 * F32 * layer_chunk_count * n_in if l else 0          # partials written and read
        exchange += 3 * F32 * n_out                                         # bias read, read and written
        velocity = 2 * F32 * w if momentum else 0
        l2 += exchange
        if weights_home == "L2":
            l2 += 3 * F32 * w + velocity
        elif weights_home == "HBM":
            hbm += 3 * F32 * w + velocity
        else:
            l2 += velocity
    syncs = grid_syncs_per_image(sizes)
    compute = sum(p.seconds for p in phases)
    per_image = compute + syncs * device.grid_sync_seconds
    slowest = max(phases, key=lambda p: p.seconds)
    return {
        "net": nets.describe(sizes), "weights": weights, "arch": arch, "device": device.name, "momentum": momentum,
        "grid": grid, "chunks": sum(chunks), "threads": PERSISTENT_THREADS, "registers": used.registers,
        "static_shared": used.shared_bytes, "dynamic_shared": dynamic, "blocks_per_sm": occupancy.blocks_per_sm,
        "occupancy": occupancy.fraction, "occupancy_limiter": occupancy.limiter, "weights_home": weights_home,
        "owned_bytes": owned_bytes, "bytes_on_chip": on_chip, "bytes_l2": l2, "bytes_hbm": hbm,
        "grid_syncs": syncs, "sync_seconds": syncs * device.grid_sync_seconds, "compute_seconds": compute,
        "per_image_seconds": per_image, "phases": phases,
        "bound": ("grid barriers" if syncs * device.grid_sync_seconds > compute
                  else f"{slowest.bound} of the busiest block in {slowest.name}"),
    }


def render(m: dict) -> str:
    per_image = m["per_image_seconds"]
    lines = [
        f"persistent engine model (nothing measured): net {m['net']} ({m['weights']:,} weights), online"
        f"{' with momentum' if m['momentum'] else ''}, {m['arch']} on an {m['device']}",
        f"grid {m['grid']} blocks x {m['threads']} threads ({m['chunks']} chunks of {CHUNK_ROWS} rows), "
        f"{m['registers']} registers/thread, shared memory {m['static_shared']:,} B static + "
        f"{m['dynamic_shared']:,} B dynamic per block, {m['blocks_per_sm']} blocks/SM resident "
        f"(occupancy {100 * m['occupancy']:.1f}%, limited by {m['occupancy_limiter']})",
        f"weights live in {m['weights_home']} (the busiest block owns {m['owned_bytes'] / 1024:,.1f} KiB of them)",
        "",
        "| per image | value |",
        "|---|---:|",
        f"| bytes from on-chip shared memory | {mb(m['bytes_on_chip'])} |",
        f"| bytes from L2 | {mb(m['bytes_l2'])} |",
        f"| bytes from HBM | {mb(m['bytes_hbm'])} |",
        f"| grid-wide syncs | {m['grid_syncs']} ({m['sync_seconds'] * 1e6:.1f} us) |",
        f"| phases (busiest block) | {m['compute_seconds'] * 1e6:.1f} us |",
        f"| expected time | {per_image * 1e6:.1f} us |",
        "",
        "| phase | rows of the busiest block | its shared bytes | its L2/HBM bytes | us | bound |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {p.name} | {p.rows} | {p.shared_bytes:,} | {p.global_bytes:,} | {p.seconds * 1e6:.2f} | {p.bound} |"
              for p in m["phases"]]
    lines += ["", *closing_lines(per_image, m["bound"])]
    return "\n".join(lines)
