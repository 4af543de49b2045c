"""Ahead-of-time compilation of Triton kernels for an H100, without a GPU. The interpreter that CI runs the
kernels under accepts code the compiler rejects, so each Triton test file also compiles its kernels for sm_90, in
a subprocess without TRITON_INTERPRET."""
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile(fn, signature, constants, **options):
    signature = {**signature, **{name: "constexpr" for name in constants}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
"""


def assert_compiles_for_sm90(body: str) -> None:
    """Runs PRELUDE + `body` (which calls `compile(...)` and may assert on the PTX) and checks it finished."""
    pytest.importorskip("triton.backends.compiler")
    script = PRELUDE + textwrap.dedent(body) + '\nprint("compiled")\n'
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    if "No module named" in result.stderr and "triton.backends" in result.stderr:
        pytest.skip("this triton has no ahead-of-time compile API")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
