"""drop_path and drop_path_add: every backend against the reference and timm, forward and backward."""
import ctypes
import itertools

import pytest
import torch

import vitops
from tests.conftest import HAS_CUDA, device_backend_params
from tests.cpp import emulation
from vitops import _backend
from vitops.ops import drop_path, drop_path_add, reference

BACKENDS = device_backend_params("drop_path_add")

# (shape, gamma shape or None, memory format): tokens with odd sizes, NCHW maps, a 2-D and a 1-D batch.
CASES = [
    ((1, 197, 383), (383,), None),
    ((3, 17, 64), (64,), None),
    ((2, 8, 5, 7), (8, 1, 1), None),
    ((2, 16, 3, 5), (16, 1, 1), torch.channels_last),
    ((4, 6, 10), None, None),
    ((5, 33), (33,), None),
    ((7,), None, None),
]
CASE_IDS = ["tokens383", "tokens64", "nchw", "nhwc", "nogamma", "2d", "1d"]


def make_inputs(shape, gamma_shape, memory_format, device, dtype, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    residual = torch.randn(shape, generator=g, dtype=torch.float64)
    branch = torch.randn(shape, generator=g, dtype=torch.float64)
    gamma = torch.randn(gamma_shape, generator=g, dtype=torch.float64) if gamma_shape else None
    tensors = [residual, branch, gamma]
    for i, t in enumerate(tensors):
        if t is None:
            continue
        t = t.to(device=device, dtype=dtype)
        if memory_format is not None and t.ndim == 4:
            t = t.contiguous(memory_format=memory_format)
        tensors[i] = t.requires_grad_(requires_grad)
    return tensors


def run_with_grads(fn, residual, branch, gamma, seed=0):
    """Output and gradients of fn(residual, branch, gamma) for a fixed upstream gradient and mask seed."""
    torch.manual_seed(seed)
    out = fn(residual, branch, gamma)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [t for t in (residual, branch, gamma) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_out.to(out), allow_unused=True)
    return [out, *grads]


def timm_style(drop_prob, training):
    """The unfused composition a user would otherwise write: residual + drop_path(branch * gamma)."""

    def fn(residual, branch, gamma):
        scaled = branch if gamma is None else branch * gamma
        return residual + reference.drop_path(scaled, drop_prob, training)

    return fn


def fused(backend, drop_prob, training):
    def fn(residual, branch, gamma):
        with vitops.use_backend(backend):
            return drop_path_add(residual, branch, drop_prob, training, gamma)

    return fn


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape,gamma_shape,memory_format", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("drop_prob,training", [(0.0, True), (0.5, True), (1.0, True), (0.5, False)])
def test_float32_matches_reference(device, backend, shape, gamma_shape, memory_format, drop_prob, training):
    inputs = make_inputs(shape, gamma_shape, memory_format, device, torch.float32)
    got = run_with_grads(fused(backend, drop_prob, training), *inputs)
    want = run_with_grads(timm_style(drop_prob, training), *inputs)
    # Same mask, same products in the same order: the forward is exact. The layout is kept.
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[0].stride() == want[0].stride()
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,gamma_shape,memory_format", CASES[:4], ids=CASE_IDS[:4])
def test_low_precision_error_at_most_twice_unfused(device, backend, dtype, shape, gamma_shape, memory_format):
    """The flash-attention rule: against a float64 ground truth, the fused result's error is at most twice the
    error of the unfused torch ops run in the same dtype (plus one unit of rounding for tiny errors)."""
    inputs = make_inputs(shape, gamma_shape, memory_format, device, dtype)
    exact_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    got = run_with_grads(fused(backend, 0.25, True), *inputs)
    unfused = run_with_grads(timm_style(0.25, True), *inputs)
    exact = run_with_grads(timm_style(0.25, True), *exact_inputs)
    eps = torch.finfo(dtype).eps
    for g, u, e in zip(got, unfused, exact):
        assert g.dtype == u.dtype
        err = (g.double() - e).abs().max().item()
        unfused_err = (u.double() - e).abs().max().item()
        assert err <= 2 * unfused_err + eps * e.abs().max().item(), (err, unfused_err)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape,gamma_shape,memory_format", [CASES[1], CASES[2], CASES[4]], ids=["tokens", "nchw", "nogamma"])
@pytest.mark.parametrize(
    "check,max_size", [(torch.autograd.gradcheck, 4), (torch.autograd.gradgradcheck, 3)], ids=["grad", "gradgrad"]
)
def test_gradchecks_float64(device, backend, shape, gamma_shape, memory_format, check, max_size):
    """First derivatives, and second ones (create_graph=True, e.g. a gradient penalty), through the fused residual."""
    small = (2,) + tuple(min(s, max_size) for s in shape[1:])
    gamma_shape = (small[-1],) if gamma_shape and len(gamma_shape) == 1 else (small[1], 1, 1) if gamma_shape else None
    residual, branch, gamma = make_inputs(small, gamma_shape, memory_format, device, torch.float64)

    def fn(residual, branch, gamma):
        torch.manual_seed(3)  # the same mask on every evaluation
        with vitops.use_backend(backend):
            return drop_path_add(residual, branch, 0.5, True, gamma)

    assert check(fn, (residual, branch, gamma))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs(device, backend):
    # Dense with the channel dim not innermost: walked in place. A strided slice: copied first.
    residual = torch.randn(3, 12, 20, device=device).transpose(1, 2).requires_grad_()
    branch = torch.randn(3, 40, 12, device=device)[:, ::2].requires_grad_()
    gamma = torch.randn(12, device=device, requires_grad=True)
    got = run_with_grads(fused(backend, 0.5, True), residual, branch, gamma)
    want = run_with_grads(timm_style(0.5, True), residual, branch, gamma)
    assert got[0].stride() == residual.stride()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_mixed_precision_branch_matches_autocast_composition(device, backend):
    """Under autocast a block's branch is bfloat16 while the residual stream and gamma stay float32."""
    residual, _, gamma = make_inputs((2, 9, 16), (16,), None, device, torch.float32)
    branch = torch.randn(2, 9, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    got = run_with_grads(fused(backend, 0.5, True), residual, branch, gamma)
    want = run_with_grads(timm_style(0.5, True), residual, branch, gamma)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_dtype_promotion_follows_torch(device, backend):
    residual, branch, _ = make_inputs((2, 3, 4), None, None, device, torch.bfloat16, requires_grad=False)
    gamma = torch.rand(4, device=device, dtype=torch.float32)
    with vitops.use_backend(backend):
        out = drop_path_add(residual, branch, 0.0, False, gamma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, residual.float() + branch.float() * gamma)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_dropped_samples_ignore_non_finite_branch(device, backend):
    residual, branch, gamma = make_inputs((8, 5, 6), (6,), None, device, torch.float32, requires_grad=False)
    torch.manual_seed(0)
    keep = reference.sample_scale(8, 0.5, True, dtype=torch.float32, device=device) != 0
    assert 0 < keep.sum() < 8
    branch[~keep] = float("nan")
    branch[keep, 0, 0] = float("inf")
    torch.manual_seed(0)
    with vitops.use_backend(backend):
        out = drop_path_add(residual, branch, 0.5, True, gamma)
    assert torch.equal(out[~keep], residual[~keep])
    assert torch.isinf(out[keep, 0, 0]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_drop_everything(device, backend):
    residual, branch, gamma = make_inputs((3, 4, 5), (5,), None, device, torch.float32)
    out, g_residual, g_branch, g_gamma = run_with_grads(fused(backend, 1.0, True), residual, branch, gamma)
    assert torch.equal(out, residual)
    assert torch.equal(g_branch, torch.zeros_like(g_branch)) and torch.equal(g_gamma, torch.zeros_like(g_gamma))
    assert torch.equal(g_residual, torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_same_mask_on_every_backend(device, backend):
    residual, branch, gamma = make_inputs((64, 3, 8), (8,), None, device, torch.float32, requires_grad=False)
    torch.manual_seed(7)
    with vitops.use_backend(backend):
        got = drop_path_add(residual, branch, 0.3, True, gamma)
    torch.manual_seed(7)
    with vitops.use_backend("torch"):
        want = drop_path_add(residual, branch, 0.3, True, gamma)
    assert torch.equal(got, want)
    assert not torch.equal(got, residual + branch * gamma / 0.7)  # some samples were dropped


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_path_alone_is_timm_drop_path(device, backend, scale_by_keep):
    x = torch.randn(16, 5, 7, device=device)
    torch.manual_seed(11)
    with vitops.use_backend(backend):
        got = drop_path(x, 0.4, True, scale_by_keep)
    torch.manual_seed(11)
    want = reference.drop_path(x, 0.4, True, scale_by_keep)
    assert torch.equal(got, want)


def test_identity_when_not_training_or_zero_prob():
    x = torch.randn(2, 3)
    assert drop_path(x, 0.5, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    r = torch.randn(2, 3)
    assert torch.equal(drop_path_add(r, x, 0.5, training=False), r + x)


def test_bit_identical_to_timm():
    timm_layers = pytest.importorskip("timm.layers")
    residual, branch, gamma = make_inputs((8, 197, 64), (64,), None, "cpu", torch.float32, requires_grad=False)
    torch.manual_seed(5)
    got = drop_path_add(residual, branch, 0.3, True, gamma)
    torch.manual_seed(5)
    want = residual + timm_layers.drop_path(branch * gamma, 0.3, True)
    assert torch.equal(got, want)
    torch.manual_seed(5)
    assert torch.equal(drop_path(branch, 0.3, True), (torch.manual_seed(5), timm_layers.drop_path(branch, 0.3, True))[1])


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda: (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int64)), TypeError, "branch must be a floating"),
        (lambda: (torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3)), TypeError, "residual must be a floating"),
        (lambda: (torch.ones(2, 3), torch.ones(2, 4)), ValueError, "same shape"),
        (lambda: (torch.ones(2, 3), torch.ones(2, 3, device="meta")), ValueError, "residual is on cpu but branch"),
        (lambda: (torch.ones(2, 3), torch.ones(2, 3), 1.5), ValueError, r"drop_prob must be in \[0, 1\]"),
        (lambda: (torch.ones(2, 3), torch.ones(2, 3), -0.1), ValueError, r"drop_prob must be in \[0, 1\]"),
        (lambda: (torch.ones(2, 3), torch.ones(2, 3), 0.0, False, torch.ones(4)), ValueError, "gamma of shape"),
        (lambda: (torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4), 0.0, False, torch.ones(3)), ValueError, "gamma of shape"),
        (lambda: (torch.ones(2, 3), torch.ones(2, 3), 0.0, False, torch.ones(3, dtype=torch.int64)), TypeError, "gamma must be"),
        (lambda: ([1.0], torch.ones(2, 3)), TypeError, "residual must be a Tensor"),
    ],
)
def test_bad_input_is_named(make_args, error, match):
    with pytest.raises(error, match=match):
        drop_path_add(*make_args())


def test_bad_input_drop_path():
    with pytest.raises(TypeError, match="x must be a floating"):
        drop_path(torch.ones(3, dtype=torch.int64), 0.5, True)
    with pytest.raises(ValueError, match="drop_prob"):
        drop_path(torch.ones(3), 2.0, True)
    with pytest.raises(ValueError, match="batch dim"):
        drop_path(torch.tensor(1.0), 0.5, True)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_op_level_checks_name_the_argument(device, backend):
    """Direct torch.ops calls skip the Python wrapper; every backend checks the op's own arguments alike."""
    fn = torch.ops.vitops.drop_path_add
    x = torch.ones(2, 3, device=device)
    with vitops.use_backend(backend):
        with pytest.raises(TypeError, match="branch must be float32"):
            fn(None, torch.ones(2, 3, dtype=torch.int64, device=device), None, None)
        with pytest.raises(TypeError, match="gamma must be torch.float32|gamma must be Float"):
            fn(x, x, torch.ones(3, dtype=torch.float64, device=device), None)
        with pytest.raises(ValueError, match="sample_scale must have shape"):
            fn(x, x, None, torch.ones(3, device=device))
        with pytest.raises(ValueError, match="residual and branch must have the same shape"):
            fn(torch.ones(2, 4, device=device), x, None, None)


# --- a real custom op: opcheck and torch.compile ----------------------------------------------------------------


def drop_path_add_samples(device):
    """Argument tuples for the forward op, mixing inputs that need gradients with inputs that don't."""
    def t(*shape, dtype=torch.float32, grad=False, memory_format=None):
        x = torch.randn(*shape, device=device, dtype=dtype)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        return x.requires_grad_(grad)

    scale = lambda b, dtype=torch.float32: torch.tensor([0.0, 2.0, 1.25][:b], device=device, dtype=dtype)  # noqa: E731
    return [
        (t(2, 5, 8, grad=True), t(2, 5, 8, grad=True), t(8, grad=True), scale(2)),
        (None, t(3, 4, 6, grad=True), None, scale(3)),
        (t(2, 4, 3, 3), t(2, 4, 3, 3, grad=True), t(4, 1, 1, grad=True), None),
        (t(2, 4, 3, 3, memory_format=torch.channels_last, grad=True),
         t(2, 4, 3, 3, memory_format=torch.channels_last, grad=True), t(4, 1, 1), scale(2)),
        (t(2, 7, grad=True), t(2, 7, dtype=torch.bfloat16, grad=True), t(7, grad=True), scale(2)),
        (t(1, 3, dtype=torch.float64, grad=True), t(1, 3, dtype=torch.float64, grad=True),
         t(3, dtype=torch.float64, grad=True), scale(1, torch.float64)),
    ]


@pytest.mark.parametrize("device,backend", device_backend_params("drop_path_add"))
def test_opcheck_drop_path_add(device, backend):
    with vitops.use_backend(backend):
        for args in drop_path_add_samples(device):
            torch.library.opcheck(torch.ops.vitops.drop_path_add, args)


@pytest.mark.parametrize("device,backend", device_backend_params("drop_path_add"))
def test_opcheck_drop_path_add_backward(device, backend):
    g = torch.randn(2, 5, 8, device=device)
    branch = torch.randn(2, 5, 8, device=device, dtype=torch.bfloat16)
    gamma = torch.randn(8, device=device)
    scale = torch.tensor([0.0, 2.0], device=device)
    for args in [
        (g, branch, gamma, scale, torch.bfloat16, True),
        (g, None, gamma, scale, torch.bfloat16, True),
        (g, branch, gamma, None, torch.bfloat16, False),
        (g, None, None, scale, torch.float32, True),
    ]:
        with vitops.use_backend(backend):
            torch.library.opcheck(torch.ops.vitops.drop_path_add_backward, args)


def block_end(residual, branch, gamma, training):
    return drop_path_add(residual, branch, 0.2, training, gamma) * 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])])
def test_compile_fullgraph_inductor(device):
    residual = torch.randn(4, 9, 16, device=device, requires_grad=True)
    branch = torch.randn(4, 9, 16, device=device, requires_grad=True)
    gamma = torch.randn(16, device=device, requires_grad=True)
    compiled = torch.compile(block_end, fullgraph=True)
    # Eval mode is deterministic, so compiled and eager must agree, gradients included.
    out = compiled(residual, branch, gamma, False)
    grads = torch.autograd.grad(out.sum(), (residual, branch, gamma))
    want = block_end(residual, branch, gamma, False)
    want_grads = torch.autograd.grad(want.sum(), (residual, branch, gamma))
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    # Training draws the mask inside the graph; every sample is either its residual or the full sum.
    out = compiled(residual, branch, gamma, True).detach() / 2
    dropped = (out == residual.detach()).flatten(1).all(1)
    kept = torch.isclose(out, residual + branch * gamma / 0.8, rtol=1e-5, atol=1e-5).flatten(1).all(1)
    assert torch.all(dropped | kept)


@pytest.mark.parametrize("device,backend", device_backend_params("drop_path_add"))
def test_compile_fullgraph_each_backend(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter does not run inside compiled graphs")
    residual = torch.randn(2, 3, 8, device=device, requires_grad=True)
    branch = torch.randn(2, 3, 8, device=device, requires_grad=True)
    gamma = torch.randn(8, device=device, requires_grad=True)
    with vitops.use_backend(backend):
        compiled = torch.compile(block_end, fullgraph=True, backend="aot_eager")
        out = compiled(residual, branch, gamma, False)
        out.sum().backward()
    torch.testing.assert_close(out, block_end(residual, branch, gamma, False))
    assert gamma.grad is not None and branch.grad is not None


# --- the compiled CPU kernel: streaming stores, 64-bit offsets ---------------------------------------------------

CPU_KERNEL = _backend.availability_of("drop_path_add", "cpu")["cpu"]  # None when the compiled kernel runs here
requires_cpu_kernel = pytest.mark.skipif(CPU_KERNEL is not None, reason=f"no compiled CPU kernel: {CPU_KERNEL}")


@requires_cpu_kernel
@pytest.mark.parametrize(
    "shape,gamma_shape,memory_format",
    [((28, 197, 384), (384,), None), ((28, 197, 383), (383,), None), ((8, 64, 64, 64), (64, 1, 1), None),
     ((8, 64, 64, 64), None, torch.channels_last)],
    ids=["vit_s", "c383", "nchw", "nhwc_nogamma"],
)  # fmt: skip
def test_cpu_streaming_stores_are_exact(shape, gamma_shape, memory_format):
    """Float32 outputs of 8 MiB and more are written with SSE streaming stores (csrc/cpu/drop_path_add.cpp), whose
    lanes run the shared per-element functions: the same bits as the reference, including the unaligned ends
    of runs (383 channels) and dropped samples."""
    inputs = make_inputs(shape, gamma_shape, memory_format, "cpu", torch.float32)
    assert inputs[0].numel() * 4 >= 8 << 20
    got = run_with_grads(fused("cpu", 0.3, True), *inputs, seed=4)
    want = run_with_grads(timm_style(0.3, True), *inputs, seed=4)
    assert torch.equal(got[0], want[0]) and got[0].stride() == want[0].stride()
    assert torch.equal(got[2], want[2])  # the branch's gradient
    if gamma_shape is not None:
        torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-3)
    torch.manual_seed(4)
    assert (reference.sample_scale(shape[0], 0.3, True, dtype=torch.float32, device="cpu") == 0).any()


@pytest.mark.slow
@requires_cpu_kernel
def test_cpu_kernels_past_2_31_elements():
    """Forward and backward (with gamma's gradient) on a bfloat16 tensor of 2^31 + 1024 elements: every offset
    must be 64-bit. Costs ~50 s on 2 busy cores and 9.3 GB peak RSS (two 4.3 GB tensors): the input is used as
    residual, branch and upstream gradient alike, and one output lives at a time. Elements are checked at both ends, across the sample boundaries and around
    2^31; gamma's gradient, which sums over everything, holds all of them."""
    channels, rows = 384, 1864136  # (3, rows, 384): 2^31 + 1024 elements, element 2^31 in sample 2
    x = torch.zeros(3, rows, channels, dtype=torch.bfloat16)
    per_sample, numel = rows * channels, x.numel()
    assert 2**31 < numel < 2**31 + 2048
    flat = x.view(-1, channels)  # rows of one channel period each
    windows = [(0, 8), (rows - 8, rows + 8), (2 * rows - 8, 2 * rows + 8), (3 * rows - 16, 3 * rows)]
    assert windows[-1][0] * channels < 2**31 < numel  # the last window holds element 2^31
    g = torch.Generator().manual_seed(0)
    for lo, hi in windows:
        flat[lo:hi] = torch.randn(hi - lo, channels, generator=g).to(torch.bfloat16)
    gamma = torch.randn(channels, generator=g)
    scale = torch.tensor([1.5, 0.0, 0.75])  # sample 1 dropped

    def window_rows(lo, hi):  # the rows' tensors and their samples' scales, in the reference's terms
        return flat[lo:hi], scale[torch.arange(lo, hi) * channels // per_sample]

    with vitops.use_backend("cpu"):
        out = torch.ops.vitops.drop_path_add(x, x, gamma, scale)
        for lo, hi in windows:
            rows_x, rows_scale = window_rows(lo, hi)
            want = reference.drop_path_add(rows_x, rows_x, gamma, rows_scale)
            assert torch.equal(out.view(-1, channels)[lo:hi], want), (lo, hi)
        del out
        grad_branch, grad_gamma = torch.ops.vitops.drop_path_add_backward(x, x, gamma, scale, torch.bfloat16, True)
    for lo, hi in windows:
        rows_x, rows_scale = window_rows(lo, hi)
        want, _ = reference.drop_path_add_backward(rows_x, None, gamma, rows_scale, torch.bfloat16, True)
        assert torch.equal(grad_branch.view(-1, channels)[lo:hi], want), (lo, hi)
    del grad_branch
    rows_x, rows_scale = map(torch.cat, zip(*(window_rows(lo, hi) for lo, hi in windows)))
    exact = reference.drop_path_add_backward(rows_x.double(), rows_x.double(), gamma.double(), rows_scale.double(),
                                             torch.float64, False)[1]  # fmt: skip
    torch.testing.assert_close(grad_gamma.double(), exact, rtol=1e-5, atol=1e-5)


# --- the CUDA kernels, run on the CPU -------------------------------------------------------------------------
# csrc/cuda/drop_path_add.cuh compiled as plain C++ (tests/cpp/elementwise_emulation.cpp, one fiber per CUDA
# thread) with the vector width and launch plan that csrc/cuda/drop_path_add.cu picks. Without a GPU this is what
# checks the kernels' indexing, vector and tail paths, dropped samples and gamma's partial sums; it says nothing
# about their speed.

EMULATION_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
EMULATED_RESIDENT_THREADS = 512  # stands for the GPU's resident threads: two blocks forward, one backward


@pytest.fixture(scope="module")
def cuda_emulation():
    lib = emulation.build("elementwise_emulation")
    pointers, sizes = [ctypes.c_void_p] * 5, [ctypes.c_int64] * 5
    lib.drop_path_add_forward.argtypes = [ctypes.c_int, ctypes.c_int, *pointers, *sizes]
    lib.drop_path_add_backward.argtypes = [ctypes.c_int, ctypes.c_int, *pointers, ctypes.c_void_p, *sizes]
    lib.drop_path_add_forward_one_thread.argtypes = [*pointers, *sizes, ctypes.c_int64]
    lib.drop_path_add_backward_one_thread.argtypes = [*pointers, ctypes.c_void_p, *sizes, ctypes.c_int64]
    lib.drop_path_add_thread_positions.argtypes = [*sizes[:4], ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                                   *[ctypes.POINTER(ctypes.c_int64)] * 2, ctypes.c_int64]  # fmt: skip
    lib.drop_path_add_thread_positions.restype = ctypes.c_int64
    return lib


def emulation_layout(out, gamma):
    """DropPathAddLayout (csrc/drop_path_add.h): numel, per_sample, channels, inner."""
    channels = gamma.shape[0] if gamma is not None else 1
    per_sample = out.numel() // out.shape[0]
    inner = out.stride(out.ndim - gamma.ndim) if channels > 1 else per_sample
    return out.numel(), per_sample, channels, inner


def pointer(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def emulate(lib, residual, branch, gamma, scale, grad_out):
    """(out, grad_branch, grad_gamma, forward vector width, backward vector width) from the emulated kernels."""
    acc = reference.accumulate_dtype(residual.dtype)
    out = torch.empty_like(residual)
    layout = emulation_layout(out, gamma)
    codes = EMULATION_DTYPES[residual.dtype], EMULATION_DTYPES[branch.dtype]
    forward_vec = lib.drop_path_add_forward(*codes, *map(pointer, (residual, branch, gamma, scale, out)), *layout,
                                            EMULATED_RESIDENT_THREADS)  # fmt: skip
    grad_branch = torch.empty_like(branch)
    grad_gamma = torch.empty(layout[2], dtype=acc) if gamma is not None else None
    branch_for_gamma = branch if gamma is not None else None
    backward_vec = lib.drop_path_add_backward(*codes, *map(pointer, (grad_out, branch_for_gamma, gamma, scale)),
                                              *map(pointer, (grad_branch, grad_gamma)), *layout,
                                              EMULATED_RESIDENT_THREADS)  # fmt: skip
    return out, grad_branch, grad_gamma, forward_vec, backward_vec


# (shape, gamma shape, memory format, branch storage offset, vectorized): every path runs, 16-byte vectors
# (4 float32 lanes, 8 16-bit ones, 2 float64) and the scalar one, and each case asserts which it took.
EMULATION_CASES = [
    ((3, 197, 384), (384,), None, 0, True),  # ViT-S tokens: lanes over channels
    ((1, 197, 383), (383,), None, 0, False),  # an odd channel count, batch 1
    ((2, 8, 4, 4), (8, 1, 1), None, 0, True),  # NCHW: a vector inside one channel's map
    ((2, 5, 7, 7), (5, 1, 1), None, 0, False),  # NCHW with odd maps
    ((2, 16, 3, 5), (16, 1, 1), torch.channels_last, 0, True),  # channels_last NCHW: channels innermost
    ((4, 6, 16), None, None, 0, True),  # no LayerScale
    ((3, 7, 16), (16,), None, 1, False),  # a branch that is not 16-byte aligned
]
EMULATION_IDS = ["vit_s", "c383", "nchw", "nchw_odd", "nhwc", "nogamma", "misaligned"]


def emulation_inputs(shape, gamma_shape, memory_format, offset, dtype, branch_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = reference.accumulate_dtype(dtype)

    def make(shape, dtype):
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        return t.contiguous(memory_format=memory_format) if memory_format is not None else t

    residual, grad_out = make(shape, dtype), make(shape, dtype)
    branch = torch.empty(residual.numel() + offset, dtype=branch_dtype)[offset:].as_strided(shape, residual.stride())
    branch.copy_(make(shape, branch_dtype))
    gamma = torch.randn(gamma_shape, generator=g, dtype=torch.float64).to(acc) if gamma_shape else None
    # Sample 1 (when there is one) dropped, the others kept and scaled.
    scale = torch.full((shape[0],), 1 / 0.7, dtype=acc)
    scale[1 : 2] = 0
    return residual, branch, gamma, scale, grad_out


@pytest.mark.parametrize(
    "dtype,branch_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
     (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["f32", "f64", "f16", "bf16", "f32+bf16"],
)  # fmt: skip
@pytest.mark.parametrize("shape,gamma_shape,memory_format,offset,vectorized", EMULATION_CASES, ids=EMULATION_IDS)
def test_cuda_kernels_in_emulation(cuda_emulation, shape, gamma_shape, memory_format, offset, vectorized, dtype,
                                   branch_dtype):  # fmt: skip
    residual, branch, gamma, scale, grad_out = emulation_inputs(shape, gamma_shape, memory_format, offset, dtype,
                                                                branch_dtype)  # fmt: skip
    out, grad_branch, grad_gamma, forward_vec, backward_vec = emulate(cuda_emulation, residual, branch, gamma, scale,
                                                                      grad_out)  # fmt: skip
    assert forward_vec == backward_vec == (16 // branch.element_size() if vectorized else 1)
    # The forward and the branch's gradient are exact: the reference's products in its order, rounded once.
    assert torch.equal(out, reference.drop_path_add(residual, branch, gamma, scale))
    want_branch, _ = reference.drop_path_add_backward(grad_out, None, gamma, scale, branch.dtype, True)
    assert torch.equal(grad_branch, want_branch)
    if gamma is not None:
        exact = reference.drop_path_add_backward(grad_out.double(), branch.double(), gamma.double(), scale.double(),
                                                 torch.float64, False)[1]  # fmt: skip
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(grad_gamma.view(gamma.shape).double(), exact, rtol=tol, atol=tol)
    if shape[0] > 1:  # sample 1 is dropped
        assert torch.equal(out[1], residual[1]) and not grad_branch[1].any()


def test_cuda_kernels_index_in_64_bits(cuda_emulation):
    """One thread of each kernel, far past 2^31 elements (and 2^32 threads) of a logical tensor backed only by
    the few elements it touches: every offset must be computed in 64 bits."""
    lib = cuda_emulation
    channels, per_sample = 8, 2**34 + 8
    numel = 3 * per_sample
    threads = numel // 4  # one position per thread: 4 lanes at 4 * thread
    thread = 2**33 + 2**31 + 1234567  # in sample 2; blockIdx.x * blockDim.x exceeds 2^32
    first = 4 * thread
    positions, samples = (ctypes.c_int64 * 4)(), (ctypes.c_int64 * 4)()
    assert lib.drop_path_add_thread_positions(numel, per_sample, channels, 1, 4, threads, thread, positions,
                                              samples, 4) == 1  # fmt: skip
    assert (positions[0], samples[0]) == (first, first // per_sample) == (first, 2)
    gamma = torch.arange(1.0, channels + 1)
    scale = torch.tensor([3.0, 5.0, 7.0])
    residual, branch, grad_out = torch.randn(4), torch.randn(4), torch.randn(4)
    out, grad_branch, partials = torch.empty(4), torch.empty(4), torch.zeros(4)
    lib.drop_path_add_forward_one_thread(*map(pointer, (residual, branch, gamma, scale, out)), numel, per_sample,
                                         channels, 1, threads, thread)  # fmt: skip
    lane_gamma = gamma[(first + torch.arange(4)) % channels]
    assert torch.equal(out, residual + branch * lane_gamma * 7.0)
    lib.drop_path_add_backward_one_thread(*map(pointer, (grad_out, branch, gamma, scale, grad_branch, partials)),
                                          numel, per_sample, channels, 1, threads, thread)  # fmt: skip
    assert torch.equal(grad_branch, grad_out * 7.0 * lane_gamma)
    assert torch.equal(partials, grad_out * 7.0 * branch)


@pytest.mark.parametrize("channels,inner", [(1, 2**34 + 8), (6, 2**30)], ids=["nogamma", "nchw"])
def test_cuda_thread_walk_in_64_bits(cuda_emulation, channels, inner):
    """A thread's walk through a tensor of 3 * 2^34 elements, stride after stride across sample boundaries:
    for_each_position's running sample must be position // per_sample at every step."""
    per_sample = 2**34 + 8 if channels == 1 else channels * inner
    numel = 3 * per_sample
    capacity = 4096
    positions, samples = (ctypes.c_int64 * capacity)(), (ctypes.c_int64 * capacity)()
    for thread in (0, 1, 2**20 + 3):
        count = cuda_emulation.drop_path_add_thread_positions(numel, per_sample, channels, inner, 4, 2**22, thread,
                                                              positions, samples, capacity)  # fmt: skip
        assert 2 < count <= capacity
        p = list(positions[:count])
        assert p[0] == 4 * thread and p[-1] < numel <= p[-1] + (p[1] - p[0])
        assert all(b - a == p[1] - p[0] for a, b in itertools.pairwise(p))
        assert list(samples[:count]) == [q // per_sample for q in p]
