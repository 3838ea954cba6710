"""The short host path of an eager call: an inference call skips the custom op's wrapping and runs
the backend directly, with results bitwise equal to the op's; everything that must see the op still
gets it; the fast validation accepts and rejects exactly what the full checks do."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dmattn
from cases import Case, backend_params, call_options, device_for, first_dtype, make_inputs, refused
from dmattn import ops, problem
from dmattn.backends.base import plain

# Decode and few-query calls (the split forward of the Triton LIST path), and one per other path.
CASES = [Case(B=1, Q=1, K=300, H=8, H_kv=2, D=32, window=50),
         Case(B=2, Q=1, K=200, H=4, H_kv=4, bias="b_h_1", mask="b_hkv_1", window=37, causal=True, softcap=2.5),
         Case(B=1, Q=3, K=130, H=4, H_kv=1, bias="1_1_1", window=20, scope="global", causal=True),
         Case(B=1, Q=17, K=40, H=4, H_kv=2, D=16, window=9, causal=True),
         Case(B=1, Q=5, K=33, H=2, H_kv=1, D=16, bias="b_h_q", window=7)]


class _CountOp:
    """Stands in for ``ops._fwd_op``: counts the calls that went through the custom op."""

    def __init__(self):
        self.calls = 0
        self.op = ops._fwd_op

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@pytest.fixture
def op_calls(monkeypatch):
    counter = _CountOp()
    monkeypatch.setattr(ops, "_fwd_op", counter)
    return counter


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_inference_call_runs_directly_and_matches_the_op(backend, case, op_calls):
    q, k, v, bias, mask = make_inputs(case, first_dtype(backend), device_for(backend))
    if refused(backend, case, (q, k, v, bias, mask)):
        return
    options = dict(call_options(case), return_lse=True, backend=backend)
    with torch.no_grad():
        out, lse = dmattn.dma_attention(q, k, v, bias, mask, **options)
    assert op_calls.calls == 0
    # No input requires grad: the op would build no autograd node either, so this runs directly too.
    out2, lse2 = dmattn.dma_attention(q, k, v, bias, mask, **options)
    assert op_calls.calls == 0
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want, want_lse = dmattn.dma_attention(*leaves, bias, mask, **options)
    assert op_calls.calls == 1 and want.requires_grad
    for got, got_lse in ((out, lse), (out2, lse2)):
        assert not got.requires_grad and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want.detach()) and torch.equal(got_lse, want_lse)


def test_inputs_that_require_grad_under_no_grad_run_directly(op_calls):
    """Parameters (requires_grad=True) in an inference call: direct, and detached for the kernels."""
    case = CASES[0]
    q, k, v, bias, mask = make_inputs(case, torch.float32, "cpu")
    bias = torch.nn.Parameter(bias)
    with torch.no_grad():
        out = dmattn.dma_attention(q, k, v, bias, mask, backend="cpu", **call_options(case))
    assert op_calls.calls == 0 and not out.requires_grad
    out_op = dmattn.dma_attention(q, k, v, bias, mask, backend="cpu", **call_options(case))
    assert op_calls.calls == 1 and out_op.requires_grad
    assert torch.equal(out, out_op.detach())


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _cpu_call():
    case = CASES[0]
    q, k, v, bias, mask = make_inputs(case, torch.float32, "cpu")
    return lambda: dmattn.dma_attention(q, k, v, bias, mask, backend="cpu", **call_options(case))


def test_dispatch_modes_see_the_op(op_calls):
    call = _cpu_call()
    with torch.no_grad(), _Recorder() as rec:
        call()
    assert op_calls.calls == 1 and any("dmattn.fwd" in name for name in rec.ops), rec.ops


def test_torch_function_modes_see_the_op(op_calls):
    call = _cpu_call()
    with torch.no_grad(), torch.device("cpu"):
        call()
    assert op_calls.calls == 1


def test_profiler_sees_the_op(op_calls):
    call = _cpu_call()
    with torch.no_grad(), torch.autograd.profiler.profile() as prof:
        call()
    assert op_calls.calls == 1
    assert any("dmattn::fwd" in e.name for e in prof.function_events)


def test_functorch_transforms_see_the_op():
    seen = []

    def f(x):
        seen.append(ops._runs_directly(x, x, x, None, None))
        return x

    torch.func.vmap(f)(torch.ones(2, 3))
    assert seen == [False]
    assert ops._runs_directly(*(torch.ones(1),) * 3, None, None)


def test_compile_under_no_grad_traces_the_op():
    case = CASES[0]
    q, k, v, bias, mask = make_inputs(case, torch.float32, "cpu")
    torch._dynamo.reset()
    fn = lambda q, k, v, b, m: dmattn.dma_attention(q, k, v, b, m, backend="cpu", **call_options(case))  # noqa: E731
    with torch.no_grad():
        eager = fn(q, k, v, bias, mask)
        compiled = torch.compile(fn, fullgraph=True)(q, k, v, bias, mask)
    torch.testing.assert_close(compiled, eager)


def test_plain_detaches_only_what_requires_grad():
    a, b = torch.ones(2), torch.ones(2, requires_grad=True)
    pa, pb, pn = plain(a, b, None)
    assert pa is a and pn is None
    assert pb is not b and not pb.requires_grad and pb.data_ptr() == b.data_ptr()


def _valid_calls():
    """(query, key, value, bias, mask) that make_problem accepts, over the broadcast forms."""
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 7, 2, 8)
    for bias_shape in [(2, 2, 1, 7), (1, 4, 5, 7), (1, 1, 1, 7), (2, 1, 5, 7)]:
        for mask_shape in [None, (1, 2, 1, 7), (2, 4, 5, 7)]:
            mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
            yield q, k, k, torch.randn(bias_shape).half(), mask
    yield torch.randn(1, 1, 3, 256), torch.randn(1, 9, 1, 256), torch.randn(1, 9, 1, 256), None, None


def test_fast_validation_agrees_with_the_full_checks():
    for q, k, v, bias, mask in _valid_calls():
        sizes = problem._check_qkv(q, k, v)
        assert sizes == problem._explain_qkv(q, k, v)
        B, Q, H, D, K, H_kv = sizes
        for name, t, is_mask in (("bias", bias, False), ("mask", mask, True)):
            if t is not None:
                args = (name, t, B, H, H_kv, Q, K, q.device, is_mask)
                got = problem._check_broadcast(*args)
                assert got == problem._explain_broadcast(*args) and type(got) is tuple


def test_host_int_helpers_match_triton():
    triton = pytest.importorskip("triton")
    from dmattn.kernels.triton import topk
    for n in list(range(0, 2100)) + [2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1]:
        assert topk.next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 64, 100):
            assert topk.cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_dlpack_capsules_for_the_compiled_modules():
    from dmattn.backends.base import dlpack
    a, b = torch.arange(6.0).view(2, 3), torch.ones(2, requires_grad=True)
    ca, cb, cn = dlpack(a.t(), b, None)
    assert cn is None
    # The capsule describes the tensor as it is (a strided view, no copy) and holds it alive.
    back = torch.utils.dlpack.from_dlpack(ca)
    assert back.data_ptr() == a.data_ptr() and back.stride() == (1, 3) and torch.equal(back, a.t())
    assert not torch.utils.dlpack.from_dlpack(cb).requires_grad
