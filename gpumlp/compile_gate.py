"""NVRTC compile gate: every kernel of `cuda_kernels/*.cu` compiles for every GPU generation we
support, without spilling registers, and its resources are on record.

Each source file is compiled once per architecture with the options CudaDevice uses, plus
`-Xptxas=-v` so ptxas reports, per entry function: registers per thread, static shared memory,
stack frame, spill stores/loads, barriers and constant memory. No GPU is needed: NVRTC compiles
to cubin on the host. Nor a CUDA toolkit: the NVRTC wheel of the `test` extra is enough
(tests/test_install.py runs the gate's tests with the system toolkit hidden).

`python -m gpumlp.compile_gate --write` regenerates `cuda_kernels/RESOURCES.md`;
`python -m gpumlp.compile_gate` checks every kernel and prints the table without writing it.
"""
from __future__ import annotations

import hashlib
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from gpumlp.device import KERNEL_DIR, cuda_compile_options, toolkit_wheels_command

# The GPU generations the project promises to run on: Turing, Ampere (A100, RTX 30), Ada, Hopper.
# Every newer architecture the installed NVRTC knows is added to them (Blackwell and later);
# the Jetson-only sm_87/sm_88 are left out.
REQUIRED_ARCHS = (75, 80, 86, 89, 90)
RESOURCES_FILE = KERNEL_DIR / "RESOURCES.md"
WRITE_COMMAND = "python -m gpumlp.compile_gate --write"
# Registers per thread above this are reported as close to the 255 at which ptxas starts spilling.
NEAR_SPILL_REGISTERS = 224


# What CuPy adds to CudaDevice's own options when RawModule compiles (cupy.cuda.compiler): -ftz
# changes the code generated for float arithmetic, so registers are counted with it.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def compile_options(arch: str) -> list[str]:
    """The options a CudaDevice compiles with, the architecture pinned and ptxas made verbose."""
    return [*cuda_compile_options(), *CUPY_ADDED_OPTIONS, f"-arch={arch}", "-Xptxas=-v"]


class CompileError(RuntimeError):
    """NVRTC refused a kernel source; the message carries the file, the architecture and the log."""


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reported for one entry function on one architecture."""
    source: str
    kernel: str
    arch: str
    registers: int
    shared_bytes: int           # static __shared__ per block (dynamic shared memory comes on top)
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    barriers: int
    constant_bytes: int         # all cmem banks: kernel parameters and compiler constants

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


@dataclass
class CompiledSource:
    """One source file compiled for one architecture."""
    source: str
    arch: str
    log: str
    kernels: dict[str, KernelResources] = field(default_factory=dict)
    # Non-entry (__noinline__) functions: name -> (stack, spill stores, spill loads) bytes.
    functions: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # The __global__ names of the source text, each of which must have an entry in the log.
    declared: list[str] = field(default_factory=list)


# -- reading sources and logs --------------------------------------------------------------------
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_GLOBAL = re.compile(r"__global__\s+(?:void\s+)?(?:__launch_bounds__\s*\([^)]*\)\s*)?(?:void\s+)?(\w+)\s*\(")


def strip_comments(source_text: str) -> str:
    return _COMMENTS.sub(" ", source_text)


def global_names(source_text: str) -> list[str]:
    """The `__global__` functions defined in a source text, comments ignored."""
    return sorted(set(_GLOBAL.findall(strip_comments(source_text))))


def log_has_kernel(name: str, entry_names) -> bool:
    """extern "C" kernels keep their name; a template kernel appears mangled as `_Z<len><name>...`."""
    mangled = f"_Z{len(name)}{name}"
    return any(entry == name or entry.startswith(mangled) for entry in entry_names)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[\d+\]")


def parse_ptxas_log(source: str, arch: str, log: str) -> CompiledSource:
    """Per-function resources from `ptxas -v` output. The lines come in this order per entry:
    'Compiling entry function', 'Function properties', the stack/spill line, the 'Used' line;
    a __noinline__ device function has only the properties and stack/spill lines."""
    compiled = CompiledSource(source, arch, log)
    entry = described = None
    frames: dict[str, tuple[int, int, int]] = {}
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
        elif m := _PROPERTIES.search(line):
            described = m.group(1)
        elif (m := _FRAME.search(line)) and described is not None:
            frames[described] = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and entry is not None:
            stack, stores, loads = frames.get(entry, (0, 0, 0))
            barriers = _BARRIERS.search(line)
            smem = _SMEM.search(line)
            compiled.kernels[entry] = KernelResources(
                source=source, kernel=entry, arch=arch, registers=int(m.group(1)),
                shared_bytes=int(smem.group(1)) if smem else 0, stack_bytes=stack,
                spill_store_bytes=stores, spill_load_bytes=loads,
                barriers=int(barriers.group(1)) if barriers else 0,
                constant_bytes=sum(int(c) for c in _CMEM.findall(line)))
    compiled.functions = {name: frame for name, frame in frames.items() if name not in compiled.kernels}
    return compiled


# -- compiling -----------------------------------------------------------------------------------
def nvrtc_module():
    from cupy_backends.cuda.libs import nvrtc
    return nvrtc


def nvrtc_version() -> str:
    major, minor = nvrtc_module().getVersion()
    return f"{major}.{minor}"


def gate_archs() -> list[str]:
    """The required architectures plus every newer one the installed NVRTC supports."""
    supported = set(nvrtc_module().getSupportedArchs())
    missing = [a for a in REQUIRED_ARCHS if a not in supported]
    if missing:
        raise CompileError(f"NVRTC {nvrtc_version()} cannot compile for "
                           f"{', '.join(f'sm_{a}' for a in missing)}; {toolkit_wheels_command(13)}")
    newer = [a for a in supported if a > max(REQUIRED_ARCHS)]
    return [f"sm_{a}" for a in sorted({*REQUIRED_ARCHS, *newer})]


def kernel_sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.cu"))


def compile_source(path: str, arch: str) -> CompiledSource:
    """Compile one file for one architecture (in a worker process: NVRTC holds the GIL)."""
    nvrtc = nvrtc_module()
    name = Path(path).name
    text = Path(path).read_text()
    program = nvrtc.createProgram(text, name, [], [])
    try:
        nvrtc.compileProgram(program, compile_options(arch))
    except nvrtc.NVRTCError as error:
        raise CompileError(f"{name} does not compile for {arch}: {error}\n{nvrtc.getProgramLog(program)}") from None
    finally:
        log = nvrtc.getProgramLog(program)
        nvrtc.destroyProgram(program)
    compiled = parse_ptxas_log(name, arch, log)
    compiled.declared = global_names(text)
    return compiled


def _sources_fingerprint() -> str:
    """Changes whenever a kernel or an included header changes, so the session cache stays true."""
    digest = hashlib.sha256()
    for path in sorted(KERNEL_DIR.glob("*.cu*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


_session_cache: dict[tuple[str, str, str], CompiledSource] = {}


def compile_all(archs=None, sources=None) -> list[CompiledSource]:
    """Every (source, arch) pair compiled once per session, two at a time across processes."""
    archs = list(archs) if archs else gate_archs()
    sources = [Path(s) for s in sources] if sources else kernel_sources()
    fingerprint = _sources_fingerprint()
    wanted = [(str(s), a) for s in sources for a in archs]
    todo = [pair for pair in wanted if (fingerprint, *pair) not in _session_cache]
    if len(todo) == 1:
        _session_cache[(fingerprint, *todo[0])] = compile_source(*todo[0])
    elif todo:
        # fork: the workers only run NVRTC, which never calls the CUDA driver, so a CUDA context
        # in the caller is harmless; spawn would re-run an unguarded calling script in each worker.
        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("fork")) as pool:
            for pair, compiled in zip(todo, pool.map(compile_source, *zip(*todo))):
                _session_cache[(fingerprint, *pair)] = compiled
    return [_session_cache[(fingerprint, *pair)] for pair in wanted]


def resources_by_kernel(compiled: list[CompiledSource]) -> dict[tuple[str, str], KernelResources]:
    """(kernel, arch) -> resources, over all sources."""
    return {(k.kernel, k.arch): k for c in compiled for k in c.kernels.values()}


# -- checks --------------------------------------------------------------------------------------
def problems(compiled: list[CompiledSource]) -> list[str]:
    """Every spill (in a kernel or a __noinline__ function) and every __global__ missing from the
    log, one line each; empty when the gate passes."""
    found = []
    for c in compiled:
        for k in c.kernels.values():
            if k.spills:
                found.append(f"{c.source}: kernel {k.kernel} spills on {c.arch} "
                             f"({k.spill_store_bytes} bytes stored, {k.spill_load_bytes} loaded; "
                             f"{k.registers} registers)")
        for name, (_, stores, loads) in c.functions.items():
            if stores or loads:
                found.append(f"{c.source}: function {name} spills on {c.arch} "
                             f"({stores} bytes stored, {loads} loaded)")
        for name in c.declared:
            if not log_has_kernel(name, c.kernels):
                found.append(f"{c.source}: __global__ {name} was not compiled for {c.arch} "
                             f"(missing from the ptxas log)")
    return found


def near_spills(compiled: list[CompiledSource]) -> list[KernelResources]:
    """Kernels that do not spill yet but use a stack frame or nearly all 255 registers."""
    return [k for c in compiled for k in c.kernels.values()
            if not k.spills and (k.registers >= NEAR_SPILL_REGISTERS or k.stack_bytes > 0)]


# -- the resources table -------------------------------------------------------------------------
def render_resources(compiled: list[CompiledSource], version: str) -> str:
    archs = sorted({c.arch for c in compiled}, key=lambda a: int(a[3:]))
    table = resources_by_kernel(compiled)
    kernels = sorted({(c.source, k) for c in compiled for k in c.kernels})
    lines = [
        "# Kernel resources",
        "",
        f"Generated by `{WRITE_COMMAND}` with NVRTC {version}: do not edit.",
        f"Options: `{' '.join(compile_options('sm_XX')).replace(str(KERNEL_DIR), 'cuda_kernels')}`.",
        "No kernel spills on any architecture (tests/test_compile_gate.py fails if one does).",
        "Shared memory is the static `__shared__` per block; dynamic shared memory comes on top.",
        "",
    ]
    sections = [("Registers per thread", lambda k: str(k.registers)),
                ("Static shared memory per block (bytes)", lambda k: str(k.shared_bytes)),
                ("Stack frame per thread (bytes)", lambda k: str(k.stack_bytes))]
    for title, cell in sections:
        lines += [f"## {title}", "",
                  "| source | kernel | " + " | ".join(archs) + " |",
                  "|---|---|" + "---:|" * len(archs)]
        for source, kernel in kernels:
            cells = [cell(table[(kernel, a)]) if (kernel, a) in table else "-" for a in archs]
            lines.append(f"| {source} | {kernel} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


_VERSION_LINE = re.compile(r"with NVRTC (\d+\.\d+)")


def recorded_nvrtc_version(text: str) -> str | None:
    m = _VERSION_LINE.search(text)
    return m.group(1) if m else None


def main(argv=None) -> int:
    from gpumlp.commands import OneLineErrorParser
    parser = OneLineErrorParser(
        prog="python -m gpumlp.compile_gate",
        description="Compile every kernel in cuda_kernels/*.cu with NVRTC for every supported GPU "
                    "architecture (no GPU needed), fail on register spills or kernels missing from "
                    "the ptxas log, and print (or --write) the resources table.")
    parser.add_argument("--write", action="store_true", help=f"write {RESOURCES_FILE.name} into {KERNEL_DIR.name}/")
    parser.add_argument("--arch", action="append", metavar="sm_XX",
                        help="only this architecture (repeatable); default: all of the gate's")
    args = parser.parse_args(argv)
    if args.write and args.arch:
        parser.error("--write records every architecture of the gate: leave out --arch")
    bad = [a for a in args.arch or [] if not re.fullmatch(r"sm_\d+", a)]
    if bad:
        parser.error(f"--arch must look like sm_90, got {bad[0]}")
    try:
        nvrtc_module().getVersion()
    except Exception as error:  # no CuPy, or no NVRTC library where CuPy looks for one
        print(f"error: NVRTC could not be loaded ({type(error).__name__}: {error}): "
              f"pip install 'gpumlp[test]' (or {toolkit_wheels_command(13)})", file=sys.stderr)
        return 2
    try:
        compiled = compile_all(args.arch or gate_archs())
    except CompileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = render_resources(compiled, nvrtc_version())
    found = problems(compiled)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    for k in near_spills(compiled):
        print(f"note: {k.source}: {k.kernel} on {k.arch} uses {k.registers} registers and a "
              f"{k.stack_bytes}-byte stack frame (no spills)", file=sys.stderr)
    if args.write:
        RESOURCES_FILE.write_text(text)
        print(f"wrote {RESOURCES_FILE}")
    else:
        print(text)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
