"""drop_path and drop_path_add: every backend against the reference and timm, forward and backward."""
import pytest
import torch

import vitops
from vitops.ops import drop_path, drop_path_add, reference
from tests.conftest import device_backend_params

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
def test_gradcheck_float64(device, backend, shape, gamma_shape, memory_format):
    small = (2,) + tuple(min(s, 4) for s in shape[1:])
    gamma_shape = (small[-1],) if gamma_shape and len(gamma_shape) == 1 else (small[1], 1, 1) if gamma_shape else None
    residual, branch, gamma = make_inputs(small, gamma_shape, memory_format, device, torch.float64)

    def fn(residual, branch, gamma):
        torch.manual_seed(3)  # the same mask on every evaluation
        with vitops.use_backend(backend):
            return drop_path_add(residual, branch, 0.5, True, gamma)

    assert torch.autograd.gradcheck(fn, (residual, branch, gamma))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape,gamma_shape,memory_format", [CASES[1], CASES[2], CASES[4]], ids=["tokens", "nchw", "nogamma"])
def test_gradgradcheck_float64(device, backend, shape, gamma_shape, memory_format):
    """Second derivatives (create_graph=True, e.g. a gradient penalty) through the fused residual."""
    small = (2,) + tuple(min(s, 3) for s in shape[1:])
    gamma_shape = (small[-1],) if gamma_shape and len(gamma_shape) == 1 else (small[1], 1, 1) if gamma_shape else None
    residual, branch, gamma = make_inputs(small, gamma_shape, memory_format, device, torch.float64)

    def fn(residual, branch, gamma):
        torch.manual_seed(3)  # the same mask on every evaluation
        with vitops.use_backend(backend):
            return drop_path_add(residual, branch, 0.5, True, gamma)

    assert torch.autograd.gradgradcheck(fn, (residual, branch, gamma))


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


@pytest.mark.parametrize("op", ["drop_path_add", "drop_path_add_triton"])
def test_op_level_checks_name_the_argument(op):
    """Direct torch.ops calls skip the Python wrapper; the kernels check their own arguments."""
    if not hasattr(torch.ops.vitops, op):
        pytest.skip(f"{op} is not registered here")
    fn = getattr(torch.ops.vitops, op)
    x = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="branch must be float32"):
        fn(None, torch.ones(2, 3, dtype=torch.int64), None, None)
    with pytest.raises(RuntimeError, match="gamma must be torch.float32|gamma must be Float"):
        fn(x, x, torch.ones(3, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="sample_scale must have shape"):
        fn(x, x, None, torch.ones(3))
    with pytest.raises(RuntimeError, match="residual and branch must have the same shape"):
        fn(torch.ones(2, 4), x, None, None)
