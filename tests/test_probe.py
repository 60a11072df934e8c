"""gpumlp.device.probe_gpu, the choice of device, CuPy set-up errors and uploads, without a GPU.

Every branch of the probe runs against a fake `cupy` (FakeCupy: the few pieces the probe and
CudaDevice call, each of which a test can make fail), and once against the real CuPy of this
machine, which has no NVIDIA driver."""
import importlib.abc
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpumlp import cli
from gpumlp import device as device_module
from gpumlp.commands import run_command
from gpumlp.device import CudaDevice, GpuSetupError, probe_gpu
from gpumlp.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
NVRTC_13_ARCHS = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)  # what NVRTC 13.x reports


class FakeDeviceArray:
    """A device allocation as CuPy's ndarray has it: its own memory, filled only by set()."""

    def __init__(self, shape, dtype):
        self.memory = np.full(shape, -7, dtype=dtype)
        self.shape, self.dtype = self.memory.shape, self.memory.dtype
        self.set_calls = []

    def set(self, host, stream=None):
        assert host.dtype == self.dtype and host.shape == self.shape
        self.memory[...] = host
        self.set_calls.append(stream)


class FakeCupy(SimpleNamespace):
    """What the probe and CudaDevice use of CuPy: a working H100 with a CUDA 13 driver, unless a
    test changes a piece."""

    def __init__(self, **changes):
        runtime = SimpleNamespace(driverGetVersion=lambda: 13000, runtimeGetVersion=lambda: 13020,
                                  getDeviceCount=lambda: 1,
                                  getDeviceProperties=lambda i: {"name": b"NVIDIA H100", "major": 9, "minor": 0,
                                                                 "totalGlobalMem": 80 << 30})
        nvrtc = SimpleNamespace(getVersion=lambda: (13, 5), getSupportedArchs=lambda: NVRTC_13_ARCHS)
        cuda = SimpleNamespace(runtime=runtime, nvrtc=nvrtc, Device=FakeContext, Stream=FakeContext)
        super().__init__(__version__="14.2.0", cuda=cuda, RawModule=FakeRawModule, zeros=np.zeros,
                         empty=FakeDeviceArray, asnumpy=lambda array, stream=None: np.array(array))
        self.kernel_writes = lambda out: out.__setitem__(slice(None), 2 * np.arange(out.size) + 1)
        for name, value in changes.items():
            setattr(self, name, value)

    # CuPy's module-level functions that would wrap host memory under CUPY_ENABLE_UMP=1
    def asarray(self, *args, **kwargs):
        raise AssertionError("cupy.asarray may wrap host memory")

    def array(self, *args, **kwargs):
        raise AssertionError("cupy.array may wrap host memory")


class FakeContext:
    """cupy.cuda.Device(i) and cupy.cuda.Stream(): used, or entered as a context."""

    def __init__(self, *args, **kwargs):
        pass

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeRawModule:
    """Compiles nothing; its kernel runs `fake.kernel_writes(out)` of the installed FakeCupy."""

    def __init__(self, code, options=(), name_expressions=None):
        self.code = code

    def get_function(self, name):
        fake = sys.modules["cupy"]
        return lambda grid, block, args, stream=None, shared_mem=0: fake.kernel_writes(args[0])


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def raises(error):
    def call(*args, **kwargs):
        raise error
    return call


# -- every branch of the probe ---------------------------------------------------------------------

def test_a_working_gpu_passes_and_is_described(fake_cupy):
    probe = probe_gpu()
    assert probe.ok and probe.why == ""
    assert probe.description == ("NVIDIA H100 (sm_90), driver for CUDA 13.0, CuPy 14.2.0 is built for CUDA 13.2, "
                                 "NVRTC 13.5")


def test_no_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    probe = probe_gpu()
    assert not probe.ok and probe.why.startswith("CuPy is not installed: pip install 'gpumlp[cuda13]'")


def test_a_cupy_that_fails_to_import_says_why(monkeypatch):
    class BrokenCupy(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name == "cupy" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenCupy(), *sys.meta_path])
    probe = probe_gpu()
    assert not probe.ok
    assert probe.why == "CuPy could not be imported (OSError: libcuda.so.1: cannot open shared object file)"


def test_no_driver_says_so_and_not_that_it_is_too_old(fake_cupy):
    fake_cupy.cuda.runtime.driverGetVersion = lambda: 0  # what CUDA reports when no driver is installed
    fake_cupy.cuda.runtime.getDeviceCount = raises(RuntimeError("cudaErrorInsufficientDriver: CUDA driver "
                                                                "version is insufficient for CUDA runtime version"))
    probe = probe_gpu()
    assert not probe.ok and probe.why == "no NVIDIA driver is installed (the CUDA runtime finds none)"
    assert "insufficient" not in probe.why and "install gpumlp" not in probe.why


def test_a_cuda_12_driver_under_cupy_for_cuda_13_names_both_ways_out(fake_cupy):
    fake_cupy.cuda.runtime.driverGetVersion = lambda: 12080
    probe = probe_gpu()
    assert not probe.ok
    assert probe.why == ("the NVIDIA driver supports CUDA 12.8 but CuPy 14.2.0 is built for CUDA 13.2: update the "
                         "driver; or, to keep this driver: pip uninstall cupy-cuda13x && pip install 'gpumlp[cuda12]'")


def test_a_cuda_11_driver_only_needs_updating(fake_cupy):
    fake_cupy.cuda.runtime.driverGetVersion = lambda: 11080
    fake_cupy.cuda.runtime.runtimeGetVersion = lambda: 12090
    probe = probe_gpu()
    assert not probe.ok and probe.why.endswith("CuPy 14.2.0 is built for CUDA 12.9: update the driver")


def test_a_driver_that_cannot_count_gpus_says_why(fake_cupy):
    fake_cupy.cuda.runtime.getDeviceCount = raises(RuntimeError("cudaErrorNoDevice: no CUDA-capable device"))
    probe = probe_gpu()
    assert not probe.ok and "could not count the GPUs (RuntimeError: cudaErrorNoDevice" in probe.why


def test_a_driver_without_gpus_says_so(fake_cupy):
    fake_cupy.cuda.runtime.getDeviceCount = lambda: 0
    probe = probe_gpu()
    assert not probe.ok and probe.why == "the NVIDIA driver (CUDA 13.0) reports 0 GPU(s), so there is no device 0"


def test_a_gpu_that_cannot_be_queried_says_why(fake_cupy):
    fake_cupy.cuda.runtime.getDeviceProperties = raises(RuntimeError("cudaErrorDevicesUnavailable"))
    probe = probe_gpu()
    assert not probe.ok and probe.why == "GPU 0 could not be queried (RuntimeError: cudaErrorDevicesUnavailable)"


def test_missing_nvrtc_names_the_wheels_of_cupys_cuda(fake_cupy):
    fake_cupy.cuda.nvrtc.getVersion = raises(RuntimeError("libnvrtc.so.13 not found"))
    probe = probe_gpu()
    assert not probe.ok
    assert probe.why == ("NVRTC could not be loaded (RuntimeError: libnvrtc.so.13 not found): "
                         "pip install 'cuda-toolkit[cudart,nvrtc]==13.*'")


def test_an_architecture_nvrtc_no_longer_compiles_for_is_refused(fake_cupy):
    fake_cupy.cuda.runtime.getDeviceProperties = lambda i: {"name": "Tesla V100", "major": 7, "minor": 0}
    probe = probe_gpu()
    assert not probe.ok
    assert probe.why == ("Tesla V100 (sm_70) is not among the architectures NVRTC 13.5 compiles for (sm_75 to "
                         "sm_121): pip uninstall cupy-cuda13x && pip install 'gpumlp[cuda12]' (NVRTC 12 compiles "
                         "for sm_50 and newer)")
    fake_cupy.cuda.runtime.getDeviceProperties = lambda i: {"name": "Tesla K80", "major": 3, "minor": 7}
    fake_cupy.cuda.runtime.runtimeGetVersion = lambda: 12090
    fake_cupy.cuda.nvrtc.getVersion = lambda: (12, 9)
    fake_cupy.cuda.nvrtc.getSupportedArchs = lambda: (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90)
    assert probe_gpu().why == ("Tesla K80 (sm_37) is not among the architectures NVRTC 12.9 compiles for "
                               "(sm_50 to sm_90)")


def test_an_architecture_newer_than_nvrtc_knows_goes_on_to_the_test_kernel(fake_cupy):
    """CuPy compiles PTX for NVRTC's newest architecture there, which the driver translates."""
    fake_cupy.cuda.runtime.getDeviceProperties = lambda i: {"name": "Future GPU", "major": 13, "minor": 0}
    assert probe_gpu().ok
    fake_cupy.kernel_writes = raises(RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU"))
    probe = probe_gpu()
    assert not probe.ok and "Future GPU (sm_130): RuntimeError: CUDA_ERROR_NO_BINARY_FOR_GPU" in probe.why


def test_missing_cuda_headers_name_the_wheels_to_install(fake_cupy):
    message = ("Failed to find CUDA headers. Please install CUDA toolkit headers (e.g., pip install "
               "cupy-cuda12x[ctk]) or specify CUDA_PATH environment variable.")
    fake_cupy.RawModule = raises(RuntimeError(message))
    probe = probe_gpu()
    assert not probe.ok
    assert probe.why == (f"a test kernel could not be compiled and run on NVIDIA H100 (sm_90): RuntimeError: "
                         f"{message} (pip install 'cuda-toolkit[cudart,nvrtc]==13.*')")


def test_a_kernel_that_fails_to_launch_is_one_line(fake_cupy):
    fake_cupy.kernel_writes = raises(RuntimeError("CUDA_ERROR_LAUNCH_FAILED:\nunspecified launch failure"))
    probe = probe_gpu()
    assert not probe.ok and "\n" not in probe.why
    assert probe.why.endswith("RuntimeError: CUDA_ERROR_LAUNCH_FAILED: unspecified launch failure")


def test_a_kernel_that_computes_wrongly_is_refused(fake_cupy):
    fake_cupy.kernel_writes = lambda out: out.__setitem__(slice(None), 1)
    probe = probe_gpu()
    assert not probe.ok and probe.why == "a test kernel gave wrong results on NVIDIA H100 (sm_90)"


def test_the_real_cupy_here_finds_no_driver():
    pytest.importorskip("cupy")
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver")
    probe = probe_gpu()
    assert not probe.ok and probe.why == "no NVIDIA driver is installed (the CUDA runtime finds none)"
    assert device_module.gpu_unavailable_reason() == probe.why and device_module.gpu_available() is False
    lines = []
    assert cli.choose_device("auto", lines.append) is None
    assert lines == [f"no usable CUDA GPU ({probe.why}): training with the numpy reference on the CPU instead "
                     f"(--device cpu)"]


# -- choosing the device ---------------------------------------------------------------------------

def test_auto_falls_back_to_the_cpu_in_one_line_saying_why(fake_cupy):
    fake_cupy.cuda.runtime.driverGetVersion = lambda: 0
    lines = []
    assert cli.choose_device("auto", lines.append) is None
    assert lines == ["no usable CUDA GPU (no NVIDIA driver is installed (the CUDA runtime finds none)): training "
                     "with the numpy reference on the CPU instead (--device cpu)"]


def test_device_cuda_without_a_usable_gpu_is_a_user_error(fake_cupy):
    fake_cupy.cuda.runtime.getDeviceProperties = lambda i: {"name": "Tesla V100", "major": 7, "minor": 0}
    with pytest.raises(UserError, match=r"^--device cuda: no usable CUDA GPU: Tesla V100 \(sm_70\)"):
        cli.choose_device("cuda", print)


def test_a_usable_gpu_is_chosen_and_described(fake_cupy):
    lines = []
    chosen = cli.choose_device("auto", lines.append)
    assert isinstance(chosen, CudaDevice) and chosen.name == "NVIDIA H100"
    assert lines == [f"GPU: {probe_gpu().description}"]


def test_device_cuda_on_this_machine_is_one_error_line_and_exit_2(tmp_path):
    pytest.importorskip("cupy")
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver")
    result = subprocess.run([sys.executable, "-m", "gpumlp", "--device", "cuda", "--hidden", "4", "--epochs", "1",
                             "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: --device cuda: no usable CUDA GPU: no NVIDIA driver is installed "
                             "(the CUDA runtime finds none)\n")


# -- CuPy set-up errors and uploads on the CudaDevice ----------------------------------------------

def test_a_cupy_error_setting_up_the_device_is_one_error_line(fake_cupy, capsys):
    fake_cupy.cuda.runtime.getDeviceProperties = raises(RuntimeError("cudaErrorDevicesUnavailable:\nbusy"))
    assert run_command(CudaDevice) == 2
    assert capsys.readouterr().err == ("error: CUDA device 0 could not be set up: RuntimeError: "
                                       "cudaErrorDevicesUnavailable: busy\n")


def test_a_kernel_that_does_not_compile_is_a_setup_error_naming_the_file(fake_cupy):
    device = CudaDevice()
    fake_cupy.RawModule = raises(RuntimeError("NVRTC_ERROR_COMPILATION"))
    with pytest.raises(GpuSetupError, match=r"^deform\.cu could not be compiled and loaded for NVIDIA H100: "
                                            r"RuntimeError: NVRTC_ERROR_COMPILATION$"):
        device.kernel("deform.cu", "deform_images")


def test_an_allocation_that_fails_is_a_setup_error(fake_cupy):
    device = CudaDevice()
    fake_cupy.empty = raises(MemoryError("Out of memory allocating 4,000,000,000 bytes"))
    with pytest.raises(GpuSetupError, match=r"^a \(1000, 1000000\) float32 array could not be allocated on NVIDIA H100: "
                                            r"MemoryError: Out of memory"):
        device.empty((1000, 1_000_000))


def test_uploads_copy_into_a_device_allocation_on_the_stream(fake_cupy):
    """Never cupy.asarray / cupy.array (FakeCupy refuses both): an allocation of its own, filled by
    ndarray.set on the device's stream, so changing the host array afterwards changes nothing."""
    device = CudaDevice()
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    uploaded = device.asarray(host, dtype=np.float32)
    assert uploaded.set_calls == [device.stream]
    host[...] = -1
    np.testing.assert_array_equal(uploaded.memory, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert uploaded.dtype == np.float32


def test_gpu_setup_errors_leave_user_errors_and_bugs_alone():
    with pytest.raises(UserError, match="^bad flag$") as caught:
        with device_module.gpu_setup_errors("never shown"):
            raise UserError("bad flag")
    assert type(caught.value) is UserError
    with pytest.raises(TypeError, match="^a bug$"):  # a traceback, not an `error:` line that hides it
        with device_module.gpu_setup_errors("never shown"):
            raise TypeError("a bug")


def test_a_cupy_exception_class_is_a_setup_error():
    compiler = pytest.importorskip("cupy.cuda.compiler")
    with pytest.raises(GpuSetupError, match=r"^loading: CompileException: "):
        with device_module.gpu_setup_errors("loading"):
            raise compiler.CompileException("error: identifier undeclared", "source", "name", (), "nvrtc")
