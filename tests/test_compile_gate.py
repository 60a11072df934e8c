"""The NVRTC compile gate: every kernel source compiles for every supported architecture, nothing
spills, every __global__ reaches ptxas, and cuda_kernels/RESOURCES.md is current. No GPU needed."""
import textwrap

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from gpumlp import compile_gate  # noqa: E402

SAMPLE_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas info    : Function properties for k2
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 256 bytes smem, 384 bytes cmem[0], 16 bytes cmem[2]
ptxas info    : Compile time = 2.906 ms
ptxas info    : Compiling entry function '_Z2tkILi400EEvPf' for 'sm_90'
ptxas info    : Function properties for _Z2tkILi400EEvPf
ptxas         .     288 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 288 bytes cumulative stack size
ptxas info    : Compile time = 946.914 ms
ptxas info    : Function properties for _Z6helperPfi
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
"""


@pytest.fixture(scope="module")
def compiled():
    try:
        return compile_gate.compile_all()
    except compile_gate.CompileError as error:
        pytest.fail(str(error))


def test_every_source_compiles_for_every_architecture(compiled):
    archs = compile_gate.gate_archs()
    assert {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"} <= set(archs)
    sources = compile_gate.kernel_sources()
    assert sources, "no kernel sources found"
    assert sorted((c.source, c.arch) for c in compiled) == sorted((s.name, a) for s in sources for a in archs)


def test_no_kernel_spills_on_any_architecture(compiled):
    spills = [line for line in compile_gate.problems(compiled) if "spills" in line]
    assert not spills, "\n".join(spills)


def test_every_global_function_reaches_ptxas(compiled):
    for c in compiled:
        assert c.declared, f"{c.source}: no __global__ function found in the source"
    missing = [line for line in compile_gate.problems(compiled) if "not compiled" in line]
    assert not missing, "\n".join(missing)


def test_resources_table_is_current(compiled):
    path = compile_gate.RESOURCES_FILE
    assert path.is_file(), f"{path} is missing: run `{compile_gate.WRITE_COMMAND}`"
    committed = path.read_text()
    version = compile_gate.nvrtc_version()
    fresh = compile_gate.render_resources(compiled, version)
    recorded = compile_gate.recorded_nvrtc_version(committed)
    if recorded != version:
        # Register counts belong to one compiler version; the rows (kernels and architectures)
        # must match whatever the version.
        def rows(text):
            return [line.split("|")[1:3] for line in text.splitlines() if line.startswith("| ")]
        assert rows(committed) == rows(fresh), f"{path.name} lists other kernels: run `{compile_gate.WRITE_COMMAND}`"
        pytest.skip(f"{path.name} was generated with NVRTC {recorded}, this is {version}: numbers not compared")
    assert committed == fresh, f"{path.name} is out of date: run `{compile_gate.WRITE_COMMAND}`"


def test_ptxas_log_is_parsed_per_function():
    parsed = compile_gate.parse_ptxas_log("t.cu", "sm_90", SAMPLE_LOG)
    k2 = parsed.kernels["k2"]
    assert (k2.registers, k2.shared_bytes, k2.stack_bytes, k2.barriers, k2.constant_bytes) == (10, 256, 0, 1, 400)
    assert not k2.spills
    template = parsed.kernels["_Z2tkILi400EEvPf"]
    assert (template.registers, template.stack_bytes, template.spill_store_bytes, template.spill_load_bytes) == (255, 288, 24, 24)
    assert parsed.functions == {"_Z6helperPfi": (8, 4, 4)}
    parsed.declared = ["k2", "tk", "never_compiled"]
    found = compile_gate.problems([parsed])
    assert any("kernel _Z2tkILi400EEvPf spills on sm_90" in line for line in found)
    assert any("function _Z6helperPfi spills on sm_90" in line for line in found)
    assert any("never_compiled was not compiled" in line for line in found)
    assert not any("__global__ tk " in line or "__global__ k2 " in line for line in found)


def test_global_names_skip_comments_and_read_launch_bounds():
    source = textwrap.dedent("""
        // __global__ void commented_out(int x)
        /* __global__ void also_commented(int x) */
        extern "C" __global__ void plain(float* a) {}
        extern "C" __global__ void __launch_bounds__(256, 2) bounded(float* a) {}
        template <int N> __global__ void templated(float* a) {}
        __device__ void not_a_kernel(float* a) {}
    """)
    assert compile_gate.global_names(source) == ["bounded", "plain", "templated"]


def test_a_real_spill_fails_the_gate(tmp_path):
    """A kernel that needs more than 255 registers is caught, named with its architecture."""
    source = tmp_path / "spilling.cu"
    source.write_text(textwrap.dedent("""
        extern "C" __global__ void __launch_bounds__(1024) spilling(float* a) {
            float r[400];
        #pragma unroll
            for (int i = 0; i < 400; i++) r[i] = a[i * threadIdx.x] * a[i + 7];
            float s = 0;
        #pragma unroll
            for (int i = 0; i < 400; i++) s += r[i] * r[(i * 7) % 400];
            a[threadIdx.x] = s;
        }
    """))
    compiled = compile_gate.compile_source(str(source), "sm_90")
    assert compiled.kernels["spilling"].spills
    assert any(line.startswith("spilling.cu: kernel spilling spills on sm_90") for line in compile_gate.problems([compiled]))


def test_a_source_that_does_not_compile_names_file_and_arch(tmp_path):
    source = tmp_path / "broken.cu"
    source.write_text('extern "C" __global__ void broken(float* a) { a[0] = undeclared; }\n')
    with pytest.raises(compile_gate.CompileError, match=r"(?s)broken\.cu does not compile for sm_75.*undeclared"):
        compile_gate.compile_source(str(source), "sm_75")


def test_without_nvrtc_the_gate_says_what_to_install_in_one_line(monkeypatch, capsys):
    def no_nvrtc():
        raise ModuleNotFoundError("No module named 'cupy_backends'")
    monkeypatch.setattr(compile_gate, "nvrtc_module", no_nvrtc)
    assert compile_gate.main([]) == 2
    err = capsys.readouterr().err
    assert err == ("error: NVRTC could not be loaded (ModuleNotFoundError: No module named 'cupy_backends'): "
                   "pip install 'gpumlp[test]' (or pip install 'cuda-toolkit[cudart,nvrtc]==13.*')\n")
