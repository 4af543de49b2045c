"""What the ops leave behind and what they answer to, beyond their results: memory (RSS flat over 10,000 op calls
and 1,000 optimizer steps), determinism (torch.use_deterministic_algorithms: bit-identical reruns, no atomics in
any kernel), torch.autocast and torch.inference_mode. (That no op writes to an input it does not document is
checked on every fuzzed case: harness.assert_unchanged.)

Autocast: attention and attention_packed follow scaled_dot_product_attention, which CPU and CUDA autocast run in
the autocast dtype: float32 inputs are cast to it (float64 and half inputs are left alone). drop_path_add
promotes like torch.add (autocast's "promote" ops) and fuse_conv_bn keeps the weight's dtype (folding a
BatchNorm is parameter arithmetic, as BatchNorm itself runs in float32): autocast changes neither. The raw
torch.ops.vitops ops compute in the dtypes they are given, under autocast too."""
from __future__ import annotations

import gc
import os
import pathlib
import re

import pytest
import torch

import vitops
from tests.fuzz.harness import backends, on_backend
from vitops.ops import (
    attention,
    attention_packed,
    drop_path,
    drop_path_add,
    fuse_conv_bn,
)
from vitops.optim import AdamP, Lamb

ROOT = pathlib.Path(__file__).resolve().parents[2]
CPU_BACKENDS = ("cpu", "torch")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def op_calls():
    """One round of every op, forward and backward where it has one, on small CPU tensors: (name, thunk, ops
    called)."""
    g = _gen()
    residual = torch.randn(4, 17, 64, generator=g, requires_grad=True)
    branch = torch.randn(4, 17, 64, generator=g, requires_grad=True)
    gamma = torch.randn(64, generator=g, requires_grad=True)
    qkv = torch.randn(2, 17, 3 * 2 * 16, generator=g, requires_grad=True)
    weight = torch.randn(8, 4, 3, 3, generator=g, requires_grad=True)
    stats = [torch.randn(8, generator=g) for _ in range(4)]
    stats[1] = stats[1].abs() + 0.1

    def block_end():
        out = drop_path_add(residual, branch, 0.3, True, gamma)
        torch.autograd.grad(out.sum(), (residual, branch, gamma))  # drop_path_add, drop_path_add_backward

    def attention_block():
        out = attention_packed(qkv, 2)
        torch.autograd.grad(out.sum(), qkv)  # attention_packed, attention_packed_backward

    def split_attention():
        q, k, v = qkv.detach().unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        out = attention(q.requires_grad_(), k, v)
        torch.autograd.grad(out.sum(), q)  # attention, attention_backward

    def fold():
        fused = fuse_conv_bn(weight, stats[2], stats[0], stats[1], stats[3], None)
        torch.autograd.grad(fused[0].sum() + fused[1].sum(), weight)  # fuse_conv_bn

    def stochastic_depth():
        drop_path(branch.detach(), 0.5, True)  # drop_path_add

    return [("drop_path_add", block_end, 2), ("attention_packed", attention_block, 2),
            ("attention", split_attention, 2), ("fuse_conv_bn", fold, 1),
            ("drop_path", stochastic_depth, 1)]  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc (Linux)")
# Growth allowed after the warm-up. Measured (2 shared cores, torch 2.14): 0.01 MB over the 10,000 op calls,
# 0.02 MB over 1,000 Lamb steps, 0 over 1,000 AdamP steps. One leaked output per call (the smallest is 4 KB)
# would be 40 MB over 10,000 calls, a leaked autograd graph more.
RSS_BOUND = 4 * 2**20


@pytest.fixture
def one_thread():
    """aten's flash-attention CPU kernels (the torch backend) spin in OpenMP barriers on a busy 2-core machine:
    25 ms a call instead of 0.3 ms. Memory is what is measured here, so one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_proc
def test_ten_thousand_op_calls_keep_rss_flat(one_thread):
    calls = op_calls()
    per_round = sum(n for _, _, n in calls) * len(CPU_BACKENDS)
    rounds = 10_000 // per_round + 1

    def run(count):
        for _ in range(count):
            for backend in CPU_BACKENDS:
                with on_backend(backend):
                    for _, fn, _ in calls:
                        fn()

    run(rounds // 10)  # warm-up: caches, the allocator's pools, lazily imported modules
    before = settled_rss()
    run(rounds)
    growth = settled_rss() - before
    assert growth < RSS_BOUND, f"RSS grew {growth / 2**20:.1f} MB over {rounds * per_round} op calls"


def small_model(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    g = _gen(1)
    shapes = [(64, 32), (64,), (16, 8, 3, 3), (7,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtypes[i % len(dtypes)])) for i, s in enumerate(shapes)]


@needs_proc
@pytest.mark.parametrize("cls", [Lamb, AdamP], ids=["Lamb", "AdamP"])
def test_thousand_optimizer_steps_keep_rss_flat(cls, one_thread):
    params = small_model(dtypes=(torch.float32, torch.bfloat16, torch.float16))
    grads = [torch.randn(p.shape, generator=_gen(2)).to(p.dtype) * 1e-2 for p in params]
    opt = cls(params, lr=1e-3, weight_decay=0.01)

    def steps(count):
        for _ in range(count):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()

    steps(100)
    before = settled_rss()
    steps(1000)
    growth = settled_rss() - before
    assert growth < RSS_BOUND, f"RSS grew {growth / 2**20:.1f} MB over 1000 {cls.__name__} steps"


# --- determinism --------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def results(fn):
    """The op's outputs and the gradients it gives (every call of fn is the same computation)."""
    torch.manual_seed(0)
    return fn()


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x.detach()]
    return [t for item in x for t in _flat(item)]


DETERMINISM_CASES = {
    "drop_path_add": lambda t: _drop_path_case(t),
    "attention_packed": lambda t: _attention_case(t),
    "fuse_conv_bn": lambda t: _fuse_case(t),
}


def _drop_path_case(backend):
    g = _gen()
    residual, branch = (torch.randn(8, 33, 40, generator=g, requires_grad=True) for _ in range(2))
    gamma = torch.randn(40, generator=g, requires_grad=True)

    def run():
        with on_backend(backend):
            out = drop_path_add(residual, branch, 0.3, True, gamma)
            return out, torch.autograd.grad(out.square().sum(), (residual, branch, gamma))

    return run


def _attention_case(backend):
    qkv = torch.randn(2, 37, 3 * 2 * 24, generator=_gen(), requires_grad=True)

    def run():
        with on_backend(backend):
            out = attention_packed(qkv, 2)
            return out, torch.autograd.grad(out.square().sum(), qkv)

    return run


def _fuse_case(backend):
    g = _gen()
    weight = torch.randn(16, 8, 3, 3, generator=g, requires_grad=True)
    stats = [torch.randn(16, generator=g) for _ in range(4)]

    def run():
        with on_backend(backend):
            out = fuse_conv_bn(weight, stats[0], stats[1], stats[2].abs(), stats[3], None)
            return out, torch.autograd.grad(out[0].sum() + out[1].sum(), weight)

    return run


@pytest.mark.parametrize("op", list(DETERMINISM_CASES))
def test_ops_are_deterministic(op, deterministic):
    """Under torch.use_deterministic_algorithms(True) nothing raises and two runs are bit-identical, forward and
    backward, on every backend."""
    for device, backend in [p.values for p in backends(op) if not p.marks]:
        run = DETERMINISM_CASES[op](backend)
        first, second = _flat(results(run)), _flat(results(run))
        for a, b in zip(first, second):
            assert torch.equal(a, b), f"{op} on {backend}: two runs differ"


@pytest.mark.parametrize("cls", [Lamb, AdamP], ids=["Lamb", "AdamP"])
def test_optimizer_steps_are_deterministic(cls, deterministic):
    for device, backend in [p.values for p in backends("lamb_moments") if not p.marks]:
        finals = []
        for _ in range(2):
            params = small_model(dtypes=(torch.float32, torch.bfloat16))
            opt = cls(params, lr=1e-2, weight_decay=0.05)
            with on_backend(backend):
                for step in range(3):
                    for i, p in enumerate(params):
                        p.grad = torch.randn(p.shape, generator=_gen(10 * step + i)).to(p.dtype)
                    opt.step()
            finals.append([p.detach().clone() for p in params])
        for a, b in zip(*finals):
            assert torch.equal(a, b), f"{cls.__name__} on {backend}: two runs differ"


def test_no_kernel_uses_atomics():
    """Deterministic by construction: no CUDA kernel adds with atomics, no Triton kernel calls tl.atomic_*."""
    sources = [*ROOT.glob("csrc/**/*.cu"), *ROOT.glob("csrc/**/*.cuh"), *ROOT.glob("csrc/**/*.h"),
               *ROOT.glob("vitops/ops/triton/*.py")]  # fmt: skip
    assert sources
    pattern = re.compile(r"\batomic(Add|Sub|Max|Min|CAS|Exch|Inc|Dec|And|Or|Xor)\b|\btl\.atomic_\w+|\bAtomicAdd\b")
    found = [f"{path.relative_to(ROOT)}:{n + 1}" for path in sources
             for n, line in enumerate(path.read_text().splitlines())
             if pattern.search(line.split("//")[0].split("#")[0])]  # fmt: skip
    assert not found, f"atomics (nondeterministic sums) in {found}"


# --- autocast and inference_mode -------------------------------------------------------------------------------


def test_autocast_runs_attention_in_its_dtype_like_sdpa():
    g = _gen()
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(3))
    qkv = torch.randn(2, 9, 3 * 2 * 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v)
        got_packed = attention_packed(qkv, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        raw, _ = torch.ops.vitops.attention(q, k, v, None)  # the op itself computes in what it is given
        double = attention(q.double(), k.double(), v.double())  # autocast leaves float64 alone
    assert got.dtype == got_packed.dtype == sdpa.dtype == torch.bfloat16
    assert torch.equal(got, attention(q.bfloat16(), k.bfloat16(), v.bfloat16()))
    assert torch.equal(got_packed, attention_packed(qkv.bfloat16(), 2))
    assert raw.dtype == torch.float32 and torch.equal(raw, attention(q, k, v))
    assert double.dtype == torch.float64
    torch.testing.assert_close(got, sdpa, rtol=2e-2, atol=2e-2)


def test_autocast_gradients_reach_float32_inputs():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, q, q)
    (grad,) = torch.autograd.grad(out.float().sum(), q)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_autocast_leaves_drop_path_add_and_fuse_conv_bn_alone():
    g = _gen()
    residual, gamma = torch.randn(2, 5, 8, generator=g), torch.randn(8, generator=g)
    branch = torch.randn(2, 5, 8, generator=g).bfloat16()  # what a Linear gives under autocast
    weight, stats = torch.randn(4, 3, 3, 3, generator=g), [torch.rand(4, generator=g) + 0.1 for _ in range(4)]
    outside = (drop_path_add(residual, branch, 0.0, False, gamma), fuse_conv_bn(weight, *stats, None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = (drop_path_add(residual, branch, 0.0, False, gamma), fuse_conv_bn(weight, *stats, None))
    assert inside[0].dtype == torch.float32 and torch.equal(inside[0], outside[0])
    for a, b in zip(inside[1], outside[1]):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("cls", [Lamb, AdamP], ids=["Lamb", "AdamP"])
def test_optimizer_step_ignores_autocast(cls):
    finals = []
    for autocast in (False, True):
        params = small_model()
        opt = cls(params, lr=1e-2, weight_decay=0.05)
        for p in params:
            p.grad = torch.randn(p.shape, generator=_gen(3)).to(p.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            opt.step()
        finals.append([p.detach().clone() for p in params])
    for a, b in zip(*finals):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ("triton",))
def test_inference_mode(backend):
    """Every op runs on inference tensors inside torch.inference_mode and gives what it gives under no_grad; an
    optimizer step inside inference_mode updates the params as outside."""
    if not all(vitops._backend.availability()[op]["cpu"][backend] is None for op in ("drop_path_add", "fuse_conv_bn")):
        pytest.skip(f"{backend} can't run here")
    g = _gen()
    residual, branch, gamma = torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g), torch.randn(16)
    qkv = torch.randn(2, 7, 3 * 2 * 8, generator=g)
    weight, stats = torch.randn(4, 3, 3, 3, generator=g), [torch.rand(4, generator=g) + 0.1 for _ in range(4)]

    def forwards():
        torch.manual_seed(0)
        with on_backend(backend):
            return [drop_path_add(residual, branch, 0.5, True, gamma), drop_path(branch, 0.5, True),
                    attention_packed(qkv, 2), *fuse_conv_bn(weight, *stats, None)]  # fmt: skip

    with torch.no_grad():
        want = forwards()
    with torch.inference_mode():
        got = forwards()
    for a, b in zip(got, want):
        assert a.is_inference() and torch.equal(a, b)

    finals = []
    for mode in (torch.no_grad, torch.inference_mode):
        params = small_model(dtypes=(torch.float32,))
        opt = Lamb(params, lr=1e-2)
        for p in params:
            p.grad = torch.randn(p.shape, generator=_gen(4))
        with mode(), on_backend(backend if backend != "triton" else "torch"):
            opt.step()
        finals.append([p.detach().clone() for p in params])
    for a, b in zip(*finals):
        assert torch.equal(a, b)
