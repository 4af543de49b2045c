"""Every op under torch.compile(dynamic=True, fullgraph=True): one compiled graph serves three input shapes (no
recompilation per shape), without a graph break, and gives eager's results, gradients included.

The backend is aot_eager: it traces through the fake kernels and the registered autograd (what inductor sees)
and runs the ops' own kernels, whichever vitops backend is forced (here the compiled CPU kernels, Triton under
its interpreter, which runs inside a compiled graph's eager kernels, and the torch one). Sizes start at 2:
torch.compile specializes sizes 0 and 1 by design."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from tests.fuzz.harness import on_backend, runs_on
from vitops.ops import attention, attention_packed, drop_path_add, fuse_conv_bn
from vitops.optim import reference as optim_reference

SIZES = (5, 7, 11)  # one compiled graph for all three


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _leaf(*shape, seed=0, grad=True, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype).requires_grad_(grad)


def _grads(out, inputs):
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad([o.float().square().sum() for o in outs], leaves) if outs and leaves else ()


# Each case: (op names it covers, fn, inputs for a size n).
def _drop_path_public(n):
    return (_leaf(n, n + 2, 8), _leaf(n, n + 2, 8, seed=1), _leaf(8, seed=2))


def _drop_path_raw(n):
    scale = torch.tensor([0.0, 2.0] * n)[:n]
    return (_leaf(n, 3, n), _leaf(n, 3, n, seed=1), _leaf(n, seed=2), scale)


def _attention_inputs(n):
    return (_leaf(2, 2, n, 16), _leaf(2, 2, n + 3, 16, seed=1), _leaf(2, 2, n + 3, 16, seed=2))


def _fuse_inputs(n):
    var = torch.rand(n, generator=_gen(3)) + 0.1
    return (_leaf(n, 3, 3, 3), _leaf(n, seed=1), _leaf(n, seed=2, grad=False), var, _leaf(n, seed=4), _leaf(n, seed=5))


def _lamb_inputs(n):
    shapes = [(n, 4), (n,), (3, n)]
    lists = [[torch.randn(s, generator=_gen(10 * k + i)) for i, s in enumerate(shapes)] for k in range(4)]
    lists[3] = [t.abs() for t in lists[3]]
    return lists


# The hyperparameters as literals inside the traced functions: floats read from a global are traced as symbols, and
# dynamo restarts the frame to specialize them for the ops.
def _lamb_hyper():
    return 1e-2, 0.9, 0.999, 0.1, 0.5, 0.3, 1e-6, 0.01, 1e-2, False  # lr .. decoupled_decay


def _adamp_hyper():
    return [0.5] * 3, [0.3] * 3, 1e-2, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.1, True  # bias_correction1 .. nesterov


def _lamb_step(params, grads, exp_avgs, exp_avg_sqs):
    ops = torch.ops.vitops
    grad_sq_sum = ops.lamb_grad_sq_sums(grads).sum()
    sums = ops.lamb_moments(params, grads, exp_avgs, exp_avg_sqs, grad_sq_sum, 1.0, *_lamb_hyper(), True)
    ops.lamb_apply(params, exp_avgs, exp_avg_sqs, sums, *_lamb_hyper(), False)
    return params[0] * 1  # a graph output


def _adamp_step(params, grads, exp_avgs, exp_avg_sqs):
    ops = torch.ops.vitops
    row_coefs, tensor_sums = ops.adamp_moments(params, grads, exp_avgs, exp_avg_sqs, *_adamp_hyper())
    ops.adamp_apply(params, grads, exp_avgs, exp_avg_sqs, row_coefs, tensor_sums, [p.numel() for p in params],
                    *_adamp_hyper())  # fmt: skip
    return params[0] * 1


CASES = {
    "drop_path_add": (("drop_path_add", "drop_path_add_backward"),
                      lambda r, b, g: drop_path_add(r, b, 0.0, False, g) * 2, _drop_path_public),
    "drop_path_add_ops": (("drop_path_add", "drop_path_add_backward"),
                          lambda r, b, g, s: torch.ops.vitops.drop_path_add(r, b, g, s), _drop_path_raw),
    "attention": (("attention", "attention_backward"), lambda q, k, v: attention(q, k, v, scale=0.3),
                  _attention_inputs),
    "attention_packed": (("attention_packed", "attention_packed_backward"), lambda qkv: attention_packed(qkv, 2),
                         lambda n: (_leaf(2, n, 3 * 2 * 16),)),
    "fuse_conv_bn": (("fuse_conv_bn",), lambda *t: fuse_conv_bn(*t, eps=1e-3), _fuse_inputs),
    "lamb": (("lamb_grad_sq_sums", "lamb_moments", "lamb_apply"), _lamb_step, _lamb_inputs),
    "adamp": (("adamp_moments", "adamp_apply"), _adamp_step, _lamb_inputs),
}  # fmt: skip


def _mutated_copies(inputs):
    return [[t.clone() for t in x] if isinstance(x, list) else x for x in inputs]


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_graph_for_every_shape(case, backend):
    ops, fn, make = CASES[case]
    if not all(runs_on(op, "cpu", backend) for op in ops):
        pytest.skip(f"{backend} has no kernel of {ops}: it runs on the default backend")
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    with on_backend(backend):
        for n in SIZES:
            inputs = make(n)
            eager_inputs = _mutated_copies(inputs)
            got = compiled(*inputs)
            want = fn(*eager_inputs)
            for g, w in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)
            for g, w in zip(inputs, eager_inputs):  # in-place updates (the optimizer ops) alike
                if isinstance(g, list):
                    for a, b in zip(g, w):
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            for g, w in zip(_grads(got, inputs), _grads(want, eager_inputs)):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for {len(SIZES)} shapes"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_training_drop_path_draws_its_mask_inside_one_graph():
    """The random mask is drawn in the graph (timm's bernoulli_), for every batch size alike."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda r, b: drop_path_add(r, b, 0.5, True), backend=counter, dynamic=True,
                             fullgraph=True)  # fmt: skip
    for n in SIZES:
        residual, branch = _leaf(4 * n, 3, 8, grad=False), _leaf(4 * n, 3, 8, seed=1, grad=False)
        out = compiled(residual, branch)
        kept = torch.isclose(out, residual + 2 * branch, rtol=1e-6, atol=1e-6).flatten(1).all(1)
        dropped = (out == residual).flatten(1).all(1)
        assert torch.all(kept | dropped) and kept.any() and dropped.any()
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "ops_step,reference_step",
    [(_lamb_step, lambda *lists: optim_reference.lamb_step(*lists, 1.0, *_lamb_hyper(), adapt=True, trust_clip=False)),
     (_adamp_step, lambda *lists: optim_reference.adamp_step(*lists, *_adamp_hyper()))],
    ids=["lamb", "adamp"],
)  # fmt: skip
def test_reference_optimizer_step_reads_like_the_ops(ops_step, reference_step):
    """The lamb and adamp cases above are reference.lamb_step's and adamp_step's compositions: keep them in step."""
    lists, want = _lamb_inputs(5), _lamb_inputs(5)
    ops_step(*lists)
    reference_step(*want)
    for a, b in zip(lists, want):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
