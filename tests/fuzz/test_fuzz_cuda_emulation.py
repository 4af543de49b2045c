"""Property-based tests of the CUDA kernels' device code, run on the CPU by the emulation drivers (tests/cpp/*,
driven from tests/ops/test_drop_path_add.py, test_fuse_conv_bn.py, test_attention_cuda_emulation.py and
tests/optim/test_optim_cuda_emulation.py, whose fixtures and helpers are reused here): the same drawn shapes,
layouts, dtypes and values as the other fuzz tests, on a small budget. Not run on a GPU: this checks the kernels'
indexing and arithmetic, not their speed."""
from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import (
    FLOAT_DTYPES,
    LOW_PRECISION,
    assert_reduction_close,
    examples,
    shapes,
    values,
)
from tests.fuzz.test_fuzz_attention import assert_flash_rule, expected
from tests.fuzz.test_fuzz_optim import (
    adamp_args,
    check_adamp_stages,
    check_lamb_stages,
    lamb_args,
)
from tests.ops.test_attention_cuda_emulation import (
    HEAD_DIMS,
    LAYOUTS,
    _run,
    emulator,  # noqa: F401  (a fixture)
)
from tests.ops.test_drop_path_add import cuda_emulation as elementwise  # noqa: F401  (a fixture)
from tests.ops.test_drop_path_add import emulate
from tests.ops.test_fuse_conv_bn import EMULATION_DTYPES, address
from tests.ops.test_fuse_conv_bn import cuda_emulation as fuse_emulation  # noqa: F401  (a fixture)
from tests.optim.test_optim_cuda_emulation import cuda  # noqa: F401  (a fixture)
from vitops import use_backend
from vitops.ops import reference

# --- drop_path_add ------------------------------------------------------------------------------------------


@st.composite
def drop_path_cases(draw):
    """What csrc/cuda/drop_path_add.cu hands its kernels: batch-outer dense tensors (contiguous or channels_last),
    a branch at any storage offset (aligned or not), contiguous gamma and sample_scale in the compute dtype."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    branch_dtype = draw(st.sampled_from((torch.float32, *LOW_PRECISION))) if dtype == torch.float32 else dtype
    shape = draw(shapes(2, 4, 33, 3000, nonempty=True))
    memory_format = torch.channels_last if len(shape) == 4 and draw(st.booleans()) else torch.contiguous_format
    acc = reference.accumulate_dtype(dtype)
    residual = draw(values(shape, dtype)).contiguous(memory_format=memory_format)
    grad_out = draw(values(shape, dtype)).contiguous(memory_format=memory_format)
    offset = draw(st.integers(0, 3))
    branch = torch.empty(residual.numel() + offset, dtype=branch_dtype)[offset:].as_strided(shape, residual.stride())
    branch.copy_(draw(values(shape, branch_dtype)))
    gamma = None
    if draw(st.booleans()):
        channel_dim = draw(st.integers(1, len(shape) - 1))
        gamma = draw(values((shape[channel_dim],) + (1,) * (len(shape) - 1 - channel_dim), acc,
                            kinds=("normal", "small", "large")))  # fmt: skip
    scale = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 1 / 0.7, 2.0]), min_size=shape[0],
                                       max_size=shape[0])), dtype=acc)  # fmt: skip
    return residual, branch, gamma, scale, grad_out


@settings(max_examples=examples(40))
@given(case=drop_path_cases())
def test_drop_path_add_kernels(elementwise, case):  # noqa: F811
    residual, branch, gamma, scale, grad_out = case
    out, grad_branch, grad_gamma, _, _ = emulate(elementwise, residual, branch, gamma, scale, grad_out)
    torch.testing.assert_close(out, reference.drop_path_add(residual, branch, gamma, scale), rtol=0, atol=0,
                               equal_nan=True)  # fmt: skip
    want_branch, _ = reference.drop_path_add_backward(grad_out, None, gamma, scale, branch.dtype, True)
    torch.testing.assert_close(grad_branch, want_branch, rtol=0, atol=0, equal_nan=True)
    if gamma is not None:
        acc = reference.accumulate_dtype(grad_out.dtype)
        per_sample = scale.view((-1,) + (1,) * (grad_out.ndim - 1))
        terms = torch.where(per_sample == 0, 0.0, grad_out.to(acc) * per_sample * branch.to(acc))
        channel_dim = grad_out.ndim - gamma.ndim
        dims = [d for d in range(grad_out.ndim) if d != channel_dim]
        assert_reduction_close(grad_gamma, terms, dims, "grad_gamma")


# --- fuse_conv_bn ---------------------------------------------------------------------------------------------


@st.composite
def fuse_cases(draw):
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    acc = reference.accumulate_dtype(dtype)
    shape = draw(shapes(2, 4, 40, 4096, nonempty=True))
    weight = draw(values(shape, dtype, kinds=("normal", "small", "large", "special")))
    c = shape[0]
    optional = [draw(st.booleans()) for _ in range(3)]
    channel = [draw(values((c,), acc, kinds=("normal", "small"))) if keep else None
               for keep in (optional[0], True, True, optional[1], optional[2])]  # fmt: skip
    channel[2] = channel[2].abs()  # running_var
    return weight, channel, draw(st.sampled_from([1e-5, 1e-3, 0.1]))


@settings(max_examples=examples(30))
@given(case=fuse_cases())
def test_fuse_conv_bn_kernel(fuse_emulation, case):  # noqa: F811
    """Bit for bit the compiled CPU kernel (the same per-channel functions), which the other fuzz tests hold
    to the reference."""
    weight, channel, eps = case
    fused_weight, fused_bias = torch.empty_like(weight), torch.empty(weight.shape[0], dtype=weight.dtype)
    pointers = (address(weight), *map(address, channel), address(fused_weight), address(fused_bias))
    fuse_emulation.fuse_conv_bn(EMULATION_DTYPES[weight.dtype], *pointers, weight.shape[0], weight[0].numel(), eps)
    with use_backend("cpu"):
        want = torch.ops.vitops.fuse_conv_bn(weight, *channel, eps)
    torch.testing.assert_close(fused_weight, want[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused_bias, want[1], rtol=0, atol=0, equal_nan=True)


# --- attention ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(12))
@example(dtype_name="fp16", layout="contiguous", b=1, h=1, nq=17, nk=1, d=80, scale=1.0, seed=0)  # see below
@given(
    dtype_name=st.sampled_from(["fp16", "bf16"]),
    layout=st.sampled_from(LAYOUTS),
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    nq=st.one_of(st.sampled_from([1, 17, 64]), st.integers(1, 80)),
    nk=st.one_of(st.sampled_from([1, 17, 64]), st.integers(1, 80)),
    d=st.sampled_from(HEAD_DIMS),
    scale=st.sampled_from([None, 0.3, -0.2, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_attention_kernels(emulator, dtype_name, layout, b, h, nq, nk, d, scale, seed):  # noqa: F811
    """FlashAttention's rule with a floor at the size of the terms (tests/fuzz/test_fuzz_attention.py): the
    driver's own floor, 1e-5 * max |ref|, is too tight where the reference is exactly 0 but the kernel's is not,
    e.g. dk for Nk = 1 (P = 1, dS = dP - delta, two float32 sums of the same products in another order) over
    17 queries: 1.3e-5."""
    nk = nq if layout == "packed" else nk
    (q, k, v, grad_out), got = _run(emulator, dtype_name, layout, b, h, nq, nk, d, scale, seed)
    want = expected(q, k, v, scale, grad_out)
    for name, result in zip(("out", "lse", "dq", "dk", "dv"), got):
        assert_flash_rule(result, want[name], name, nk + d)


# --- the optimizer ops ----------------------------------------------------------------------------------------


@settings(max_examples=examples(40))
@given(args=lamb_args("cpu", "cuda"))
def test_lamb_kernels(cuda, args):  # noqa: F811
    check_lamb_stages(cuda, args, exact=True)


@settings(max_examples=examples(40))
@given(args=adamp_args("cpu", "cuda"))
def test_adamp_kernels(cuda, args):  # noqa: F811
    check_adamp_stages(cuda, args, exact=True)

