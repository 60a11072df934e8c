"""Where the CUDA kernels run: a real GPU through CuPy, or the CPU emulator running the same .cu text.

Both devices load a file of `cuda_kernels/` as a module, launch its kernels with CuPy's call form
`kernel(grid, block, args, shared_mem=...)`, and can record a sequence of launches once and replay
it (a CUDA graph on the GPU, a recorded launch list in the emulator), so the trainer has one code
path for both.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
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


def kernel_source(filename: str) -> str:
    path = KERNEL_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found (set GPUMLP_KERNEL_DIR?)")
    return path.read_text()


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

    # -- memory ----------------------------------------------------------------------------------
    def asarray(self, host_array, dtype=None):
        return self.xp.asarray(np.ascontiguousarray(host_array, dtype=dtype))

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    def zeros(self, shape, dtype=np.float32):
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype=np.float32):
        return self.xp.empty(shape, dtype=dtype)

    def synchronize(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "emulated": self.is_emulated}


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

    name = "emulator"
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
    """A real NVIDIA GPU through CuPy's RawModule (NVRTC compiles the sources at first use)."""

    is_emulated = False

    def __init__(self, device_id: int = 0):
        super().__init__()
        import cupy
        self.cupy = cupy
        self.xp = cupy
        cupy.cuda.Device(device_id).use()
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        self.properties = props
        self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.stream.use()

    def _load_module(self, filename):
        return self.cupy.RawModule(code=kernel_source(filename),
                                   options=("-std=c++17", f"-I{KERNEL_DIR}"),
                                   name_expressions=None)

    def to_host(self, array) -> np.ndarray:
        return self.cupy.asnumpy(array)

    def synchronize(self) -> None:
        self.stream.synchronize()

    @contextmanager
    def capture(self):
        """Capture the launches made inside the block into a CUDA graph (CuPy stream capture)."""
        graph = Graph(self, stream=self.stream)
        self.stream.begin_capture()
        try:
            yield graph
        finally:
            graph.cuda_graph = self.stream.end_capture()

    def describe(self) -> dict:
        major, minor = self.properties["major"], self.properties["minor"]
        return {"name": self.name, "emulated": False, "compute_capability": f"{major}.{minor}",
                "memory_bytes": int(self.properties["totalGlobalMem"])}


def gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, or no device: all mean "no GPU here"
        return False
