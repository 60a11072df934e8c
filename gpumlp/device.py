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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpumlp.errors import UserError


KERNEL_DIR_ENV = "GPUMLP_KERNEL_DIR"


def find_kernel_dir() -> Path:
    """$GPUMLP_KERNEL_DIR when set; else the kernels a non-editable install put inside the package
    (gpumlp/cuda_kernels/, see pyproject.toml); else the checkout's top-level cuda_kernels/ (a
    clone, or an editable install)."""
    override = os.environ.get(KERNEL_DIR_ENV)
    if override:
        return Path(override)
    package_dir = Path(__file__).resolve().parent
    installed = package_dir / "cuda_kernels"
    return installed if installed.is_dir() else package_dir.parent / "cuda_kernels"


KERNEL_DIR = find_kernel_dir()

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

    @staticmethod
    def allow_dynamic_shared(kernel, shared_mem: int) -> None:
        """The opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize; CuPy's and the emulator's
        max_dynamic_shared_size_bytes) that a launch with more than 48 KiB of shared memory needs."""
        if kernel.max_dynamic_shared_size_bytes < shared_mem:
            kernel.max_dynamic_shared_size_bytes = int(shared_mem)

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
    """Runs the unchanged .cu files on the CPU through gpumlp.emulator; arrays are numpy arrays.

    The emulator's checks (gpumlp.emulator) are on as far as they cost little: memcheck (every
    array argument between guard pages: the arrays this device allocates live there, others are
    copied there for each launch; `memcheck=False` saves that in long training runs, never in
    tests), flush_to_zero (as CuPy compiles), the GPU's launch limits, and initcheck:
    `empty` returns NaN (floats) or 0xA5 bytes (other types), so a kernel that reads what nothing
    wrote shows. poison_shared, reverse_threads, block_order and compare_block_orders are the
    emulator's race finders (off by default); block_order_seed seeds the "random" order."""

    name = "CUDA emulator on the CPU"
    is_emulated = True
    xp = np

    # Every byte of what `empty` returns under initcheck, for arrays that are not floating point.
    POISON_BYTE = 0xA5

    def __init__(self, poison_shared: bool = False, reverse_threads: bool = False, memcheck: bool = True,
                 initcheck: bool = True, flush_to_zero: bool = True, block_order: str = "launch",
                 compare_block_orders: bool = False, block_order_seed: int = 0):
        super().__init__()
        self.checks = dict(poison_shared=poison_shared, reverse_threads=reverse_threads, memcheck=memcheck,
                           flush_to_zero=flush_to_zero, block_order=block_order,
                           compare_block_orders=compare_block_orders, block_order_seed=block_order_seed)
        self.initcheck = initcheck

    def _load_module(self, filename):
        from gpumlp import emulator
        return emulator.load_module(KERNEL_DIR / filename, include_dirs=[KERNEL_DIR], **self.checks)

    def _allocate(self, shape, dtype) -> np.ndarray:
        """Under memcheck, in a guarded region of its own, which memcheck checks without copying."""
        if not self.checks["memcheck"]:
            return np.empty(shape, dtype=dtype)
        from gpumlp.emulator import guarded_empty
        return guarded_empty(shape, dtype)

    def asarray(self, host_array, dtype=None):
        """A copy, as an upload to a GPU is."""
        host_array = np.asarray(host_array, dtype=dtype)
        array = self._allocate(host_array.shape, host_array.dtype)
        np.copyto(array, host_array)
        return array

    def zeros(self, shape, dtype=np.float32):
        array = self._allocate(shape, dtype)
        array.fill(0)
        return array

    def empty(self, shape, dtype=np.float32):
        array = self._allocate(shape, dtype)
        if self.initcheck:
            if array.dtype.kind in "fc":
                array.fill(np.nan)
            else:
                array.view(np.uint8).fill(self.POISON_BYTE)
        return array

    def resident_blocks(self, kernel, threads: int, shared_mem: int) -> int:
        """The largest cooperative grid: the nominal device's occupancy rule (registers unknown
        here, so not counted), and no more threads than the emulator runs at once; 0 where the
        shared memory is more than a block may opt in to."""
        from gpumlp.emulator import EmulatorError, cooperative
        try:
            self.allow_dynamic_shared(kernel, shared_mem)
        except EmulatorError:
            return 0
        shared = kernel.module.static_shared_bytes(kernel.name) + int(shared_mem)
        return min(cooperative.resident_block_limit(threads, 0, shared), cooperative.MAX_THREADS // threads)

    def max_dynamic_shared(self, kernel) -> int:
        """The most dynamic shared memory (bytes) one block of `kernel` may opt in to."""
        from gpumlp.emulator import SHARED_BYTES_WITH_OPT_IN
        return SHARED_BYTES_WITH_OPT_IN - kernel.module.static_shared_bytes(kernel.name)

    def launch_cooperative(self, kernel, grid, block, args, shared_mem: int = 0, indirect=()) -> None:
        """Every block resident at once, the blocks in the device's block order between grid
        barriers; `indirect`: the arrays the kernel reaches through addresses in its arguments,
        which memcheck and compare_block_orders then cover too (gpumlp.emulator)."""
        check_kernel_args(kernel.name, args)
        self.allow_dynamic_shared(kernel, shared_mem)
        kernel.launch_cooperative(grid, block, tuple(args), shared_mem=int(shared_mem), indirect=indirect)

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
        self._kernels = {}
        with gpu_setup_errors(f"CUDA device {device_id} could not be set up"):
            import cupy
            self.cupy = cupy
            self.xp = cupy
            cupy.cuda.Device(device_id).use()
            props = cupy.cuda.runtime.getDeviceProperties(device_id)
            self.properties = props
            self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            # Non-blocking: no implicit ordering with the legacy default stream, which CuPy and other
            # libraries may use while a graph is being captured here.
            self.stream = cupy.cuda.Stream(non_blocking=True)
            self.stream.use()

    def _load_module(self, filename):
        # RawModule compiles lazily, at the first get_function (in Device.kernel).
        return self.cupy.RawModule(code=cuda_module_source(filename), options=cuda_compile_options(),
                                   name_expressions=None)

    def kernel(self, filename: str, kernel_name: str):
        """The RawKernel, kept: RawModule.get_function builds a new RawKernel and calls
        cuModuleGetFunction every time, which the ~20 launches of every captured step need not."""
        key = (filename, kernel_name)
        if key not in self._kernels:
            with gpu_setup_errors(f"{filename} could not be compiled and loaded for {self.name}"):
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
            self.allow_dynamic_shared(kernel, shared_mem)
        except driver.CUDADriverError:   # more than a block may opt in to: nothing is resident
            return 0
        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, int(threads), int(shared_mem))
        return int(per_sm) * int(self.properties["multiProcessorCount"])

    def max_dynamic_shared(self, kernel) -> int:
        """The most dynamic shared memory (bytes) one block of `kernel` may opt in to: the device's
        per-block opt-in maximum less the kernel's static shared memory."""
        return int(self.properties["sharedMemPerBlockOptin"]) - int(kernel.shared_size_bytes)

    def launch_cooperative(self, kernel, grid, block, args, shared_mem: int = 0, indirect=()) -> None:
        check_kernel_args(getattr(kernel, "name", "kernel"), args)
        self.allow_dynamic_shared(kernel, shared_mem)
        kernel(tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(args),
               shared_mem=int(shared_mem), stream=self.stream)

    def address(self, array) -> int:
        return int(array.data.ptr)

    def asarray(self, host_array, dtype=None):
        """A device array of its own, filled from `host_array` by a copy queued on our stream.
        Not cupy.asarray or cupy.array(copy=True): with CUPY_ENABLE_UMP=1 on an HMM/ATS system
        both may hand back an array that wraps the host buffer itself (cupy._core.core
        _array_default calls _try_skip_h2d_copy on numpy.array(obj, copy=None), which is `obj`
        when dtype and layout already fit), so a later change to the host array would reach the
        device. ndarray.set always copies into the device allocation."""
        host = np.ascontiguousarray(host_array, dtype=dtype)
        device_array = self.empty(host.shape, host.dtype)
        device_array.set(host, stream=self.stream)
        return device_array

    def zeros(self, shape, dtype=np.float32):
        with self.stream, gpu_setup_errors(f"a {shape} {np.dtype(dtype).name} array could not be allocated on {self.name}"):
            return self.cupy.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype=np.float32):
        with self.stream, gpu_setup_errors(f"a {shape} {np.dtype(dtype).name} array could not be allocated on {self.name}"):
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


class GpuSetupError(UserError):
    """CuPy or CUDA could not set up the GPU, load a kernel or allocate: one line, no traceback."""


@contextmanager
def gpu_setup_errors(what: str):
    """Turns a CuPy/CUDA error raised inside (CuPy's own exception classes, and the RuntimeError,
    MemoryError, OSError or ImportError that CUDA, NVRTC and library loading raise) into a
    GpuSetupError saying `what` failed and why. Anything else is a bug and stays a traceback."""
    try:
        yield
    except Exception as error:
        from_cupy = type(error).__module__.split(".")[0] in ("cupy", "cupy_backends")
        if isinstance(error, UserError) or not (from_cupy or isinstance(error, (RuntimeError, MemoryError, OSError,
                                                                                ImportError))):
            raise
        raise GpuSetupError(f"{what}: {type(error).__name__}: {error}") from error


# A kernel the probe compiles through CuPy (the same RawModule path, headers and all, as the
# trainer's kernels) and runs: each of 32 threads writes 2 * its index + 1.
PROBE_SOURCE = r'''extern "C" __global__ void gpumlp_probe(int* out) { out[threadIdx.x] = 2 * threadIdx.x + 1; }'''
PROBE_THREADS = 32


@dataclass(frozen=True)
class GpuProbe:
    """What probe_gpu found: ok and a description of the GPU, or not ok and one line saying why."""
    ok: bool
    why: str = ""
    description: str = ""


def cuda_version_text(version: int) -> str:
    """CUDA's integer version (13020) as text (13.2); 0 is what the runtime reports for no driver."""
    return f"{version // 1000}.{version % 1000 // 10}"


def toolkit_wheels_command(cuda_major: int) -> str:
    """The NVRTC and CUDA-runtime-header wheels of one CUDA major, which CuPy compiles with."""
    return f"pip install 'cuda-toolkit[cudart,nvrtc]=={cuda_major}.*'"


def probe_gpu(device_id: int = 0) -> GpuProbe:
    """Whether the trainer can use GPU `device_id`, found by doing what it does: import CuPy, check
    the driver against the CUDA that CuPy was built for, create the context, check the GPU's
    architecture against the ones NVRTC compiles for, then compile, launch and check one tiny
    kernel. Never raises."""
    try:
        import cupy
    except ImportError:
        return GpuProbe(False, "CuPy is not installed: pip install 'gpumlp[cuda13]' (NVIDIA driver "
                               "R580 or newer) or 'gpumlp[cuda12]' (R525 or newer)")
    except Exception as error:  # CuPy is there but a CUDA library it needs could not be loaded
        return GpuProbe(False, f"CuPy could not be imported ({type(error).__name__}: {error})")
    runtime = cupy.cuda.runtime
    try:
        driver_version, runtime_version = runtime.driverGetVersion(), runtime.runtimeGetVersion()
    except Exception as error:
        return GpuProbe(False, f"CuPy could not query the CUDA versions ({type(error).__name__}: {error})")
    cuda_major = runtime_version // 1000
    built_for = f"CuPy {cupy.__version__} is built for CUDA {cuda_version_text(runtime_version)}"
    if driver_version == 0:
        return GpuProbe(False, "no NVIDIA driver is installed (the CUDA runtime finds none)")
    if driver_version // 1000 < cuda_major:
        other = (f"; or, to keep this driver: pip uninstall cupy-cuda{cuda_major}x && pip install "
                 f"'gpumlp[cuda{driver_version // 1000}]'" if driver_version // 1000 >= 12 else "")
        return GpuProbe(False, f"the NVIDIA driver supports CUDA {cuda_version_text(driver_version)} "
                               f"but {built_for}: update the driver{other}")
    try:
        count = runtime.getDeviceCount()
    except Exception as error:
        return GpuProbe(False, f"the CUDA runtime could not count the GPUs ({type(error).__name__}: {error})")
    if count <= device_id:
        return GpuProbe(False, f"the NVIDIA driver (CUDA {cuda_version_text(driver_version)}) reports "
                               f"{count} GPU(s), so there is no device {device_id}")
    try:
        props = runtime.getDeviceProperties(device_id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        arch = 10 * int(props["major"]) + int(props["minor"])
    except Exception as error:
        return GpuProbe(False, f"GPU {device_id} could not be queried ({type(error).__name__}: {error})")
    try:
        nvrtc_version = "{}.{}".format(*cupy.cuda.nvrtc.getVersion())
        archs = sorted(cupy.cuda.nvrtc.getSupportedArchs())
        oldest, newest = archs[0], archs[-1]
    except Exception as error:
        return GpuProbe(False, f"NVRTC could not be loaded ({type(error).__name__}: {error}): "
                               f"{toolkit_wheels_command(cuda_major)}")
    gpu = f"{name} (sm_{arch})"
    # Newer than NVRTC's newest: CuPy compiles PTX for that one and the driver translates it.
    if arch not in archs and arch < newest:
        way_out = (f": pip uninstall cupy-cuda{cuda_major}x && pip install 'gpumlp[cuda12]' (NVRTC 12 "
                   f"compiles for sm_50 and newer)" if cuda_major >= 13 and arch >= 50 else "")
        return GpuProbe(False, f"{gpu} is not among the architectures NVRTC {nvrtc_version} compiles for "
                               f"(sm_{oldest} to sm_{newest}){way_out}")
    try:
        with cupy.cuda.Device(device_id):
            stream = cupy.cuda.Stream(non_blocking=True)
            kernel = cupy.RawModule(code=PROBE_SOURCE, options=("-std=c++17",)).get_function("gpumlp_probe")
            with stream:
                out = cupy.zeros(PROBE_THREADS, dtype=np.int32)
            kernel((1,), (PROBE_THREADS,), (out,), stream=stream)
            result = cupy.asnumpy(out, stream=stream)
    except Exception as error:
        hint = f" ({toolkit_wheels_command(cuda_major)})" if "CUDA headers" in str(error) else ""
        return GpuProbe(False, f"a test kernel could not be compiled and run on {gpu}: "
                               f"{type(error).__name__}: {' '.join(str(error).split())}{hint}")
    if not np.array_equal(result, 2 * np.arange(PROBE_THREADS) + 1):
        return GpuProbe(False, f"a test kernel gave wrong results on {gpu}")
    return GpuProbe(True, description=f"{gpu}, driver for CUDA {cuda_version_text(driver_version)}, "
                                      f"{built_for}, NVRTC {nvrtc_version}")


def gpu_unavailable_reason() -> str | None:
    """None when the trainer can use a CUDA GPU (probe_gpu), else one line saying why not."""
    probe = probe_gpu()
    return None if probe.ok else probe.why


def gpu_available() -> bool:
    """True when the trainer can use a CUDA GPU; never raises."""
    return probe_gpu().ok
