"""The shared tests against a backend that declines part of the SPEC, on any machine.

A fake ``partial`` backend runs the CPU kernels but declares what the CUDA backend declares
(float16/bfloat16 only, two head dims, no window over a per-query bias or mask, no visible scope
with causality and Q > 1) and is registered for the duration of each test. The shared test bodies
then run against it unchanged: every call it declares it can compute is checked against the
reference, and every call it declines must raise the dispatcher's ValueError with its reasons,
never reach a kernel, and never turn into a skip.
"""

from __future__ import annotations

import pytest
import torch

import test_attention
import test_compile
import test_determinism
import test_hypothesis
import test_selection
from cases import Case, make_inputs, refused
from dmattn.backends import BACKENDS
from dmattn.backends.base import ALL_FEATURES
from dmattn.backends.cpu import CpuBackend
from dmattn.problem import make_problem

NAME = "partial"


class PartialBackend(CpuBackend):
    name = NAME
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = frozenset({32, 64})
    features = ALL_FEATURES - {"window_per_query"}
    auto_devices = frozenset()

    def __init__(self):
        self.calls = 0

    def extra_reasons(self, problem):
        p = problem
        if (p.effective_window is not None and p.topk_scope == "visible" and p.is_causal and p.Q > 1
                and p.query_broadcast):
            return ["fake: no visible scope with is_causal and Q > 1"]
        return []

    def forward(self, problem, q, k, v, bias, mask):
        assert not self.reasons(problem), "a kernel ran for a problem the backend declines"
        self.calls += 1
        return super().forward(problem, q, k, v, bias, mask)

    def backward(self, problem, dout, q, k, v, bias, mask, out, lse, needs):
        assert not self.reasons(problem), "a kernel ran for a problem the backend declines"
        return super().backward(problem, dout, q, k, v, bias, mask, out, lse, needs)


@pytest.fixture
def partial(monkeypatch):
    backend = PartialBackend()
    if backend.load_error() is not None:
        pytest.skip(f"the fake backend runs the CPU kernels, unavailable: {backend.load_error()}")
    monkeypatch.setitem(BACKENDS, NAME, backend)
    return backend


ACCEPTED = Case(D=32, window=9, scope="global", causal=True)
DECLINED = Case(D=16, bias="b_h_q", window=9, causal=True)


def test_declarations_split_the_cases(partial):
    """The two kinds this file relies on exist: one case accepted, one declined for several reasons."""
    assert not refused(NAME, ACCEPTED, make_inputs(ACCEPTED, torch.float16, "cpu"))
    inputs = make_inputs(DECLINED, torch.float32, "cpu")
    why = partial.reasons(make_problem(*inputs, window=9, topk_scope="visible", is_causal=True))
    assert why == ["dtype float32 not supported (supports bfloat16, float16)",
                   "head dim 16 not supported (supports 32, 64)", "does not implement window_per_query"]
    assert refused(NAME, DECLINED, inputs)
    assert partial.calls == 0


def test_refused_fails_when_the_message_drops_a_reason(partial, monkeypatch):
    """The refusal check is not vacuous: a dispatcher error without the reasons fails it."""
    from dmattn import dispatch

    def vague(problem, backend="auto"):
        raise ValueError(f"backend {backend!r} cannot run this call")

    monkeypatch.setattr(dispatch, "select", vague)
    with pytest.raises(AssertionError, match="missing from"):
        refused(NAME, DECLINED, make_inputs(DECLINED, torch.float16, "cpu"))


@pytest.mark.parametrize("case", test_attention.MATRIX[::5], ids=str)
def test_matrix(partial, case):
    test_attention.test_matches_reference(NAME, case)


def test_matrix_sample_has_both_kinds(partial):
    verdicts = {refused(NAME, c, make_inputs(c, torch.float16, "cpu")) for c in test_attention.MATRIX[::5]}
    assert verdicts == {True, False}


@pytest.mark.parametrize("test,runs", [(test_attention.test_empty_rows_are_zero_with_zero_gradients, False),
                                       (test_attention.test_all_minus_inf_bias_rows_are_empty, True)],
                         ids=["empty_rows", "minus_inf_rows"])
def test_single_case_tests(partial, test, runs):
    test(NAME)
    assert (partial.calls > 0) == runs


@pytest.mark.parametrize("scope", ["visible", "global"])
@pytest.mark.parametrize("test", [test_attention.test_bias_only_training, test_attention.test_noncontiguous_inputs],
                         ids=lambda f: f.__name__)
def test_scoped_tests(partial, test, scope):
    before = partial.calls
    test(NAME, scope)
    assert (partial.calls > before) == (scope == "global")


@pytest.mark.parametrize("case", [Case(B=2, Q=130, K=130, H=4, H_kv=1, window=20, causal=True),
                                  Case(B=2, Q=130, K=130, H=4, H_kv=1, window=20, scope="global", causal=True)],
                         ids=str)
def test_deterministic_cases(partial, case):
    test_determinism.test_bitwise_reproducible(NAME, case)


def test_hypothesis_shapes(partial):
    test_hypothesis.test_random_shapes(NAME)
    assert partial.calls > 0


@pytest.mark.parametrize("case", test_compile.CASES, ids=str)
def test_compile_and_opcheck(partial, case):
    before = partial.calls
    test_compile.test_compile_fullgraph_matches_eager(NAME, case)
    test_compile.test_opcheck_forward(NAME, True, case)
    test_compile.test_opcheck_backward(NAME, case)
    assert (partial.calls > before) == (case.D in partial.head_dims)


@pytest.mark.parametrize("sel", test_selection.SEL_CASES[:2], ids=str)
def test_selection_helpers(partial, sel):
    """Selection-only calls carry float32 stand-ins of head dim 1: this backend declines them all."""
    test_selection.test_topk_mask_matches_reference(NAME, sel, torch.float32)
    test_selection.test_topk_indices_matches_reference(NAME, sel)
