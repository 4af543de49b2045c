"""The optimizer ops' CUDA kernels (csrc/cuda/lamb.cuh, adamp.cuh) compiled as plain C++ and run on the CPU
(tests/cpp/optim_emulation.cpp, one emulated CUDA thread per fiber), on the tables the CUDA host code builds,
against the reference; and against the compiled CPU kernels bit for bit where no sum is involved, both running
csrc/lamb.h's and csrc/adamp.h's arithmetic. Without a GPU this is what checks the kernels' multi-tensor indexing
(chunks of whole rows and pieces of one row), block reductions and finalize kernels; it says nothing about their
speed."""
import ctypes
import math

import pytest
import torch

import vitops  # noqa: F401  (loads the compiled ops)
from tests.cpp import emulation
from tests.optim.test_optim import assert_adamp_sums_close
from vitops import _backend
from vitops.optim import reference

CUDA_CHUNK = 1 << 13  # kCudaChunk in csrc/cuda/multi_tensor_kernels.cuh
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cpu/chunk_plan.h's Dtype

# a tensor over several chunks, rows shorter than a chunk (many per chunk), rows longer than one, an empty tensor,
# a rank's empty shard of a 2-D param, a channel of one element
SHAPES = [(3 * CUDA_CHUNK + 5,), (64, 3, 7, 7), (383,), (500, 20), (2, CUDA_CHUNK + 808), (0,), (0, 9), (7, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.float32,
          torch.bfloat16, torch.float16]  # fmt: skip

CPU_KERNELS = _backend.availability()["lamb_moments"]["cpu"]["cpu"] is None  # else only the reference is checked


@pytest.fixture(scope="module")
def cuda():
    """The emulated ops: each takes the op's arguments (one list entry per param) and updates them in place."""
    return Emulated(emulation.build("optim_emulation"))


def _array(ctype, values):
    return (ctype * max(len(values), 1))(*values)


def _pointers(tensors):
    return _array(ctypes.c_void_p, [t.data_ptr() for t in tensors])


def _float_pointer(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


class Emulated:
    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _lists(params):
        return (ctypes.c_int64(len(params)), _array(ctypes.c_int64, [p.numel() for p in params]),
                _array(ctypes.c_int32, [DTYPE_CODES[p.dtype] for p in params]))  # fmt: skip

    @staticmethod
    def _shapes(params):
        return (_array(ctypes.c_int64, [p.ndim for p in params]),
                _array(ctypes.c_int64, [reference.adamp_rows(p) for p in params]))  # fmt: skip

    def lamb_grad_sq_sums(self, grads):
        n, numel, dtype = self._lists(grads)
        out = torch.full((len(grads),), math.nan)
        self.lib.lamb_grad_sq_sums(n, _pointers(grads), numel, dtype, _float_pointer(out))
        return out

    def lamb_moments(self, params, grads, exp_avgs, exp_avg_sqs, grad_sq_sum, max_grad_norm, *hyper, found_inf=None):
        n, numel, dtype = self._lists(params)
        sums = torch.full((len(params), 2), math.nan)
        doubles = [ctypes.c_double(h) for h in (max_grad_norm, *hyper[:9])]
        self.lib.lamb_moments(n, _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
                              numel, dtype, _float_pointer(grad_sq_sum), *doubles, ctypes.c_int(hyper[9]),
                              ctypes.c_int(hyper[10]), _float_pointer(found_inf), _float_pointer(sums))  # fmt: skip
        return sums

    def lamb_apply(self, params, exp_avgs, exp_avg_sqs, sums, *hyper, found_inf=None):
        n, numel, dtype = self._lists(params)
        self.lib.lamb_apply(n, _pointers(params), _pointers(exp_avgs), _pointers(exp_avg_sqs), numel, dtype,
                            _float_pointer(sums), *[ctypes.c_double(h) for h in hyper[:9]], ctypes.c_int(hyper[9]),
                            ctypes.c_int(hyper[10]), _float_pointer(found_inf))  # fmt: skip

    def adamp_moments(self, params, grads, exp_avgs, exp_avg_sqs, bc1, bc2, *hyper, found_inf=None):
        n, numel, dtype = self._lists(params)
        row_coefs = torch.full((sum(reference.adamp_rows(p) for p in params),), math.nan)
        tensor_sums = torch.full((len(params), 5), math.nan)
        self.lib.adamp_moments(n, _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
                               numel, dtype, *self._shapes(params), _array(ctypes.c_double, bc1),
                               _array(ctypes.c_double, bc2), *[ctypes.c_double(h) for h in hyper[:7]],
                               ctypes.c_int(hyper[7]), _float_pointer(found_inf), _float_pointer(row_coefs),
                               _float_pointer(tensor_sums))  # fmt: skip
        return row_coefs, tensor_sums

    def adamp_apply(self, params, grads, exp_avgs, exp_avg_sqs, row_coefs, tensor_sums, full_numels, bc1, bc2,
                    *hyper, found_inf=None):
        n, numel, dtype = self._lists(params)
        self.lib.adamp_apply(n, _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
                             numel, dtype, *self._shapes(params), _float_pointer(row_coefs),
                             _float_pointer(tensor_sums), _array(ctypes.c_int64, full_numels),
                             _array(ctypes.c_double, bc1), _array(ctypes.c_double, bc2),
                             *[ctypes.c_double(h) for h in hyper[:7]], ctypes.c_int(hyper[7]),
                             _float_pointer(found_inf))  # fmt: skip


def _state(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=g) * 0.1).to(d) for s, d in zip(SHAPES, DTYPES)]
    grads = [(torch.randn(s, generator=g) * 0.01).to(d) for s, d in zip(SHAPES, DTYPES)]
    exp_avgs = [torch.randn(s, generator=g) * 1e-3 for s in SHAPES]
    exp_avg_sqs = [torch.rand(s, generator=g) * 1e-4 for s in SHAPES]
    return params, grads, exp_avgs, exp_avg_sqs


def _copy(state):
    return tuple([t.clone() for t in ts] for ts in state)


def _flat(tensors):
    """A list of tensors, or lists of lists of them, as one list."""
    return [t for x in tensors for t in (_flat(x) if isinstance(x, (list, tuple)) else [x])]


def _assert_close(got, want, what):
    for i, (a, b) in enumerate(zip(_flat(got), _flat(want), strict=True)):
        tol = dict(rtol=1e-5, atol=1e-6) if a.dtype == torch.float32 else {}  # else the dtype's resolution
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}[{i}] {tuple(a.shape)}: {m}")


def _assert_equal(got, want, what):
    for i, (a, b) in enumerate(zip(_flat(got), _flat(want), strict=True)):
        assert torch.equal(a, b), f"{what}[{i}] {tuple(a.shape)}: the CUDA kernel's bits differ from the CPU kernel's"


LAMB_CASES = {  # weight_decay, decoupled, adapt, trust_clip, clipped
    "coupled_clipped": (0.01, False, True, False, True),
    "decoupled_trust_clip": (0.05, True, True, True, False),
    "no_adaptation": (0.0, False, False, False, True),
}


def _lamb_hyper(weight_decay, decoupled, lr=1e-2, beta1=0.9, beta2=0.999, step=3):
    return (lr, beta1, beta2, 1 - beta1, 1 - beta1**step, 1 - beta2**step, 1e-6, weight_decay, lr, decoupled)


def test_lamb_grad_sq_sums_in_emulation(cuda):
    grads = _state(0)[1]
    torch.testing.assert_close(cuda.lamb_grad_sq_sums(grads), reference.lamb_grad_sq_sums(grads), rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", list(LAMB_CASES))
def test_lamb_in_emulation(cuda, case):
    """Against the reference; and against the compiled CPU kernels bit for bit: the moments, and the params given
    the same sums (the sums themselves are added in other orders)."""
    weight_decay, decoupled, adapt, trust_clip, clipped = LAMB_CASES[case]
    hyper = _lamb_hyper(weight_decay, decoupled)
    state = _state(0)
    grad_sq_sum = reference.lamb_grad_sq_sums(state[1]).sum() * 100.0 if clipped else None  # above max_grad_norm
    emulated = _copy(state)
    emulated_sums = cuda.lamb_moments(*emulated, grad_sq_sum, 1.0, *hyper, adapt)
    emulated = (emulated[0], emulated[2], emulated[3])
    want = _copy(state)
    want_sums = reference.lamb_moments(*want, grad_sq_sum, 1.0, *hyper, adapt)
    _assert_close(emulated, (want[0], want[2], want[3]), "after lamb_moments")
    torch.testing.assert_close(emulated_sums, want_sums, rtol=1e-5, atol=1e-7)
    cpu = _copy(state)
    if CPU_KERNELS:
        torch.ops.vitops.lamb_moments(*cpu, grad_sq_sum, 1.0, *hyper, adapt)
        _assert_equal(emulated, (cpu[0], cpu[2], cpu[3]), "after lamb_moments")
    if not adapt:
        return
    sums = want_sums * torch.tensor([1.7, 0.6])  # as if other ranks had added theirs: taken as given
    cuda.lamb_apply(*emulated, sums, *hyper, trust_clip)
    after = emulated
    reference.lamb_apply(want[0], want[2], want[3], sums, *hyper, trust_clip)
    _assert_close(after[0], want[0], "params after lamb_apply")
    if CPU_KERNELS:
        torch.ops.vitops.lamb_apply(cpu[0], cpu[2], cpu[3], sums, *hyper, trust_clip)
        _assert_equal(after[0], cpu[0], "params after lamb_apply")


def _adamp_state():
    """Params whose grads take each of AdamP's paths: none, channel-wise and layer-wise projection."""
    params, grads, exp_avgs, exp_avg_sqs = _state(1)
    conv, wide = params[1].float(), params[3].float()
    flat = conv.flatten(1)
    g = torch.randn(flat.shape, generator=torch.Generator().manual_seed(2))
    g = g - (g * flat).sum(1, keepdim=True) / (flat * flat).sum(1, keepdim=True) * flat
    grads[1] = g.view(conv.shape).to(params[1].dtype)
    # rows in equal pairs, grads +row / -row: every row's cosine is 1, the whole tensor's is 0
    wide[1::2] = wide[0::2]
    params[3] = wide.to(params[3].dtype)
    grads[3] = (wide * torch.where(torch.arange(wide.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]).to(params[3].dtype)
    return params, grads, exp_avgs, exp_avg_sqs


def _adamp_hyper(nesterov):
    return (1e-2, 0.9, 0.999, 1e-8, 0.1, 0.1, 0.1, nesterov)


def _bias_corrections():
    steps = [1 + i % 3 for i in range(len(SHAPES))]  # AdamP counts steps per param
    return [1 - 0.9**s for s in steps], [1 - 0.999**s for s in steps]


def test_adamp_test_params_take_every_projection():
    _, tensor_sums = reference.adamp_moments(*_copy(_adamp_state()), *_bias_corrections(), *_adamp_hyper(False))
    failing = tensor_sums[:, 4]
    assert failing[1] == 0 and failing[3] > 0 and failing[4] > 0  # conv: per channel; the others: not
    cosine = tensor_sums[3, 0].abs() / (tensor_sums[3, 1].sqrt() * tensor_sums[3, 2].sqrt())
    assert cosine < 0.1 / math.sqrt(math.prod(SHAPES[3])) / 10  # wide: layer-wise, far below the threshold


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_in_emulation(cuda, nesterov):
    """Against the reference, and against the compiled CPU kernels bit for bit (as for LAMB)."""
    hyper, bc = _adamp_hyper(nesterov), _bias_corrections()
    state = _adamp_state()
    emulated = _copy(state)
    emulated_coefs, emulated_sums = cuda.adamp_moments(*emulated, *bc, *hyper)
    want = _copy(state)
    row_coefs, tensor_sums = reference.adamp_moments(*want, *bc, *hyper)
    _assert_close((emulated[0], emulated[2], emulated[3]), (want[0], want[2], want[3]), "after adamp_moments")
    torch.testing.assert_close(emulated_coefs, row_coefs, rtol=1e-4, atol=1e-6)
    assert_adamp_sums_close(emulated_sums, tensor_sums)
    cpu = _copy(state)
    if CPU_KERNELS:
        torch.ops.vitops.adamp_moments(*cpu, *bc, *hyper)
        _assert_equal(emulated, cpu, "after adamp_moments")
    # Sums as if other ranks had added theirs. The conv's channel test fails on a row elsewhere: it takes the
    # layer-wise projection. The wide param's cosine passes the layer test for its local numel but not for its
    # numel over all ranks: it is not projected.
    tensor_sums = tensor_sums.clone()
    tensor_sums[1, 4] = 1.0
    full_numels = [p.numel() for p in state[0]]
    gg, pp = tensor_sums[3, 1], tensor_sums[3, 2]
    tensor_sums[3, 0] = 0.5 * 0.1 / full_numels[3] ** 0.5 * (gg * pp).sqrt()
    full_numels[3] *= 100
    cuda.adamp_apply(*emulated, row_coefs, tensor_sums, full_numels, *bc, *hyper)
    after = emulated
    reference.adamp_apply(want[0], want[1], want[2], want[3], row_coefs, tensor_sums, full_numels, *bc, *hyper)
    _assert_close(after[0], want[0], "params after adamp_apply")
    if CPU_KERNELS:
        torch.ops.vitops.adamp_apply(*cpu, row_coefs, tensor_sums, full_numels, *bc, *hyper)
        _assert_equal(after[0], cpu[0], "params after adamp_apply")


@pytest.mark.parametrize("grad_sq_sum", [math.nan, math.inf])
def test_lamb_nonfinite_grad_norm_in_emulation(cuda, grad_sq_sum):
    """A NaN or inf grad makes the grads' sum of squares NaN or inf, and the clipping coefficient keeps it, as
    timm's clamp_(min=1) and the reference: every moment NaN, or every finite grad divided by inf (0)."""
    hyper = _lamb_hyper(0.01, False)
    state = _state(0)
    total = torch.tensor(grad_sq_sum)
    emulated, want = _copy(state), _copy(state)
    emulated_sums = cuda.lamb_moments(*emulated, total, 1.0, *hyper, True)
    want_sums = reference.lamb_moments(*want, total, 1.0, *hyper, True)
    for got, expected in zip(_flat((emulated[2], emulated[3], emulated_sums)), _flat((want[2], want[3], want_sums))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, equal_nan=True)
    for moment in _flat((emulated[2], emulated[3])):
        assert moment.isnan().all() if math.isnan(grad_sq_sum) else not moment.isnan().any()


def test_skipped_step_in_emulation(cuda):
    """found_inf nonzero: the CUDA kernels write nothing, bit for bit (NaN grads and all), and their sums are 0;
    zero: they are the kernels without it, bit for bit."""
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    lamb_hyper, adamp_hyper, bc = _lamb_hyper(0.01, False), _adamp_hyper(True), _bias_corrections()
    state = _state(0)
    state[1][0].view(-1)[0] = math.nan
    skipped = _copy(state)
    sums = cuda.lamb_moments(*skipped, torch.tensor(math.nan), 1.0, *lamb_hyper, True, found_inf=one)
    cuda.lamb_apply(skipped[0], skipped[2], skipped[3], torch.ones(len(SHAPES), 2), *lamb_hyper, False, found_inf=one)
    _assert_equal(_flat((skipped[0], skipped[2], skipped[3])), _flat((state[0], state[2], state[3])), "skipped")
    assert not sums.any()
    adamp_state = _adamp_state()
    skipped = _copy(adamp_state)
    skipped[1][0].view(-1)[0] = math.nan
    row_coefs, tensor_sums = cuda.adamp_moments(*skipped, *bc, *adamp_hyper, found_inf=one)
    assert not row_coefs.any() and not tensor_sums.any()
    cuda.adamp_apply(*skipped, torch.ones_like(row_coefs), torch.ones_like(tensor_sums),
                     [p.numel() for p in skipped[0]], *bc, *adamp_hyper, found_inf=one)  # fmt: skip
    _assert_equal(_flat((skipped[0], skipped[2], skipped[3])), _flat((adamp_state[0], adamp_state[2], adamp_state[3])),
                  "skipped")  # fmt: skip
    state = _state(0)
    flagged, plain = _copy(state), _copy(state)
    total = reference.lamb_grad_sq_sums(state[1]).sum() * 100.0
    _assert_equal(cuda.lamb_moments(*flagged, total, 1.0, *lamb_hyper, True, found_inf=zero),
                  cuda.lamb_moments(*plain, total, 1.0, *lamb_hyper, True), "sums")  # fmt: skip
    _assert_equal(flagged, plain, "after lamb_moments")
    flagged, plain = _copy(adamp_state), _copy(adamp_state)
    _assert_equal(cuda.adamp_moments(*flagged, *bc, *adamp_hyper, found_inf=zero),
                  cuda.adamp_moments(*plain, *bc, *adamp_hyper), "sums")  # fmt: skip
    _assert_equal(flagged, plain, "after adamp_moments")
