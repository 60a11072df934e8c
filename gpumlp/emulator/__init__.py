"""CPU emulator for the project's CUDA kernels: compiles the unchanged .cu text with g++ and launches
it with CuPy's RawKernel call form, `kernel(grid, block, args, shared_mem=...)`, on numpy arrays.

Each CUDA thread of a block runs as a fiber, so barriers and warp operations keep their meaning;
`poison_shared` (shared memory filled with NaN bytes before each block) and `reverse_threads`
(threads of a block run last to first) make missing barriers show up as wrong results. Deadlocks
and crashes inside a kernel raise EmulatorError instead of hanging or killing Python.
`Kernel.launch_cooperative` runs a cooperative launch: every block resident at once, with
`cooperative_groups::this_grid().sync()` as a grid-wide barrier (gpumlp/emulator/cooperative.py).
"""
from __future__ import annotations

import ctypes
import struct
from pathlib import Path

from gpumlp.emulator.arguments import ArgumentPacker
from gpumlp.emulator.build import EmulatorError, build_module, build_runtime

__all__ = ["load_module", "load_module_source", "EmulatorError", "KernelNotFoundError", "Module", "Kernel"]

_MESSAGE_BYTES = 2048
_POISON_SHARED, _REVERSE_THREADS = 1, 2
_DIMENSIONS = struct.Struct("<6I")


class KernelNotFoundError(KeyError):
    def __str__(self):
        return self.args[0]


_runtime_library = None


def _runtime():
    """The scheduler library, loaded once with global symbols so that every module links to it."""
    global _runtime_library
    if _runtime_library is None:
        library = ctypes.CDLL(str(build_runtime()), mode=ctypes.RTLD_GLOBAL)
        library.gpumlp_launch.restype = ctypes.c_int
        library.gpumlp_launch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                                          ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_size_t]
        _runtime_library = library
    return _runtime_library


def _dimensions(value, what: str) -> tuple[int, int, int]:
    if type(value) is int and 0 < value < 2**32:
        return value, 1, 1
    extents = (value,) if not isinstance(value, (tuple, list)) else tuple(value)
    if not 1 <= len(extents) <= 3:
        raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    try:
        extents = tuple(int(e) for e in extents) + (1,) * (3 - len(extents))
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}") from None
    if min(extents) < 1 or max(extents) >= 2**32:
        raise ValueError(f"{what} extents must be positive 32-bit ints, got {value!r}")
    return extents


class Kernel:
    """One __global__ function of a Module, called like CuPy's RawKernel."""

    def __init__(self, module: Module, name: str, entry: int, packer: ArgumentPacker):
        self.module = module
        self.name = name
        self._entry = entry
        self._packer = packer

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        dimensions = _DIMENSIONS.pack(*_dimensions(grid, "grid"), *_dimensions(block, "block"))
        slots = self._packer.pack(args)
        module = self.module
        flags = (_POISON_SHARED if module.poison_shared else 0) | (_REVERSE_THREADS if module.reverse_threads else 0)
        if _runtime().gpumlp_launch(self._entry, dimensions, int(shared_mem), module.memory, flags, slots,
                                    len(self._packer.parameters), module.message_buffer, _MESSAGE_BYTES):
            raise EmulatorError(f"kernel '{self.name}' (module {module.name}): "
                                f"{module.message_buffer.value.decode(errors='replace')}")

    def launch_cooperative(self, grid, block, args, shared_mem: int = 0, registers_per_thread: int = 0,
                           block_order: str = "launch", seed: int = 0) -> None:
        """A cooperative launch (cudaLaunchCooperativeKernel): every block resident at once, so
        that cooperative_groups::this_grid().sync() is a grid-wide barrier. A grid larger than the
        nominal device can hold resident is refused, as a GPU refuses it. `block_order` ("launch",
        "reversed", "shuffled" with `seed`) is the order in which the blocks run between two grid
        barriers; comparing orders finds a missing grid barrier."""
        from gpumlp.emulator import cooperative
        grid_extents, block_extents = _dimensions(grid, "grid"), _dimensions(block, "block")
        blocks = grid_extents[0] * grid_extents[1] * grid_extents[2]
        threads = block_extents[0] * block_extents[1] * block_extents[2]
        shared = cooperative.static_shared_bytes(self.module) + int(shared_mem)
        limit = cooperative.resident_block_limit(threads, int(registers_per_thread), shared)
        if blocks > limit:
            device = cooperative.NOMINAL_DEVICE
            raise EmulatorError(
                f"kernel '{self.name}': a cooperative launch of {blocks} blocks is too large: at most {limit} "
                f"blocks of {threads} threads ({registers_per_thread} registers each, {shared} bytes of shared "
                f"memory) are resident on the {device.name}, {device.sm_count} SMs ({device.arch} limits)")
        if block_order not in cooperative.BLOCK_ORDERS:
            raise ValueError(f"block_order must be one of {', '.join(cooperative.BLOCK_ORDERS)}, got {block_order!r}")
        dimensions = _DIMENSIONS.pack(*grid_extents, *block_extents)
        slots = self._packer.pack(args)
        module = self.module
        flags = (_POISON_SHARED if module.poison_shared else 0) | (_REVERSE_THREADS if module.reverse_threads else 0)
        if cooperative._launcher(_runtime())(self._entry, dimensions, int(shared_mem), module.memory, flags,
                                             cooperative.BLOCK_ORDERS[block_order], int(seed), slots,
                                             len(self._packer.parameters), module.message_buffer, _MESSAGE_BYTES):
            raise EmulatorError(f"kernel '{self.name}' (module {module.name}): "
                                f"{module.message_buffer.value.decode(errors='replace')}")

    def __repr__(self):
        return f"<emulated kernel {self.name} of {self.module.name}>"


class Module:
    """A compiled .cu text; `poison_shared` and `reverse_threads` may be changed between launches."""

    def __init__(self, source: str, name: str, include_dirs=(), source_dir: Path | None = None,
                 poison_shared: bool = False, reverse_threads: bool = False):
        _runtime()
        self.name = name
        self.poison_shared = poison_shared
        self.reverse_threads = reverse_threads
        self.library_path, kernels, self.compiled = build_module(source, name, include_dirs, source_dir)
        self._library = ctypes.CDLL(str(self.library_path))
        self.memory = ctypes.addressof(ctypes.c_char.in_dll(self._library, "gpumlp_memory"))
        self.message_buffer = ctypes.create_string_buffer(_MESSAGE_BYTES)
        self._declarations = {kernel.name: kernel for kernel in kernels}
        self._kernels = {}

    @property
    def kernel_names(self) -> list[str]:
        return list(self._declarations)

    def get_function(self, name: str) -> Kernel:
        if name not in self._kernels:
            declaration = self._declarations.get(name)
            if declaration is None:
                raise KernelNotFoundError(f"module {self.name} has no kernel '{name}' "
                                          f"(it has: {', '.join(self._declarations) or 'none'})")
            entry = ctypes.cast(getattr(self._library, f"gpumlp_entry_{name}"), ctypes.c_void_p).value
            signature = ctypes.string_at(
                ctypes.addressof(ctypes.c_char.in_dll(self._library, f"gpumlp_signature_{name}"))).decode()
            packer = ArgumentPacker(name, signature, declaration.parameter_names)
            self._kernels[name] = Kernel(self, name, entry, packer)
        return self._kernels[name]


def load_module(path, include_dirs=(), poison_shared: bool = False, reverse_threads: bool = False) -> Module:
    """Compiles (or takes from the cache) the .cu file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found")
    return Module(path.read_text(), path.stem, include_dirs, path.resolve().parent, poison_shared, reverse_threads)


def load_module_source(source_text: str, name: str = "x", include_dirs=(), poison_shared: bool = False,
                       reverse_threads: bool = False) -> Module:
    """Compiles (or takes from the cache) CUDA source text; `name` labels errors and the cache file."""
    return Module(source_text, name, include_dirs, None, poison_shared, reverse_threads)
