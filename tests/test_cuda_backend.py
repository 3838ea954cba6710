"""The ``cuda`` backend through the public API: dispatch order, results and gradients on its two key
paths (LIST, DENSE), honest refusals, and CUDA graph capture. GPU only: skipped without a CUDA
device, without a module carrying the CUDA forward and backward, or below sm_80.

The shared matrix (test_attention.py and friends) covers every case against the reference; this file
pins what is specific to the backend.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dmattn
from cases import (Case, assert_close_to_reference, assert_declined, backend_fn, call_options, make_inputs,
                   reference_fn, run_with_grads)
from dmattn.backends import BACKENDS
from dmattn.problem import make_problem

CUDA = BACKENDS["cuda"]


def _why_not() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA device (none here)"
    if CUDA.load_error() is not None:
        return f"cuda backend unavailable: {CUDA.load_error()}"
    if torch.cuda.get_device_capability() < CUDA.min_capability:
        return f"the cuda backend needs sm_80+, device is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "runs")

DTYPES = (torch.float16, torch.bfloat16)
# LIST: a query-broadcast bias and mask, global scope, causal, GQA, Q != K.
LIST_CASE = Case(B=2, Q=130, K=301, H=4, H_kv=2, D=64, mask="b_hkv_1", window=40, scope="global", causal=True)
# DENSE: no window, a per-query bias and mask, softcap, MQA.
DENSE_CASE = Case(B=2, Q=97, K=97, H=4, H_kv=1, D=128, bias="b_h_q", mask="1_1_q", causal=True, softcap=5.0)


def _head_dim(case: Case) -> int:
    """A case's D, or the smallest built head dim when the build left it out (DMATTN_CUDA_HEADDIMS)."""
    return case.D if case.D in CUDA.head_dims else min(CUDA.head_dims)


def _built(case: Case) -> Case:
    return dataclasses.replace(case, D=_head_dim(case))


def _check(case: Case, dtype) -> None:
    case = _built(case)
    inputs = make_inputs(case, dtype, "cuda")
    assert not CUDA.reasons(make_problem(*inputs, **call_options(case))), "the cuda backend should take this case"
    got = run_with_grads(backend_fn(case, "cuda"), *inputs)
    low = run_with_grads(reference_fn(case, dtype), *inputs)
    truth = run_with_grads(reference_fn(case, torch.float64), *inputs)
    assert_close_to_reference(got, low, truth, dtype, label=f"[cuda {case} {dtype}] ")


def test_auto_takes_cuda_only_where_preferred():
    """Both backends take the LIST case; auto takes cuda ahead of triton exactly where its sm_90a
    kernels run it (an H100/H200 and a build with them for this head dim), else triton."""
    from dmattn import cuda_ext
    case = _built(LIST_CASE)
    q, k, v, bias, _ = make_inputs(case, torch.bfloat16, "cuda")
    e = dmattn.explain(q, k, v, bias, **call_options(case))
    assert e.reasons["cuda"] == [] and e.reasons["triton"] == [], e
    sm90 = torch.cuda.get_device_capability() == (9, 0) and cuda_ext.uses_sm90(case.D)
    assert CUDA.preferred(make_problem(q, k, v, bias, **call_options(case))) == sm90
    assert e.chosen == ("cuda" if sm90 else "triton"), e


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_list_path_matches_reference(dtype):
    q, k, v, bias, mask = make_inputs(_built(LIST_CASE), dtype, "cuda")
    problem = make_problem(q, k, v, bias, mask, **call_options(LIST_CASE))
    assert CUDA.select(problem, bias, mask) is not None, "the case should take the LIST path"
    _check(LIST_CASE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_path_matches_reference(dtype):
    _check(DENSE_CASE, dtype)


@pytest.mark.parametrize("case", [
    Case(B=1, Q=64, K=200, H=4, H_kv=4, D=64, window=30, scope="visible", causal=False),
    Case(B=2, Q=1, K=577, H=8, H_kv=2, D=64, bias="b_h_1", window=100, scope="visible", causal=True),
], ids=str)
def test_visible_scope_where_it_equals_global(case):
    """Visible scope without causality, or with one query, selects what the global scope selects:
    the backend takes it on the LIST path."""
    _check(case, torch.bfloat16)


def test_explain_lists_cuda_reasons():
    case = Case(B=1, Q=33, K=47, D=80, bias="b_h_q", window=20, causal=True)
    q, k, v, bias, mask = make_inputs(case, torch.float32, "cuda")
    e = dmattn.explain(q, k, v, bias, mask, **call_options(case))
    why = e.reasons["cuda"]
    assert any("dtype float32 not supported" in w for w in why), why
    assert any("head dim 80 not supported" in w for w in why), why
    assert any("window_per_query" in w for w in why), why
    assert "cuda" in str(e)
    with pytest.raises(ValueError) as info:
        dmattn.dma_attention(q, k, v, bias, mask, backend="cuda", **call_options(case))
    assert_declined("cuda", why, info.value)
    # The visible scope with causality and Q > 1 runs on the PREFIX path (tests/test_cuda_visible.py).
    visible = _built(Case(B=1, Q=64, K=128, D=64, window=16, scope="visible", causal=True))
    why = dmattn.explain(*make_inputs(visible, torch.float16, "cuda"), **call_options(visible)).reasons["cuda"]
    assert why == [], why


@pytest.mark.parametrize("case", [LIST_CASE, DENSE_CASE], ids=["list", "dense"])
def test_cuda_graph_capture_forward_backward(case):
    """A forward+backward step captured once and replayed on new inputs gives what eager gives
    (bitwise: the kernels are deterministic). Needs allocation through torch and the capture stream
    passed to the kernels, and nothing that synchronises with the host."""
    case = _built(case)
    dtype = torch.bfloat16
    opts = call_options(case)
    static = [t.clone() if t is not None else None for t in make_inputs(case, dtype, "cuda")]
    q, k, v, bias, mask = static
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]
    dout = torch.randn(case.B, case.Q, case.H, case.D, device="cuda", dtype=dtype)

    def step():
        out = dmattn.dma_attention(*leaves, mask, backend="cuda", **opts)
        return (out, *torch.autograd.grad(out, leaves, dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warms the allocator (and compiles any Triton kernel a helper uses)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    fresh = make_inputs(case, dtype, "cuda", seed=7)
    with torch.no_grad():
        for dst, src in zip((q, k, v, bias), fresh):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), captured, want):
        assert torch.equal(a, b), name


def test_selection_helpers_match_triton():
    """``visible_mask`` (the reference's) and ``topk_indices`` (the CUDA radix select) give what the
    Triton backend and the reference give."""
    case = _built(Case(B=2, Q=40, K=90, H=4, H_kv=2, D=64, window=12, scope="global", causal=True))
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda")
    problem = make_problem(q, k, v, bias, mask, **call_options(case))
    for p in (problem, make_problem(q, k, v, bias, mask, **{**call_options(case), "topk_scope": "visible"})):
        assert torch.equal(CUDA.visible_mask(p, bias, mask), BACKENDS["triton"].visible_mask(p, bias, mask))
    want = dmattn.topk_indices(bias.cpu(), 12, backend="reference")
    assert torch.equal(CUDA.topk_indices(bias, mask, 12).cpu(), want)
