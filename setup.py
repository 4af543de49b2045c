"""Builds vitops._C: the C++ CPU kernels always, the CUDA kernels when nvcc and a CUDA torch are present.

Environment:
  VITOPS_BUILD_CUDA=auto|0|1  auto (default) builds CUDA when it can; 1 fails if it can't; 0 never builds it.
  TORCH_CUDA_ARCH_LIST        default "8.0;9.0+PTX" (sm_80, sm_90, and PTX for the newest).
  MAX_JOBS                    parallel compile jobs; default from the cores and the free memory.
  NVCC_THREADS                nvcc's --threads (default 2).
  DEBUG=1                     -O0 -g, and -G for device code.
"""
import glob
import os
import sys

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_CUDA = os.environ.get("VITOPS_BUILD_CUDA", "auto").lower()
DEBUG = os.environ.get("DEBUG", "0") == "1"

if BUILD_CUDA not in ("auto", "0", "1"):
    sys.exit(f"VITOPS_BUILD_CUDA must be auto, 0 or 1, got {BUILD_CUDA!r}")


def find_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension reads it
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

# Commands that compile the extension, and dist_info: pip's metadata step before it builds a wheel, where stopping
# comes before pip resolves (and downloads) the dependencies. sdist and egg_info need no torch.
NEEDS_TORCH = {"dist_info", "build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}
MISSING_TORCH = """vitops: torch can't be imported here, and the extension must be compiled against the torch
it will run with.
  If torch is installed, this is pip's (or python -m build's) isolated build environment: build without it,
      pip install --no-build-isolation .      (python -m build --no-isolation)
  Otherwise install torch first (https://pytorch.org/get-started), then run the line above."""

try:
    import torch  # noqa: E402
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402
except ImportError:
    if NEEDS_TORCH.intersection(sys.argv[1:]):
        sys.exit(MISSING_TORCH)
    torch = None


def cuda_build_blocker():
    """Why the CUDA kernels can't be built here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    return None


def pip_nvidia_include_dirs():
    """Torch's CUDA headers include cusparse.h and friends, which pip ships under nvidia/*/include."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 8
    return max(1, min(cores, int(free_gb // 3)))  # an nvcc job can take ~3 GB


def extensions():
    blocker = cuda_build_blocker()
    with_cuda = BUILD_CUDA == "1" or (BUILD_CUDA == "auto" and blocker is None)
    if with_cuda and blocker:
        sys.exit(f"VITOPS_BUILD_CUDA=1 but the CUDA kernels can't be built: {blocker}")
    if BUILD_CUDA == "auto" and blocker:
        print(f"vitops: building without CUDA kernels: {blocker}", file=sys.stderr)

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx = opt + ["-ffp-contract=off", "-Wall", "-Wno-unused-function"]
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is a header template: without -fopenmp it silently runs on one thread. The library
        # linked is torch's own libgomp.so.1, already loaded, so there is one OpenMP thread pool.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not with_cuda:
        return [CppExtension("vitops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]

    sources += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
    nvcc = opt + ["-G"] * DEBUG + [
        "-lineinfo",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        "--expt-relaxed-constexpr",
        "--extended-lambda",
    ]
    return [
        CUDAExtension(
            "vitops._C",
            sources,
            include_dirs=pip_nvidia_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    ]


def license_metadata():
    """Apache-2.0 as an SPDX expression (PEP 639) from setuptools 77 on; older ones (`setup.py build_ext` may meet
    one beside an older torch) reject that in pyproject.toml, hence `license` is dynamic there, and take free text."""
    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": "Apache-2.0", "license_files": ["LICENSE"]}
    return {"license": "Apache-2.0", "license_files": ["LICENSE"]}


os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

setup(
    packages=find_packages(include=["vitops", "vitops.*"]),
    package_data={"vitops.ops": ["schemas.def"]},
    ext_modules=extensions() if torch is not None else [],
    cmdclass={"build_ext": BuildExtension} if torch is not None else {},
    **license_metadata(),
)
