"""Where the CUDA kernels run: a real GPU through CuPy, or the CPU emulator running the same .cu text.

Both devices load a file of `cuda_kernels/` as a module, launch its kernels with CuPy's call form
`kernel(grid, block, args, shared_mem=...)`, and can record a sequence of launches once and replay
it (a CUDA graph on the GPU, a recorded launch list in the emulator), so the trainer has one code
path for both.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(os.environ.get("GPUMLP_KERNEL_DIR", Path(__file__).resolve().parent.parent / "cuda_kernels"))

# Scalar types a kernel parameter may receive; anything else that is not an array is refused.
KERNEL_SCALAR_TYPES = (np.int32, np.uint32, np.float32, np.uint64, np.int64)


class KernelArgumentError(TypeError):
    """A kernel was launched with an argument whose C type would be wrong."""


def check_kernel_args(kernel_name: str, args) -> None:
    """Refuse bare Python scalars: CuPy sends an int as long long and a float as double, so a
    Python float reaching a `float` parameter is silently wrong."""
    for position, arg in enumerate(args):
        if isinstance(arg, np.generic):
            if not isinstance(arg, KERNEL_SCALAR_TYPES):
                raise KernelArgumentError(
                    f"{kernel_name}: argument {position} is a {type(arg).__name__}; "
                    f"kernel scalars must be numpy.int32 or numpy.float32")
        elif isinstance(arg, (bool, int, float, complex)):
            raise KernelArgumentError(
                f"{kernel_name}: argument {position} is a bare Python {type(arg).__name__} ({arg!r}); "
                f"wrap it as numpy.int32 or numpy.float32 (CuPy would pass it as a 64-bit value)")


def check_array(kernel: str, name: str, array, size: int | tuple, dtype=np.float32) -> None:
    """What a launcher checks before passing `array` to `kernel`: dtype, C order, and `size`, an
    exact shape (tuple) or an element count (int: any shape with that many)."""
    if array.dtype != np.dtype(dtype):
        raise ValueError(f"{kernel}: {name} must be {np.dtype(dtype).name}, got {array.dtype}")
    if isinstance(size, tuple):
        if tuple(array.shape) != size:
            raise ValueError(f"{kernel}: {name} must have shape {size}, got {tuple(array.shape)}")
    elif int(array.size) != size:
        raise ValueError(f"{kernel}: {name} must have {size} elements, got shape {tuple(array.shape)}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{kernel}: {name} must be C-contiguous")


def kernel_source(filename: str) -> str:
    path = KERNEL_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found (set GPUMLP_KERNEL_DIR?)")
    return path.read_text()


# The NVRTC options of CudaDevice's RawModule. CuPy adds its own to them: its include paths first,
# then -ftz=true, -arch=sm_XY for the device and --device-as-default-execution-space
# (cupy._core.core.compile_with_cache and cupy.cuda.compiler._compile_with_cache_cuda).
def cuda_compile_options() -> tuple[str, ...]:
    return ("-std=c++17", f"-I{KERNEL_DIR}")


def cuda_module_source(filename: str) -> str:
    """The text CudaDevice hands to RawModule: the file, plus a trailing comment naming a digest of
    the headers of KERNEL_DIR. CuPy's on-disk kernel cache (~/.cupy/kernel_cache) is keyed by the
    source text and options only, not by the files it #includes, so without the digest an edited
    philox.cuh would load the cubin compiled from the old one. A comment at the end leaves every
    line number of compiler messages unchanged."""
    digest = hashlib.sha256()
    for header in sorted(KERNEL_DIR.glob("*.cuh")) + sorted(KERNEL_DIR.glob("*.h")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    return kernel_source(filename) + f"\n// gpumlp: headers sha256 {digest.hexdigest()}\n"


class Device:
    """Common interface; see CudaDevice and EmulatedDevice."""

    name = "device"
    is_emulated = False
    xp = np

    def __init__(self):
        self._modules = {}
        self._recording = None

    # -- kernels ---------------------------------------------------------------------------------
    def kernel(self, filename: str, kernel_name: str):
        if filename not in self._modules:
            self._modules[filename] = self._load_module(filename)
        return self._modules[filename].get_function(kernel_name)

    def launch(self, kernel, grid, block, args, shared_mem: int = 0) -> None:
        check_kernel_args(getattr(kernel, "name", "kernel"), args)
        grid = tuple(int(g) for g in grid)
        block = tuple(int(b) for b in block)
        if self._recording is not None and self.is_emulated:
            self._recording.append((kernel, grid, block, tuple(args), int(shared_mem)))
            return
        kernel(grid, block, tuple(args), shared_mem=int(shared_mem))

    # -- cooperative launches (the persistent engine) -----------------------------------------
    def cooperative_kernel(self, filename: str, kernel_name: str):
        """The kernel, loaded so that it can be launched cooperatively."""
        return self.kernel(filename, kernel_name)

    # -- memory ----------------------------------------------------------------------------------
    def asarray(self, host_array, dtype=None):
        return self.xp.asarray(np.ascontiguousarray(host_array, dtype=dtype))

    def address(self, array) -> int:
        """The device address of an array's data, for tables of pointers a kernel reads."""
        return int(array.ctypes.data)

    def to_host(self, array) -> np.ndarray:
        """An independent host copy (later launches never change it)."""
        return np.array(array, copy=True)

    def zeros(self, shape, dtype=np.float32):
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype=np.float32):
        return self.xp.empty(shape, dtype=dtype)

    def synchronize(self) -> None:
        pass

    def on_stream(self):
        """Context in which array operations made directly on the device's arrays (fill, item
        assignment) go to the device's stream; nothing to do off the GPU."""
        return nullcontext()

    def describe(self) -> dict:
        return {"name": self.name, "emulated": self.is_emulated}

    def supports_cooperative_launch(self) -> bool:
        return self.is_emulated


class Graph:
    """A recorded launch sequence: `replay()` runs it again with the same arguments."""

    def __init__(self, device: Device, launches=None, cuda_graph=None, stream=None):
        self.device = device
        self.launches = launches
        self.cuda_graph = cuda_graph
        self.stream = stream

    def replay(self) -> None:
        if self.cuda_graph is not None:
            self.cuda_graph.launch(self.stream)
            return
        for kernel, grid, block, args, shared_mem in self.launches:
            kernel(grid, block, args, shared_mem=shared_mem)


class EmulatedDevice(Device):
    """Runs the unchanged .cu files on the CPU through gpumlp.emulator; arrays are numpy arrays."""

    name = "CUDA emulator on the CPU"
    is_emulated = True
    xp = np

    def __init__(self, poison_shared: bool = False, reverse_threads: bool = False):
        super().__init__()
        self.poison_shared = poison_shared
        self.reverse_threads = reverse_threads

    def _load_module(self, filename):
        from gpumlp import emulator
        return emulator.load_module(KERNEL_DIR / filename, include_dirs=[KERNEL_DIR],
                                    poison_shared=self.poison_shared,
                                    reverse_threads=self.reverse_threads)

    def resident_blocks(self, kernel, threads: int, shared_mem: int) -> int:
        """The largest cooperative grid: the nominal device's occupancy rule (registers unknown
        here, so not counted), and no more threads than the emulator runs at once."""
        from gpumlp.emulator import cooperative
        shared = cooperative.static_shared_bytes(kernel.module) + int(shared_mem)
        return min(cooperative.resident_block_limit(threads, 0, shared), cooperative.MAX_THREADS // threads)

    def launch_cooperative(self, kernel, grid, block, args, shared_mem: int = 0, block_order: str = "launch",
                           seed: int = 0) -> None:
        """Every block resident at once; `block_order` ("launch", "reversed", "shuffled") is the
        order the blocks run in between grid barriers."""
        check_kernel_args(kernel.name, args)
        kernel.launch_cooperative(grid, block, tuple(args), shared_mem=int(shared_mem), block_order=block_order,
                                  seed=seed)

    @contextmanager
    def capture(self):
        """Record the launches made inside the block into a Graph instead of running them."""
        graph = Graph(self, launches=[])
        self._recording = graph.launches
        try:
            yield graph
        finally:
            self._recording = None


class CudaDevice(Device):
    """A real NVIDIA GPU through CuPy's RawModule (NVRTC compiles the sources at first use).

    All the work goes to one non-blocking stream, named explicitly at every launch, copy and
    allocation rather than left to CuPy's current stream (a per-thread setting that another
    CudaDevice, or another thread, would change): work on the legacy default stream is not ordered
    with a non-blocking stream, so a fill there could race a graph replayed here."""

    is_emulated = False

    def __init__(self, device_id: int = 0):
        super().__init__()
        import cupy
        self.cupy = cupy
        self.xp = cupy
        self._kernels = {}
        cupy.cuda.Device(device_id).use()
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        self.properties = props
        self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        # Non-blocking: no implicit ordering with the legacy default stream, which CuPy and other
        # libraries may use while a graph is being captured here.
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.stream.use()

    def _load_module(self, filename):
        return self.cupy.RawModule(code=cuda_module_source(filename), options=cuda_compile_options(),
                                   name_expressions=None)

    def kernel(self, filename: str, kernel_name: str):
        """The RawKernel, kept: RawModule.get_function builds a new RawKernel and calls
        cuModuleGetFunction every time, which the ~20 launches of every captured step need not."""
        key = (filename, kernel_name)
        if key not in self._kernels:
            self._kernels[key] = super().kernel(filename, kernel_name)
        return self._kernels[key]

    def launch(self, kernel, grid, block, args, shared_mem: int = 0) -> None:
        check_kernel_args(getattr(kernel, "name", "kernel"), args)
        kernel(tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(args),
               shared_mem=int(shared_mem), stream=self.stream)

    def on_stream(self):
        return self.stream

    # Unverified: no line of the cooperative path has run on a GPU.
    def cooperative_kernel(self, filename: str, kernel_name: str):
        """A RawKernel of a module compiled with enable_cooperative_groups, which CuPy launches
        with cuLaunchCooperativeKernel."""
        key = ("cooperative", filename, kernel_name)
        if key not in self._kernels:
            module = self.cupy.RawModule(code=cuda_module_source(filename), options=cuda_compile_options(),
                                         enable_cooperative_groups=True)
            self._kernels[key] = module.get_function(kernel_name)
        return self._kernels[key]

    def supports_cooperative_launch(self) -> bool:
        runtime = self.cupy.cuda.runtime
        return bool(runtime.deviceGetAttribute(runtime.cudaDevAttrCooperativeLaunch, self.cupy.cuda.Device().id))

    def resident_blocks(self, kernel, threads: int, shared_mem: int) -> int:
        """The largest cooperative grid: resident blocks per SM from the occupancy API x SMs."""
        from cupy_backends.cuda.api import driver
        try:
            self._allow_dynamic_shared(kernel, shared_mem)
        except driver.CUDADriverError:   # more than a block may opt in to: nothing is resident
            return 0
        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, int(threads), int(shared_mem))
        return int(per_sm) * int(self.properties["multiProcessorCount"])

    @staticmethod
    def _allow_dynamic_shared(kernel, shared_mem: int) -> None:
        if shared_mem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared_mem:
            kernel.max_dynamic_shared_size_bytes = int(shared_mem)

    def launch_cooperative(self, kernel, grid, block, args, shared_mem: int = 0, block_order: str = "launch",
                           seed: int = 0) -> None:
        check_kernel_args(getattr(kernel, "name", "kernel"), args)
        self._allow_dynamic_shared(kernel, shared_mem)
        kernel(tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(args),
               shared_mem=int(shared_mem), stream=self.stream)

    def address(self, array) -> int:
        return int(array.data.ptr)

    def asarray(self, host_array, dtype=None):
        # cupy.array with copy=True: always a device copy (cupy.asarray may wrap host memory when
        # CUPY_ENABLE_UMP=1 on HMM/ATS systems). The copy is queued on our stream.
        with self.stream:
            return self.cupy.array(np.ascontiguousarray(host_array, dtype=dtype), copy=True)

    def zeros(self, shape, dtype=np.float32):
        with self.stream:
            return self.cupy.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype=np.float32):
        with self.stream:
            return self.cupy.empty(shape, dtype=dtype)

    def to_host(self, array) -> np.ndarray:
        # Queued on our stream and waited for (blocking=True): it sees every launch before it.
        return self.cupy.asnumpy(array, stream=self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    @contextmanager
    def capture(self):
        """Capture the launches made inside the block into a CUDA graph (CuPy stream capture, in
        CuPy's default relaxed mode). Only kernel launches may happen inside: no module load, no
        allocation, no copy, no synchronisation."""
        graph = Graph(self, stream=self.stream)
        self.stream.begin_capture()
        try:
            yield graph
        except BaseException:
            try:  # leave the stream out of capture mode; the error inside is the one to report
                self.stream.end_capture()
            except Exception:
                pass
            raise
        graph.cuda_graph = self.stream.end_capture()

    def describe(self) -> dict:
        major, minor = self.properties["major"], self.properties["minor"]
        return {"name": self.name, "emulated": False, "compute_capability": f"{major}.{minor}",
                "memory_bytes": int(self.properties["totalGlobalMem"])}


def gpu_unavailable_reason() -> str | None:
    """None when CuPy can reach a CUDA GPU, else one line saying why not (no CuPy, no driver, a
    driver older than CuPy's CUDA -- cupy-cuda13x needs an R580+ driver --, or no device)."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a CUDA library CuPy could not load
        return f"CuPy could not be imported ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError: no driver, or one too old for CuPy's runtime
        return f"CuPy found no usable CUDA driver ({error})"
    return None if count > 0 else "the CUDA driver reports no device"


def gpu_available() -> bool:
    """True when CuPy can reach a CUDA GPU; never raises (no CuPy, no driver, or no device: all
    mean "no GPU here")."""
    return gpu_unavailable_reason() is None
