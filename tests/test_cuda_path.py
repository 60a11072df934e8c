"""The CuPy path (CudaDevice, and DeviceTrainer on it) checked as far as it can be without a GPU,
and on a GPU where there is one.

Without a GPU: `gpu_available()` says no without raising (every branch of the probe behind it:
tests/test_probe.py); every kernel file goes through CuPy's own RawModule compile path
(cupy._core.core.compile_with_cache -> NVRTC) with the options CudaDevice gives it, for an H100
(sm_90), down to the cubin the driver would load -- only the load itself (cuModuleLoadData) is
left out, and tests/test_install.py runs these compiles again with the system CUDA toolkit hidden;
and the trainer's capture regions only launch kernels (nothing that CUDA stream capture refuses:
module loads, allocations, copies, synchronisation).

With a GPU (`-m gpu`): a captured graph replays, a failed capture leaves the stream usable, and
one small epoch on the GPU matches the same epoch on the CPU emulator.
"""
import os
import re
import types
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import make_synthetic_mnist
from gpumlp import device as device_module
from gpumlp import nets, ops_mlp
from gpumlp.config import TrainConfig
from gpumlp.device import (CudaDevice, EmulatedDevice, cuda_compile_options, cuda_module_source, gpu_available,
                           gpu_unavailable_reason)
from gpumlp.train_gpu import DeviceTrainer
from gpumlp.training import epoch_order, make_split

# Every entry function each file must provide (the launchers look them up by these names).
KERNEL_FILES = {**ops_mlp.KERNELS, "deform.cu": ("deform_images", "philox_fill")}
H100_ARCH = "90"

needs_gpu = pytest.mark.skipif(not gpu_available(), reason=f"needs an NVIDIA GPU: {gpu_unavailable_reason()}")


# -- (a) no GPU: gpu_available says so, never raises -------------------------------------------------

def test_gpu_available_answers_without_raising():
    available = gpu_available()
    assert isinstance(available, bool)
    assert available == (gpu_unavailable_reason() is None)
    if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver on this machine
        assert available is False
        assert gpu_unavailable_reason()


# -- (b) CuPy's own compile path, for an H100, without a GPU -----------------------------------------

@pytest.fixture
def cupy_compile(monkeypatch):
    """compile(filename, arch) -> (cubin, NVRTC options): the RawModule that CudaDevice builds for
    the file, compiled by the very call CuPy makes for it (cupy._core.raw._get_raw_module ->
    cupy._core.core.compile_with_cache), with three things changed so that no GPU is needed:
    the architecture is given instead of read from the device; CuPy's arch-option helper runs
    unmemoized (its memo is keyed by the current device); and the final cuModuleLoadData is
    replaced by keeping the cubin. CUPY_CACHE_IN_MEMORY keeps ~/.cupy/kernel_cache out of it, so
    NVRTC really runs."""
    cupy = pytest.importorskip("cupy")
    from cupy._core import core
    from cupy.cuda import compiler, function

    arch_options = getattr(compiler._get_arch_for_options_for_nvrtc, "__wrapped__", None)
    if arch_options is None:
        pytest.skip("this CuPy's _get_arch_for_options_for_nvrtc has no __wrapped__")
    cubins, nvrtc_options = [], []

    class KeepCubin(function.Module):
        def load(self, cubin):  # the driver's cuModuleLoadData: the one step that needs a GPU
            cubins.append(cubin)

    real_compile = compiler._NVRTCProgram.compile

    def compile_and_note_options(self, options=(), log_stream=None):
        nvrtc_options.append(tuple(options))
        return real_compile(self, options, log_stream)

    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    monkeypatch.setattr(compiler, "function", types.SimpleNamespace(Module=KeepCubin, LinkState=function.LinkState))
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", arch_options)
    monkeypatch.setattr(compiler._NVRTCProgram, "compile", compile_and_note_options)

    def compile(filename, arch):
        raw = CudaDevice._load_module(types.SimpleNamespace(cupy=cupy), filename)
        module = core.compile_with_cache(raw.code, raw.options, arch=arch, prepend_cupy_headers=False,
                                         backend=raw.backend, translate_cucomplex=False,
                                         enable_cooperative_groups=raw.enable_cooperative_groups,
                                         name_expressions=raw.name_expressions, log_stream=None, jitify=False)
        assert isinstance(module, KeepCubin) and len(cubins) == 1
        return cubins.pop(), nvrtc_options[-1]

    return compile


@pytest.mark.parametrize("filename", sorted(KERNEL_FILES))
def test_cupy_compiles_every_kernel_file_for_h100(cupy_compile, filename):
    cubin, options = cupy_compile(filename, H100_ARCH)
    assert cubin[:4] == b"\x7fELF", "NVRTC should give a cubin (SASS) for sm_90, not PTX"
    entries = {name.decode() for name in re.findall(rb"\.text\.(\w+)\x00", cubin)}
    assert entries == set(KERNEL_FILES[filename])  # extern "C": found by cuModuleGetFunction by name
    for option in cuda_compile_options():
        assert option in options
    # What CuPy adds: -ftz=true (denormals flushed, unlike the emulator), the device's arch, and
    # the default execution space.
    assert "-arch=sm_90" in options and "-ftz=true" in options


def test_cupy_would_give_an_h100_a_cubin(cupy_compile):
    """On an H100 CuPy compiles with -arch=sm_min(90, NVRTC's newest): SASS the driver loads
    as is, never PTX that an older driver could refuse to JIT."""
    from cupy.cuda import compiler
    assert int(H100_ARCH) <= int(compiler._get_max_compute_capability())
    assert compiler._get_arch_for_options_for_nvrtc(H100_ARCH) == ("-arch=sm_90", "cubin")


def test_rawmodule_gets_a_tuple_of_options_and_no_name_expressions():
    cupy = pytest.importorskip("cupy")
    raw = CudaDevice._load_module(types.SimpleNamespace(cupy=cupy), "train_step.cu")  # lazy: no GPU needed
    assert raw.options == cuda_compile_options() and raw.name_expressions is None


def test_an_edited_header_changes_the_source_cupy_caches_by(tmp_path, monkeypatch):
    """CuPy's disk cache is keyed by the source text, not by what it #includes."""
    for path in device_module.KERNEL_DIR.iterdir():
        if path.suffix in (".cu", ".cuh", ".h"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(device_module, "KERNEL_DIR", tmp_path)
    before = cuda_module_source("deform.cu")
    assert before.startswith((tmp_path / "deform.cu").read_text())  # the file, unchanged, first
    (tmp_path / "philox.cuh").write_text((tmp_path / "philox.cuh").read_text() + "\n// edited\n")
    assert cuda_module_source("deform.cu") != before


# -- the capture regions only launch kernels (checked on the emulator) -------------------------------

class StrictCaptureDevice(EmulatedDevice):
    """The emulator, refusing inside capture() what a CUDA stream capture refuses or cannot record:
    module loads (NVRTC, cuModuleLoadData), allocations, host<->device copies, synchronisation."""

    capturing = False

    @contextmanager
    def capture(self):
        with super().capture() as graph:
            self.capturing = True
            try:
                yield graph
            finally:
                self.capturing = False

    def _refuse(self, what):
        assert not self.capturing, f"{what} inside a graph capture"

    def _load_module(self, filename):
        self._refuse(f"loading {filename}")
        return super()._load_module(filename)

    def asarray(self, host_array, dtype=None):
        self._refuse("a host-to-device copy")
        return super().asarray(host_array, dtype)

    def to_host(self, array):
        self._refuse("a device-to-host copy")
        return super().to_host(array)

    def zeros(self, shape, dtype=np.float32):
        self._refuse("an allocation")
        return super().zeros(shape, dtype)

    def empty(self, shape, dtype=np.float32):
        self._refuse("an allocation")
        return super().empty(shape, dtype)

    def synchronize(self):
        self._refuse("a synchronisation")


def tiny_run(device, batch_size, momentum=0.0):
    """One epoch of a small net on 100 synthetic images, deformed: for B = 8 that is 12 full steps
    (graphs of 5 steps replayed twice, a graph of the remaining 2) and a tail step of 4."""
    data = make_synthetic_mnist(n_train=100, n_test=40, seed=3)
    config = TrainConfig(net=None, hidden=[48, 24], batch_size=batch_size, lr=0.01, momentum=momentum, seed=2,
                         graph_steps=5)
    split = make_split(data, config)
    trainer = DeviceTrainer(device, nets.init_params(config.sizes, config.seed), split, config, log=lambda _: None)
    order = epoch_order(config.seed, 1, len(split.train_labels))
    loss, error = trainer.train_epoch(1, config.learning_rate(1), order)
    return loss, error, trainer.get_state(), trainer.predict_probs(split.test_images)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_capture_regions_only_launch_kernels(batch_size):
    loss, _, _, probs = tiny_run(StrictCaptureDevice(), batch_size, momentum=0.5)
    assert np.isfinite(loss) and probs.shape == (40, 10)


# -- (c) on a real GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_graph_capture_and_replay_on_gpu():
    d = CudaDevice()
    ops_mlp.preload(d)
    # 4 rows whose argmax is class 0 while the labels are 0, 1, 0, 1: 2 errors per step
    logits = d.asarray(np.tile(np.array([2.0, 0.0, 0.0], np.float32), (4, 1)))
    labels = d.asarray(np.array([0, 1, 0, 1], np.int32))
    outs = d.zeros((4, 3)), d.zeros(4), d.zeros(4, np.int32), d.zeros(4, np.int32)
    loss_total, wrong_total, cursor = d.zeros(1, np.float64), d.zeros(1, np.int32), d.zeros(1, np.int32)
    with d.capture() as graph:
        for _ in range(3):
            ops_mlp.softmax_xent(d, logits, labels, *outs, loss_total, wrong_total, cursor)
    assert not d.stream.is_capturing()
    assert d.to_host(cursor)[0] == 0  # captured, not run
    graph.replay()
    graph.replay()
    d.synchronize()
    step_loss = float(np.sum(d.to_host(outs[1]).astype(np.float64)))
    assert d.to_host(cursor)[0] == 6 * 4
    assert d.to_host(loss_total)[0] == pytest.approx(6 * step_loss, rel=1e-12) and step_loss > 0
    assert d.to_host(wrong_total)[0] == 6 * 2


@pytest.mark.gpu
@needs_gpu
def test_a_failed_capture_leaves_the_stream_usable():
    d = CudaDevice()
    ops_mlp.preload(d)
    args = (d.zeros((4, 3)), d.zeros(4, np.int32), d.zeros((4, 3)), d.zeros(4), d.zeros(3, np.int32),
            d.zeros(4, np.int32), d.zeros(1, np.float64), d.zeros(1, np.int32), d.zeros(1, np.int32))
    with pytest.raises(ValueError, match="softmax_xent"):
        with d.capture():
            ops_mlp.softmax_xent(d, *args)  # wrong has 3 elements, not 4: refused before any launch
    assert not d.stream.is_capturing()
    assert d.to_host(d.zeros(3)).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("batch_size, momentum", [(1, 0.0), (8, 0.0), (8, 0.5)], ids=["online", "minibatch", "momentum"])
def test_one_epoch_on_gpu_matches_the_emulator(batch_size, momentum):
    gpu_loss, gpu_error, gpu_state, gpu_probs = tiny_run(CudaDevice(), batch_size, momentum)
    emu_loss, emu_error, emu_state, emu_probs = tiny_run(EmulatedDevice(), batch_size, momentum)
    assert gpu_loss == pytest.approx(emu_loss, rel=1e-5) and gpu_error == emu_error
    for (W, b), (W_ref, b_ref) in zip(gpu_state["params"], emu_state["params"], strict=True):
        np.testing.assert_allclose(W, W_ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b, b_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(gpu_probs, emu_probs, atol=1e-5, rtol=0)
