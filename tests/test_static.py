"""Static GPU evidence, in CI and without a GPU (benchmarks/static.py): at its default configuration every kernel
compiles for sm_80 and sm_90 without register spills, and every float16/bfloat16 matrix kernel uses tensor cores.

The compiled library's CUDA kernels are read as built; the Triton kernels are compiled ahead of time, once, in a
subprocess (the interpreter that runs them on the CPU in the other tests accepts code the compiler rejects, and
says nothing of the GPU's instructions). The same compilation also checks the numerics their PTX promises."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static import SM_LIMITS, missing_tensor_cores, occupancy, parse_cuobjdump, record_id, spills

ROOT = Path(__file__).resolve().parent.parent
# The tests that read the report compile about 100 Triton kernels (about 2 minutes of CPU, cold; Triton's cache
# keeps them for the next run) and read the compiled library.
compiles = pytest.mark.slow


def test_occupancy_follows_the_cuda_occupancy_calculator():
    # 255 registers: 8192 a warp (256-register units), 2 warps in each sub-partition's 16384: 2 blocks of 4 warps.
    assert occupancy(SM_LIMITS[90], 255, 0, 128) == {
        "blocks_per_sm": 2, "warps_per_sm": 8, "occupancy": 0.125, "limited_by": "registers"
    }  # fmt: skip
    # 100 KB of shared memory (+1 KB reserved): 2 blocks in sm_90's 228 KB, 1 in sm_80's 164 KB.
    assert occupancy(SM_LIMITS[90], 32, 100 * 1024, 128)["blocks_per_sm"] == 2
    assert occupancy(SM_LIMITS[80], 32, 100 * 1024, 128)["limited_by"] == "shared"
    assert occupancy(SM_LIMITS[80], 32, 100 * 1024, 128)["blocks_per_sm"] == 1
    assert occupancy(SM_LIMITS[90], 16, 0, 32)["limited_by"] == "blocks"  # 32 blocks of one warp: 50%
    assert occupancy(SM_LIMITS[90], 32, 0, 1024)["occupancy"] == 1.0
    # 40 registers: 1280 a warp, 12 warps in a sub-partition, 48 an SM: a single 32-warp block fits.
    assert occupancy(SM_LIMITS[90], 40, 0, 1024)["occupancy"] == 0.5
    assert occupancy(SM_LIMITS[90], 32, 228 * 1024, 128)["blocks_per_sm"] == 0  # over the 227 KB a block may have


def test_cuobjdump_listings_are_read():
    header = "Fatbin elf code:\n================\narch = sm_80\nidentifier = /src/csrc/cuda/attention/fwd.cu\n"
    res_usage = header + " Function _Z1kPf:\n  REG:255 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:380\n"
    sass = header + (
        "\tcode for sm_80\n\t\tFunction : _Z1kPf\n"
        "        /*0000*/                   STL.64 [R1], R14 ;   /* 0x0 */\n"
        "        /*0010*/               @P0 STL [R1+0x8], R12 ;\n"
        "        /*0020*/                   LDL.LU R9, [R1] ;\n"
        "        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n"
        "        /*0040*/                   EXIT ;\n"
    )
    elf = header + ".nv.info._Z1kPf\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n\tValue:\t0x80 0x1 0x1 \n"
    (kernel,) = parse_cuobjdump(res_usage, sass, elf)
    assert (kernel.arch, kernel.name, kernel.source) == (80, "_Z1kPf", "/src/csrc/cuda/attention/fwd.cu")
    assert (kernel.registers, kernel.stack_bytes, kernel.static_shared) == (255, 16, 1024)
    assert (kernel.spill_store_bytes, kernel.spill_load_bytes) == (12, 4)
    assert kernel.tensor_core_ops == {"HMMA": 1}
    assert kernel.max_threads == 128


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    pytest.importorskip("triton.backends.compiler", reason="needs triton's ahead-of-time compiler")
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "benchmarks.static", "--defaults", "--quiet", "--out", str(out / "static.json"),
               "--ptx-dir", str(out / "ptx")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads((out / "static.json").read_text())


def records(report: dict, kind: str, **fields) -> list[dict]:
    found = [r for r in report["kernels"] if r["kind"] == kind and all(r[k] == v for k, v in fields.items())]
    assert found, f"no {kind} kernels with {fields} in the report"
    return found


def describe(r: dict) -> str:
    return (
        f"{record_id(r)}: {r['registers']} registers, {r['spill_store_bytes']} B spill stores, "
        f"{r['spill_load_bytes']} B spill loads, {r['stack_bytes']} B stack, tensor cores {r['tensor_core_ops']}"
    )


@compiles
def test_every_triton_kernel_is_compiled_at_its_defaults_for_both_archs(report):
    assert report["unlaunched_triton_kernels"] == []
    triton = records(report, "triton")
    for arch in ("sm_80", "sm_90"):
        compiled = {r["kernel"] for r in triton if r["arch"] == arch}
        assert compiled == {r["kernel"] for r in triton}, f"missing for {arch}"


@compiles
def test_triton_kernels_do_not_spill_at_their_defaults(report):
    assert [describe(r) for r in records(report, "triton") if spills(r)] == []


@compiles
def test_triton_matrix_kernels_use_tensor_cores(report):
    matrix = [r for r in records(report, "triton", op="attention") if r["dtype"] in ("float16", "bfloat16")]
    assert all(r["needs_tensor_cores"] for r in matrix), "the attention kernels' tl.dot went unnoticed"
    assert [describe(r) for r in matrix if missing_tensor_cores(r)] == []
    hopper = {op for r in matrix if r["arch"] == "sm_90" for op in r["tensor_core_ops"]}
    assert "HGMMA" in hopper, "no attention kernel uses wgmma on sm_90a"


def cuda_kernels(report: dict) -> list[dict]:
    found = [r for r in report["kernels"] if r["kind"] == "cuda"]
    if not found:
        pytest.skip("vitops/_C was built without CUDA kernels")
    return found


@compiles
def test_cuda_kernels_do_not_spill(report):
    assert [describe(r) for r in cuda_kernels(report) if spills(r)] == []


@compiles
def test_cuda_matrix_kernels_use_tensor_cores(report):
    matrix = [r for r in cuda_kernels(report) if r["needs_tensor_cores"]]
    assert matrix, "no float16/bfloat16 attention kernel in vitops/_C"
    assert [describe(r) for r in matrix if missing_tensor_cores(r)] == []


def ptx(record: dict) -> str:
    return Path(record["ptx"]).read_text()


@compiles
def test_drop_path_add_forward_does_not_contract_fmas(report):
    """Float32 results equal timm's op-by-op ones only without FMA contraction."""
    for r in records(report, "triton", kernel="_forward_kernel", op="drop_path_add"):
        assert "fma.rn.f32" not in ptx(r) and "fma.rn.f64" not in ptx(r), record_id(r)


@compiles
def test_optimizer_kernels_do_not_contract_fmas(report):
    """The steps follow timm's order of operations, IEEE-rounded: no FMA contraction."""
    kernels = {"_lamb_sq_sum_kernel", "_lamb_moments_kernel", "_lamb_apply_kernel", "_adamp_kernel"}
    steps = [r for r in records(report, "triton") if r["kernel"] in kernels]
    assert {r["kernel"] for r in steps} == kernels
    for r in steps:
        assert "fma.rn.f32" not in ptx(r), record_id(r)


@compiles
def test_fuse_conv_bn_rounds_sqrt_and_division(report):
    """tl.sqrt and / are approximate for float32 on GPUs: the kernel uses the IEEE-rounded ones."""
    for r in records(report, "triton", op="fuse_conv_bn"):
        code = ptx(r)
        if r["dtype"] == "float64":
            assert "sqrt.rn.f64" in code, record_id(r)
        else:
            assert "sqrt.rn.f32" in code and "div.rn.f32" in code, record_id(r)
