"""The CPU emulation of the warp-level instructions the tensor-core kernels use (tests/cpp/warp_mma_emulation.h,
standing in for csrc/cuda/warp_mma.cuh), checked on its own by tests/cpp/warp_mma_emulation_test.cpp against
plain matrix products and the PTX ISA's layouts: mma.m16n8k16 on fragments built by hand (every one of the 16x8
outputs), ldmatrix .x1/.x2/.x4 with and without .trans (every lane, register and half), ldmatrix feeding mma as
the kernels do, and cp.async's zero-fill and wait_group semantics. This runs the emulator, not a GPU."""
import ctypes

import pytest

from tests.cpp import emulation

# Values each check compares: 128 outputs; 6 ldmatrix variants x 32 lanes x (1 + 2 + 4 registers) x 2 halves;
# 6 products x 128 outputs; 14 per lane.
CHECKED = {"mma": 128, "ldmatrix": 896, "ldmatrix_mma": 768, "cp_async": 448}
DTYPES = {"fp16": 0, "bf16": 1}


@pytest.fixture(scope="module")
def driver():
    lib = emulation.build("warp_mma_emulation_test")
    lib.check_warp_instruction.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    return lib


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("check", sorted(CHECKED))
def test_warp_instruction_emulation(driver, check, dtype):
    checked = ctypes.c_int(0)
    mismatches = driver.check_warp_instruction(check.encode(), DTYPES[dtype], ctypes.byref(checked))
    assert mismatches == 0, f"{mismatches} mismatches (printed on stderr)"
    assert checked.value == CHECKED[check]
