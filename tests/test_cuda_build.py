"""The CUDA kernels as ptxas compiles them for Hopper (sm_90a) and Ampere (sm_80), checked on a
machine without a GPU.

Two ways a kernel slows down without failing the build or any GPU test:
- ptxas serializes a kernel's wgmma instructions when one of the wgmma pipeline instructions
  (fence, commit, wait) stands on a path it cannot prove uniform over the warpgroup, e.g. an
  `if` around the MMAs of a k-block. It says so in an informational message (C7520), not a
  warning. A skipped-MMA branch written that way made the prefill GEMMs 10-21% slower on an H200
  (docs/performance.md); moving the branch outside the k-loop removed the message and the loss.
- register spills: the decode kernels are tuned to a register budget (a build at 128 registers
  spilled and took 4-8% longer), the wgmma kernels run at one block per SM with setmaxnreg.

The test compiles each CUDA source for each architecture alone, with ptxas's per-kernel report
(for sm_80 the wgmma kernels are stand-ins that trap). The compiles run as many at a time as there
are cores, the longest first (wgmma.cu for sm_90a: about two of the five minutes they take one by
one on 2 cores); each test waits for its own. Skipped where nvcc is missing (the library is then
built without CUDA kernels).

Also: CMake refuses plain sm_90 (its code would be those stand-ins), and the built library
reports the architectures it was compiled for and, where no GPU is usable, no device code.

One known spill is allowed: on sm_80, the SIMT fallback's projection 1 in 16-bit types
(`Gemm1Kernel`, 256 threads at 64 registers) spills 8 bytes. It runs only where the tensor-core
paths cannot (sizes not a multiple of 8); whether more registers and fewer blocks an SM would be
faster there is not measured.
"""

import functools
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "custom_ops" / "cuda"


def find_nvcc():
    """nvcc as CMake would find it: CUDACXX, then PATH, then the default toolkit location."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


NVCC = find_nvcc()
SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
ARCHS = {"sm_90a": "compute_90a", "sm_80": "compute_80"}
# (architecture, source, part of the kernel's name) -> spill bytes stored + loaded, at most
KNOWN_SPILLS = {("sm_80", "simt.cu", "Gemm1Kernel"): 16}


def allowed_spill(arch, source, kernel):
    return max([b for (a, s, name), b in KNOWN_SPILLS.items()
                if a == arch and s == source and name in kernel] or [0])


def ptxas_report(text):
    """{kernel: (registers, spill bytes stored + loaded)} and the C7520 lines of a ptxas -v log."""
    kernels, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_\w+'", line)
        if m:
            current = m.group(1)
            kernels[current] = [None, 0]
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            kernels[current][1] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            kernels[current][0] = int(m.group(1))
    serialized = [ln.strip() for ln in text.splitlines() if "C7520" in ln]
    return {k: tuple(v) for k, v in kernels.items()}, serialized


def test_ptxas_report_reads_registers_spills_and_serialization():
    log = """ptxas info    : Compiling entry function '_Z8WgKernelv' for 'sm_90a'
ptxas info    : Function properties for _Z8WgKernelv
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 16 bytes smem
ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to x in the function '_Z8WgKernelv'
"""
    kernels, serialized = ptxas_report(log)
    assert kernels == {"_Z8WgKernelv": (168, 12)}
    assert len(serialized) == 1 and "_Z8WgKernelv" in serialized[0]
    ampere, _ = ptxas_report(log.replace("'sm_90a'", "'sm_80'"))
    assert ampere == kernels


def test_only_the_known_spill_is_allowed():
    assert allowed_spill("sm_80", "simt.cu", "_ZN7moefuse4cuda11Gemm1KernelI6__halfEEvNS0_11Gemm1ParamsE") == 16
    assert allowed_spill("sm_90a", "simt.cu", "Gemm1KernelI6__half") == 0
    assert allowed_spill("sm_80", "simt.cu", "Gemm2KernelI6__half") == 0
    assert allowed_spill("sm_80", "route.cu", "Gemm1Kernel") == 0


TRACE = "skinny.cu with MOEFUSE_CUDA_TRACE"


def compile_commands(out):
    """{(source, arch) or TRACE: the nvcc command}, the longest compile first."""
    cmds = {(source, arch): [NVCC, "-std=c++17", "-O3", f"-gencode=arch={ARCHS[arch]},code={arch}", "-cubin",
                             "-Xptxas", "-v", "-I", str(ROOT / "custom_ops"),
                             "-o", str(out / f"{source}.{arch}.cubin"), str(CUDA_DIR / source)]
            for source in SOURCES for arch in ARCHS}
    cmds[TRACE] = [NVCC, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-c", "-Xcompiler=-fPIC",
                   "-Xptxas", "-v", "-DMOEFUSE_CUDA_TRACE", "-I", str(ROOT / "custom_ops"),
                   "-o", str(out / "skinny_trace.o"), str(CUDA_DIR / "skinny.cu")]
    return dict(sorted(cmds.items(), key=lambda kv: kv[0] != ("wgmma.cu", "sm_90a")))


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """{key: (future of the finished nvcc run, its output path)}; compiles not yet started when
    the module's tests end (a -k that picks a few) are dropped."""
    if NVCC is None:
        yield {}
        return
    out = tmp_path_factory.mktemp("ptxas")
    pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=1200)
    yield {key: (pool.submit(run, cmd), Path(cmd[cmd.index("-o") + 1]))
           for key, cmd in compile_commands(out).items()}
    pool.shutdown(wait=True, cancel_futures=True)


def test_compile_commands_put_the_longest_first_and_name_their_outputs(tmp_path):
    cmds = compile_commands(tmp_path)
    assert next(iter(cmds)) == ("wgmma.cu", "sm_90a")
    assert len(cmds) == len(SOURCES) * len(ARCHS) + 1
    outputs = [cmd[cmd.index("-o") + 1] for cmd in cmds.values()]
    assert len(set(outputs)) == len(outputs)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the library is built without CUDA kernels)")
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("source", SOURCES)
def test_kernels_are_not_serialized_and_do_not_spill(source, arch, compiles):
    done = compiles[source, arch][0].result()
    assert done.returncode == 0, done.stderr[-4000:]
    kernels, serialized = ptxas_report(done.stdout + done.stderr)
    assert kernels, f"ptxas compiled no kernel of {source}"
    assert not serialized, "ptxas serialized wgmma:\n" + "\n".join(serialized)
    if arch == "sm_90a" and "wgmma.mma_async" in (CUDA_DIR / source).read_text():
        # the real wgmma kernels were compiled (not the stubs of other architectures)
        wgmma_kernels = {k: v for k, v in kernels.items() if "Wg" in k}
        assert wgmma_kernels and all(regs and regs > 32 for regs, _ in wgmma_kernels.values()), kernels
    spilling = {k: spill for k, (_, spill) in kernels.items()
                if spill > allowed_spill(arch, source, k)}
    assert not spilling, f"kernels that spill registers (bytes stored + loaded): {spilling}"


@pytest.mark.skipif(NVCC is None or shutil.which("nm") is None, reason="needs nvcc and nm")
def test_the_trace_build_compiles(compiles):
    """The one-token kernels with per-block stamps (MOEFUSE_CUDA_TRACE, `make gpu-trace`) compile
    without spills, and the object exports the stamps' reader."""
    future, obj = compiles[TRACE]
    done = future.result()
    assert done.returncode == 0, done.stderr[-4000:]
    kernels, _ = ptxas_report(done.stdout + done.stderr)
    one_token = {k: v for k, v in kernels.items() if "OneTokenGemm" in k}
    assert one_token, kernels
    assert not {k: spill for k, (_, spill) in one_token.items() if spill}, one_token
    symbols = subprocess.run([shutil.which("nm"), str(obj)], capture_output=True, text=True).stdout
    assert re.search(r" T moefuse_trace_read$", symbols, re.M)


def test_the_sources_are_found():
    # the check above would pass vacuously if no source matched
    assert {"wgmma.cu", "skinny.cu", "mma_grouped.cu", "route.cu"} <= set(SOURCES)


@pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_plain_sm_90_is_refused(tmp_path):
    """The Hopper kernels need sm_90a features; plain sm_90 code would be their stand-ins, which a
    Hopper GPU would run. CMake refuses the list before compiling anything."""
    done = subprocess.run(
        [shutil.which("cmake"), "-S", str(ROOT), "-B", str(tmp_path), "-DMOEFUSE_CUDA=ON",
         "-DMOEFUSE_CUDA_ARCHS=80;90", f"-DCMAKE_CUDA_COMPILER={NVCC}",
         f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "MOEFUSE_CUDA_ARCHS has 90; the Hopper kernels need 90a" in done.stdout + done.stderr


def test_the_library_reports_its_architectures():
    from moefuse.runtime import cuda_build, library_path

    try:
        library_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    build = cuda_build()
    if build is None:
        pytest.skip("the library was built without CUDA kernels")
    if not os.environ.get("MOEFUSE_LIBRARY"):  # the installed build: CMake's default list
        default = re.search(r'set\(MOEFUSE_CUDA_ARCHS "([^"]+)"',
                            (ROOT / "custom_ops" / "CMakeLists.txt").read_text()).group(1)
        assert build["archs"] == default.split(";")
    assert build["archs"] and all(re.fullmatch(r"\d+a?", a) for a in build["archs"]), build
    torch = pytest.importorskip("torch")
    # (with a GPU, tests/test_kernel_cuda.py checks what of the code it runs)
    assert (build["device"] is None) == (not torch.cuda.is_available()), build

