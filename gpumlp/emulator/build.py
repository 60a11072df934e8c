"""From .cu text to a loadable library: the source step, the glue code, g++, and the cache.

The kernel text itself is compiled unchanged except for one mechanical, line-preserving step:
`extern __shared__` becomes `extern GPUMLP_EXTERN_SHARED` (C++ cannot give a declaration both
`extern` and the `static` that `__shared__` expands to), and `static __shared__` loses its
redundant `static`. Glue code appended after the source gives every extern shared name the
module's dynamic shared memory and every kernel a C-ABI entry point.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
COMPAT_HEADER = PACKAGE_DIR / "cuda_compat.h"
LAUNCH_GLUE_HEADER = PACKAGE_DIR / "launch_glue.h"
SCHEDULER_SOURCE = PACKAGE_DIR / "scheduler.c"
# Headers of the CUDA toolkit that kernels include (<cooperative_groups.h>), standing in for them.
COMPAT_INCLUDE_DIR = PACKAGE_DIR / "include"

# -fvisibility=hidden keeps __device__/__constant__ variables of different modules apart;
# -ffp-contract=off keeps a*b+c two roundings, as the CUDA kernels are written to be compared;
# -fno-strict-aliasing because kernels reinterpret float* as float4* and the like; -fno-weak
# because the __shared__ of an inline function would otherwise be a COMDAT variable, which g++
# refuses to put in the same section as the others; -fstack-clash-protection so that a large local
# array cannot step over a fiber stack's guard page into the next stack.
COMPILE_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing",
                 "-fvisibility=hidden", "-fno-weak", "-fstack-clash-protection", "-pthread")

# The most dynamic shared memory one block may have on the largest GPUs (H100: 227 KiB).
DYNAMIC_SHARED_CAPACITY = 227 * 1024
# The module's dynamic shared memory buffer: the capacity rounded up to whole 4 KiB pages, then a
# guard zone that memcheck keeps PROT_NONE even for the largest launch (scheduler.c).
DYNAMIC_SHARED_GUARD_BYTES = 64 * 1024
DYNAMIC_SHARED_MAPPED = -(-DYNAMIC_SHARED_CAPACITY // 4096) * 4096 + DYNAMIC_SHARED_GUARD_BYTES

_COMMENT_OR_LITERAL = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
_PREPROCESSOR_LINE = re.compile(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", re.M)
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\s*\([^()]*\)")
# __launch_bounds__(max threads[, ...]) and the kernel it belongs to: the first name followed by "("
# after it, on the definition or on a declaration ("extern "C" __launch_bounds__(256) __global__ ...").
_LAUNCH_BOUNDS_OF = re.compile(r"__launch_bounds__\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)[^;{}()]*?\b([A-Za-z_]\w*)\s*\(")
_KERNEL = re.compile(r"\b__global__\b[^;{}()]*?\b([A-Za-z_]\w*)\s*\(([^()]*)\)")
_EXTERN_SHARED_NAME = re.compile(r"\bextern\s+__shared__\b[^;]*?\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*["<]([^">]+)[">]', re.M)


class EmulatorError(RuntimeError):
    """A kernel could not be compiled, or deadlocked or crashed in the emulator."""


@dataclass(frozen=True)
class KernelDeclaration:
    name: str
    parameter_names: tuple[str, ...]
    max_threads_expression: str | None = None   # the first argument of its __launch_bounds__


def _blank_comments(text: str) -> str:
    """Comments become spaces (keeping newlines); string and character literals stay."""
    def blank(match):
        token = match.group(0)
        return token if token[0] in "\"'" else re.sub(r"[^\n]", " ", token)
    return _COMMENT_OR_LITERAL.sub(blank, text)


def _declarations_text(source: str) -> str:
    code = _PREPROCESSOR_LINE.sub("", _blank_comments(source))
    return _LAUNCH_BOUNDS.sub("", code)


def _first_argument(arguments: str) -> str:
    depth = 0
    for position, character in enumerate(arguments):
        depth += {"(": 1, ")": -1}.get(character, 0)
        if character == "," and depth == 0:
            return arguments[:position].strip()
    return arguments.strip()


def find_kernels(source: str) -> list[KernelDeclaration]:
    """The __global__ functions written out in the text (not ones a macro generates), with the
    maximum block size of their __launch_bounds__ as C text (g++ evaluates it in the glue code)."""
    code = _PREPROCESSOR_LINE.sub("", _blank_comments(source))
    bounds = {}
    for match in _LAUNCH_BOUNDS_OF.finditer(code):
        bounds.setdefault(match.group(2), _first_argument(match.group(1)))
    kernels = {}
    for match in _KERNEL.finditer(_LAUNCH_BOUNDS.sub("", code)):
        parameters = [p.strip() for p in match.group(2).split(",") if p.strip() and p.strip() != "void"]
        names = tuple((re.findall(r"[A-Za-z_]\w*", p) or ["?"])[-1] for p in parameters)
        kernels[match.group(1)] = KernelDeclaration(match.group(1), names, bounds.get(match.group(1)))
    return list(kernels.values())


def rewrite_for_emulator(source: str) -> str:
    """The documented mechanical step; it keeps every line where it was, so g++ errors point into
    the original file."""
    source = re.sub(r"\bextern([ \t]+)__shared__\b", r"extern\1GPUMLP_EXTERN_SHARED", source)
    return re.sub(r"\bstatic([ \t]+)__shared__\b", r"\1__shared__", source)


def glue_code(source: str, kernels: list[KernelDeclaration]) -> str:
    extern_shared = sorted(set(_EXTERN_SHARED_NAME.findall(_declarations_text(source))))
    lines = [
        '#line 1 "<emulator glue>"',
        f'#include "{LAUNCH_GLUE_HEADER}"',
        'extern "C" __attribute__((visibility("hidden"))) char __start_gpumlp_shared[], __stop_gpumlp_shared[];',
        "// Makes the section exist in a module without __shared__ variables.",
        '__attribute__((section("gpumlp_shared"), used)) static char gpumlp_shared_anchor;',
        "// Page-aligned and whole pages, so that memcheck can make the pages past a launch's size PROT_NONE.",
        f'extern "C" {{ __attribute__((aligned(4096))) char gpumlp_dynamic_shared[{DYNAMIC_SHARED_MAPPED}]; }}',
        'extern "C" GPUMLP_EXPORT gpumlp_module_memory gpumlp_memory = {',
        f"    __start_gpumlp_shared, __stop_gpumlp_shared, gpumlp_dynamic_shared, {DYNAMIC_SHARED_CAPACITY},",
        "    sizeof gpumlp_dynamic_shared, sizeof gpumlp_dynamic_shared};",
        "// Every extern __shared__ array of a CUDA module starts at the same address: alias them all.",
    ]
    lines += [f'asm(".globl {name}\\n.hidden {name}\\n.set {name}, gpumlp_dynamic_shared\\n");'
              for name in extern_shared]
    for kernel in kernels:
        lines += [
            f'extern "C" GPUMLP_EXPORT void gpumlp_entry_{kernel.name}(void *const *arguments) '
            f"{{ gpumlp_invoke({kernel.name}, arguments); }}",
            f'extern "C" GPUMLP_EXPORT constexpr auto gpumlp_signature_{kernel.name} = '
            f"gpumlp_signature_of({kernel.name});",
        ]
        if kernel.max_threads_expression:
            lines.append(f'extern "C" GPUMLP_EXPORT constexpr int gpumlp_max_threads_{kernel.name} = '
                         f"(int)({kernel.max_threads_expression});")
    return "\n".join(lines) + "\n"


@functools.cache
def compiler_identity() -> str:
    try:
        return subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise EmulatorError(f"the emulator needs g++ on PATH ({error})") from None


def cache_dir() -> Path:
    root = os.environ.get("GPUMLP_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "gpumlp"
    return base / "emulator"


def _included_texts(text: str, search_dirs: list[Path], seen: set[Path]) -> list[str]:
    """Contents of the project headers the text includes, recursively, for the cache key; system
    headers are covered by the compiler version."""
    texts = []
    for name in _INCLUDE.findall(text):
        for directory in search_dirs:
            candidate = (directory / name).resolve()
            if candidate.is_file():
                if candidate not in seen:
                    seen.add(candidate)
                    included = candidate.read_text()
                    texts += [str(candidate), included]
                    texts += _included_texts(included, [candidate.parent, *search_dirs], seen)
                break
    return texts


def _compile(command: list[str], output: Path, description: str) -> None:
    """Runs g++ into a temporary file and renames it into place, so that a parallel process never
    loads a half-written library."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=output.stem + ".", suffix=".tmp", dir=output.parent)
    os.close(handle)
    try:
        result = subprocess.run([*command, "-o", temporary], capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise EmulatorError(f"g++ could not compile {description}:\n" + "\n".join(errors[:20]))
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _digest(*parts: str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode())
        hasher.update(b"\0")
    return hasher.hexdigest()[:32]


def build_runtime() -> Path:
    """The scheduler library, shared by every module of the process."""
    digest = _digest(SCHEDULER_SOURCE.read_text(), COMPAT_HEADER.read_text(), *COMPILE_FLAGS, compiler_identity())
    library = cache_dir() / f"runtime-{digest}.so"
    if not library.exists():
        _compile(["g++", *COMPILE_FLAGS, "-x", "c++", str(SCHEDULER_SOURCE)], library, "the emulator runtime")
    return library


def static_shared_bytes(library: Path, kernel_names) -> dict[str, int] | None:
    """The static __shared__ bytes each kernel may use, from the library's symbol table: its own
    function-local __shared__ variables (g++ names them _ZZ<length><kernel>E...) plus every one no
    kernel owns (file scope, helper functions), an upper bound. None where nm cannot read it."""
    try:
        listing = subprocess.run(["nm", "-S", "--defined-only", str(library)], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    bounds, symbols = {}, []
    for fields in (line.split() for line in listing.splitlines()):
        if len(fields) == 3 and fields[2] in ("__start_gpumlp_shared", "__stop_gpumlp_shared"):
            bounds[fields[2]] = int(fields[0], 16)
        elif len(fields) == 4 and not fields[3].endswith("gpumlp_shared_anchor"):
            symbols.append((int(fields[0], 16), int(fields[1], 16), fields[3]))
    if len(bounds) != 2:
        return None
    shared = [(size, name) for address, size, name in symbols
              if bounds["__start_gpumlp_shared"] <= address < bounds["__stop_gpumlp_shared"]]
    owners = {kernel: f"_ZZ{len(kernel)}{kernel}E" for kernel in kernel_names}
    unowned = sum(size for size, name in shared if not any(name.startswith(p) for p in owners.values()))
    return {kernel: unowned + sum(size for size, name in shared if name.startswith(prefix))
            for kernel, prefix in owners.items()}


def build_module(source: str, name: str, include_dirs, source_dir: Path | None) -> tuple[Path, list, bool]:
    """Returns the cached library for the source, its kernels, and whether it was compiled now."""
    kernels = find_kernels(source)
    origin = str(source_dir / f"{name}.cu") if source_dir else f"{name}.cu"
    unit = f'#line 1 "{origin}"\n{rewrite_for_emulator(source)}\n{glue_code(source, kernels)}'
    search_dirs = ([source_dir] if source_dir else []) + [Path(d) for d in include_dirs]
    include_flags = [f"-I{d}" for d in include_dirs] + ([f"-iquote{source_dir}"] if source_dir else [])
    digest = _digest(unit, COMPAT_HEADER.read_text(), LAUNCH_GLUE_HEADER.read_text(), *COMPILE_FLAGS,
                     *include_flags, compiler_identity(), *_included_texts(source, search_dirs, set()))
    library = cache_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{digest}.so"
    if library.exists():
        return library, kernels, False
    with tempfile.TemporaryDirectory(prefix="gpumlp-emulator-") as scratch:
        unit_path = Path(scratch) / f"{name}.cu"
        unit_path.write_text(unit)
        _compile(["g++", *COMPILE_FLAGS, "-include", str(COMPAT_HEADER), "-isystem", str(COMPAT_INCLUDE_DIR), *include_flags, "-x", "c++", str(unit_path)],
                 library, origin)
    return library, kernels, True
