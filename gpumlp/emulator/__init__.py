"""CPU emulator for the project's CUDA kernels: compiles the unchanged .cu text with g++ and launches
it with CuPy's RawKernel call form, `kernel(grid, block, args, shared_mem=...)`, on numpy arrays.

Each CUDA thread of a block runs as a fiber, so barriers and warp operations keep their meaning.
Checks, set per Module (and changeable between launches):
  * memcheck (on by default): every array argument lies between guard pages during the launch
    (arrays from guarded_empty always do; others are copied there and back); an out-of-bounds
    read or write raises EmulatorError naming the kernel, argument and index. It guards the
    launch's dynamic shared memory too (ordinary and cooperative launches): the whole pages past
    the `shared_mem` bytes it gives are PROT_NONE, so an access there raises "wrote past (read
    past) the N bytes of dynamic shared memory the launch gives (byte offset K of the dynamic
    shared memory)" with the block and thread; the bytes between `shared_mem` and that page
    boundary hold a fill pattern checked after each block ran (a write there raises the same
    message with the block, after it ran), and a read there sees the pattern: 0xFF bytes (NaN)
    with poison_shared, else the canary 0xA5. With shared_mem=0 any access to it raises (4 KiB
    pages: the buffer is page-aligned). A write of the fill pattern itself into that tail and an
    access before the buffer's start go unseen; memcheck off lifts the guard.
  * flush_to_zero (on by default): subnormal floats count as zero, as CuPy's -ftz=true compiles.
  * launch limits of a GPU: the kernel's __launch_bounds__, 1024 threads, block z <= 64, grid y
    and z <= 65535, static + dynamic shared memory <= 48 KiB without the opt-in attribute.
  * block_order: "launch", "reverse" or "random" (seeded by block_order_seed); with
    compare_block_orders every launch runs in all three on copies of its arrays, which must end
    bit for bit equal.
  * poison_shared (shared memory filled with NaN bytes before each block) and reverse_threads
    (threads of a block run last to first) make missing barriers show up as wrong results.
  * split_barrier: "arrive" (the default) or "wait", where a cooperative launch puts the one grid
    barrier of a split one, `auto token = this_grid().barrier_arrive(); ...;
    this_grid().barrier_wait(std::move(token))` (each half also keeps CUDA's __syncthreads of the
    block; the pair counts as one grid barrier). "arrive": a block that writes what other blocks
    read after its arrive gets results that depend on the block order; "wait": so does a block
    that reads other blocks' writes before its wait.
    A thread's arrive while its last one awaits its wait, a wait without an arrive, and
    this_grid().sync() or the thread's exit while an arrive awaits its wait raise EmulatorError.
Deadlocks and crashes inside a kernel raise EmulatorError instead of hanging or killing Python.
`Kernel.launch_cooperative` runs a cooperative launch: every block resident at once, with
`cooperative_groups::this_grid().sync()` as a grid-wide barrier (gpumlp/emulator/cooperative.py),
under the same checks; its block order applies anew between every two grid barriers, and
`Kernel.grid_barriers` counts the grid barriers the last one passed. Arrays the
kernel reaches through addresses (not arguments) are named in `indirect`: memcheck requires them
to be guarded_empty arrays (their guard pages fault wherever the address came from) and
compare_block_orders restores and compares them like the arguments.
"""
from __future__ import annotations

import ctypes
import struct
import weakref
from pathlib import Path

import numpy as np

from gpumlp.emulator.arguments import ArgumentPacker
from gpumlp.emulator.build import EmulatorError, build_module, build_runtime, static_shared_bytes

__all__ = ["load_module", "load_module_source", "guarded_empty", "EmulatorError", "KernelNotFoundError", "Module",
           "Kernel"]

_MESSAGE_BYTES = 2048
_POISON_SHARED, _REVERSE_THREADS, _FLUSH_TO_ZERO, _MEMCHECK, _COOPERATIVE, _SPLIT_AT_WAIT = 1, 2, 4, 8, 16, 32
_DIMENSIONS = struct.Struct("<6I")
BLOCK_ORDERS = ("launch", "reverse", "random")   # scheduler.c enum block_order, in this order
SPLIT_BARRIERS = ("arrive", "wait")   # which half of barrier_arrive / barrier_wait is the grid barrier

# What a GPU accepts (every NVIDIA GPU since Kepler): threads per block, block and grid extents,
# and the shared memory one block may have without cudaFuncAttributeMaxDynamicSharedMemorySize
# (CuPy: RawKernel.max_dynamic_shared_size_bytes) and with it (H100, H200: 227 KiB).
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
SHARED_BYTES_WITHOUT_OPT_IN = 48 * 1024
SHARED_BYTES_WITH_OPT_IN = 227 * 1024


def _one_of(setting: str, value: str, allowed) -> str:
    """`value` when it is one of `allowed`, else the ValueError naming the setting."""
    if value not in allowed:
        raise ValueError(f"{setting} must be one of {', '.join(allowed)}, got {value!r}")
    return value


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
                                          ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p,
                                          ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        library.gpumlp_guarded_allocate.restype = ctypes.c_void_p
        library.gpumlp_guarded_allocate.argtypes = [ctypes.c_size_t]
        library.gpumlp_guarded_free.restype = None
        library.gpumlp_guarded_free.argtypes = [ctypes.c_void_p]
        library.gpumlp_guarded_holds.restype = ctypes.c_int
        library.gpumlp_guarded_holds.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        library.gpumlp_grid_barriers.restype = ctypes.c_uint64
        library.gpumlp_grid_barriers.argtypes = []
        _runtime_library = library
    return _runtime_library


def guarded_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised (zero) array in a guarded region of its own, ending at a guard page: memcheck
    checks it in place, without the copy it makes of other arrays. Freed with its last view."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    library = _runtime()
    pointer = library.gpumlp_guarded_allocate(nbytes)
    if not pointer:
        raise MemoryError(f"the emulator could not map a guarded array of {nbytes} bytes")
    memory = (ctypes.c_char * nbytes).from_address(pointer)
    weakref.finalize(memory, library.gpumlp_guarded_free, pointer)
    return np.frombuffer(memory, dtype).reshape(shape)


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

    def __init__(self, module: Module, name: str, entry: int, packer: ArgumentPacker, max_threads_per_block: int):
        self.module = module
        self.name = name
        self._entry = entry
        self._packer = packer
        self.max_threads_per_block = max_threads_per_block   # as CuPy's RawKernel attribute
        self._max_dynamic_shared = 0
        self.grid_barriers = 0   # the grid barriers the last cooperative launch passed

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        """The opt-in to more than 48 KiB of shared memory, as CuPy's RawKernel attribute."""
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        limit = SHARED_BYTES_WITH_OPT_IN - self.module.static_shared_bytes(self.name)
        if not 0 <= int(value) <= limit:
            raise EmulatorError(f"kernel '{self.name}': max_dynamic_shared_size_bytes {value} is outside 0..{limit} "
                                f"(227 KiB less the kernel's static shared memory)")
        self._max_dynamic_shared = int(value)

    def _refuse(self, problem: str):
        raise EmulatorError(f"kernel '{self.name}' (module {self.module.name}): invalid launch: {problem}; "
                            f"a GPU refuses it")

    def _check_limits(self, grid, block, shared_mem: int) -> None:
        threads = block[0] * block[1] * block[2]
        if any(b > m for b, m in zip(block, MAX_BLOCK)) or threads > MAX_THREADS_PER_BLOCK:
            self._refuse(f"block {block} has {threads} threads; a block has at most {MAX_THREADS_PER_BLOCK} "
                         f"threads and extents up to {MAX_BLOCK}")
        if threads > self.max_threads_per_block:
            self._refuse(f"block {block} has {threads} threads, more than the kernel's "
                         f"__launch_bounds__({self.max_threads_per_block})")
        if any(g > m for g, m in zip(grid, MAX_GRID)):
            self._refuse(f"grid {grid} exceeds the largest grid {MAX_GRID}")
        static = self.module.static_shared_bytes(self.name)
        limit = max(SHARED_BYTES_WITHOUT_OPT_IN - static, self._max_dynamic_shared)
        if shared_mem > limit:
            self._refuse(f"{shared_mem} bytes of dynamic shared memory + {static} static exceed "
                         f"{SHARED_BYTES_WITHOUT_OPT_IN} bytes and max_dynamic_shared_size_bytes is "
                         f"{self._max_dynamic_shared}")

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        grid, block = _dimensions(grid, "grid"), _dimensions(block, "block")
        shared_mem = int(shared_mem)
        self._check_limits(grid, block, shared_mem)
        self._run(grid, block, args, shared_mem, cooperative=False, indirect=())

    def launch_cooperative(self, grid, block, args, shared_mem: int = 0, registers_per_thread: int = 0,
                           indirect=()) -> None:
        """A cooperative launch (cudaLaunchCooperativeKernel): every block resident at once, so
        that cooperative_groups::this_grid().sync() is a grid-wide barrier. A grid larger than the
        nominal device can hold resident is refused, as a GPU refuses it. The module's block order
        is the order in which the blocks run between two grid barriers ("random": drawn anew for
        each); comparing orders finds a missing grid barrier. `indirect`: the arrays the kernel
        reaches through addresses (see the package docstring)."""
        from gpumlp.emulator import cooperative
        grid, block = _dimensions(grid, "grid"), _dimensions(block, "block")
        shared_mem = int(shared_mem)
        self._check_limits(grid, block, shared_mem)
        blocks, threads = grid[0] * grid[1] * grid[2], block[0] * block[1] * block[2]
        shared = self.module.static_shared_bytes(self.name) + shared_mem
        limit = cooperative.resident_block_limit(threads, int(registers_per_thread), shared)
        if blocks > limit:
            device = cooperative.NOMINAL_DEVICE
            raise EmulatorError(
                f"kernel '{self.name}': a cooperative launch of {blocks} blocks is too large: at most {limit} "
                f"blocks of {threads} threads ({registers_per_thread} registers each, {shared} bytes of shared "
                f"memory) are resident on the {device.name}, {device.sm_count} SMs ({device.arch} limits)")
        indirect = tuple(indirect)
        if self.module.memcheck:
            for index, array in enumerate(indirect):
                if not _runtime().gpumlp_guarded_holds(array.ctypes.data, array.nbytes):
                    raise EmulatorError(f"kernel '{self.name}': indirect array {index} ({array.dtype}, shape "
                                        f"{array.shape}) is not a guarded array: memcheck could not see the "
                                        f"kernel's accesses to it (allocate it with guarded_empty)")
        self._run(grid, block, args, shared_mem, cooperative=True, indirect=indirect)

    def _run(self, grid, block, args, shared_mem: int, cooperative: bool, indirect) -> None:
        slots = self._packer.pack(args)
        module = self.module
        if not module.compare_block_orders:
            self._launch(grid, block, slots, args, shared_mem, module.block_order, cooperative)
            return
        self._launch_in_every_block_order(grid, block, slots, args, shared_mem, cooperative, indirect)

    def _launch(self, grid, block, slots: bytes, args, shared_mem: int, block_order: str,
                cooperative: bool = False) -> None:
        module = self.module
        flags = ((_POISON_SHARED if module.poison_shared else 0) | (_REVERSE_THREADS if module.reverse_threads else 0)
                 | (_FLUSH_TO_ZERO if module.flush_to_zero else 0) | (_MEMCHECK if module.memcheck else 0)
                 | (_COOPERATIVE if cooperative else 0) | (_SPLIT_AT_WAIT if module.split_barrier == "wait" else 0))
        extents = self._packer.extents(args) if module.memcheck else None
        module.launches += 1
        seed = (module.block_order_seed * 0x9E3779B97F4A7C15 + module.launches) % 2**64
        if _runtime().gpumlp_launch(self._entry, _DIMENSIONS.pack(*grid, *block), shared_mem, module.memory, flags,
                                    BLOCK_ORDERS.index(block_order), seed, slots, len(self._packer.parameters),
                                    extents, module.message_buffer, _MESSAGE_BYTES):
            raise EmulatorError(f"kernel '{self.name}' (module {module.name}): "
                                f"{module.message_buffer.value.decode(errors='replace')}")
        if cooperative:
            self.grid_barriers = int(_runtime().gpumlp_grid_barriers())

    def _launch_in_every_block_order(self, grid, block, slots: bytes, args, shared_mem: int,
                                     cooperative: bool = False, indirect=()) -> None:
        """Runs the launch in each block order from the same inputs; the arrays (arguments and
        `indirect` ones) must end equal bit for bit (they then hold that common result), else the
        result depends on the order of blocks."""
        arrays = {}
        for parameter, value in zip(self._packer.parameters, args):
            if parameter.is_pointer:
                arrays.setdefault(id(value), (parameter.name, value))
        for index, array in enumerate(indirect):
            arrays.setdefault(id(array), (f"indirect array {index}", array))
        inputs = {key: array.copy() for key, (_, array) in arrays.items()}
        results = {}
        for order in BLOCK_ORDERS:
            for key, (_, array) in arrays.items():
                np.copyto(array, inputs[key])
            self._launch(grid, block, slots, args, shared_mem, order, cooperative)
            results[order] = {key: array.copy() for key, (_, array) in arrays.items()}
        first = BLOCK_ORDERS[0]
        for order in BLOCK_ORDERS[1:]:
            for key, (name, _) in arrays.items():
                a, b = results[first][key].reshape(-1), results[order][key].reshape(-1)
                width = (a.size, a.itemsize)
                differ = (a.view(np.uint8).reshape(width) != b.view(np.uint8).reshape(width)).any(axis=1)
                if differ.any():
                    index = int(np.argmax(differ))
                    raise EmulatorError(
                        f"kernel '{self.name}' (module {self.module.name}): argument '{name}' differs between "
                        f"{first} and {order} block order in {int(differ.sum())} of {differ.size} elements, "
                        f"first at index {index} ({a[index]} vs {b[index]}): the result depends on the order "
                        f"in which blocks run")

    def __repr__(self):
        return f"<emulated kernel {self.name} of {self.module.name}>"


class Module:
    """A compiled .cu text; the checks (see the package docstring) may be changed between launches."""

    def __init__(self, source: str, name: str, include_dirs=(), source_dir: Path | None = None,
                 poison_shared: bool = False, reverse_threads: bool = False, memcheck: bool = True,
                 flush_to_zero: bool = True, block_order: str = "launch", block_order_seed: int = 0,
                 compare_block_orders: bool = False, split_barrier: str = "arrive"):
        _runtime()
        self.name = name
        self.poison_shared = poison_shared
        self.reverse_threads = reverse_threads
        self.memcheck = memcheck
        self.flush_to_zero = flush_to_zero
        self.block_order = block_order
        self.block_order_seed = block_order_seed
        self.compare_block_orders = compare_block_orders
        self.split_barrier = split_barrier
        self.launches = 0
        self.library_path, kernels, self.compiled = build_module(source, name, include_dirs, source_dir)
        self._library = ctypes.CDLL(str(self.library_path))
        self.memory = ctypes.addressof(ctypes.c_char.in_dll(self._library, "gpumlp_memory"))
        static_begin, static_end = (ctypes.c_void_p.from_address(self.memory + i * ctypes.sizeof(ctypes.c_void_p)).value
                                    for i in (0, 1))
        # All of the module's __shared__ variables (less the section's anchor byte): the bound of
        # any kernel's static shared memory where the symbol table cannot tell which uses which.
        self._all_static_shared = static_end - static_begin - 1
        self._static_shared = static_shared_bytes(self.library_path, [k.name for k in kernels]) or {}
        self.message_buffer = ctypes.create_string_buffer(_MESSAGE_BYTES)
        self._declarations = {kernel.name: kernel for kernel in kernels}
        self._kernels = {}

    @property
    def block_order(self) -> str:
        return self._block_order

    @block_order.setter
    def block_order(self, order: str) -> None:
        self._block_order = _one_of("block_order", order, BLOCK_ORDERS)

    @property
    def split_barrier(self) -> str:
        return self._split_barrier

    @split_barrier.setter
    def split_barrier(self, half: str) -> None:
        self._split_barrier = _one_of("split_barrier", half, SPLIT_BARRIERS)

    def static_shared_bytes(self, kernel: str) -> int:
        return self._static_shared.get(kernel, self._all_static_shared)

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
            max_threads = (ctypes.c_int.in_dll(self._library, f"gpumlp_max_threads_{name}").value
                           if declaration.max_threads_expression is not None else MAX_THREADS_PER_BLOCK)
            self._kernels[name] = Kernel(self, name, entry, packer, max_threads)
        return self._kernels[name]


def load_module(path, include_dirs=(), **checks) -> Module:
    """Compiles (or takes from the cache) the .cu file at `path`; `checks` are Module's keyword
    arguments (memcheck and flush_to_zero on unless switched off)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found")
    return Module(path.read_text(), path.stem, include_dirs, path.resolve().parent, **checks)


def load_module_source(source_text: str, name: str = "x", include_dirs=(), **checks) -> Module:
    """Compiles (or takes from the cache) CUDA source text; `name` labels errors and the cache file."""
    return Module(source_text, name, include_dirs, None, **checks)
