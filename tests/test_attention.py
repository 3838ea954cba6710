"""Every backend against the float64 reference: out, lse, dq, dk, dv, dbias, over the SPEC matrix."""

from __future__ import annotations

import itertools

import pytest
import torch

from cases import (Case, assert_close_to_reference, backend_fn, backend_params, device_for, dtypes_for,
                   first_dtype, make_inputs, reference_fn, refused, run_with_grads)


def _matrix() -> list[Case]:
    cases = []
    # Every bias broadcast form, with and without a window, both scopes, causal on and off.
    for bias, (window, scope), causal in itertools.product(
            ["b_hkv_1", "1_hkv_1", "b_h_1", "1_1_1", "b_h_q", "1_hkv_q", "b_1_q"],
            [(None, "visible"), (9, "visible"), (9, "global")], [False, True]):
        cases.append(Case(Q=63, K=65, bias=bias, window=window, scope=scope, causal=causal))
    # Every mask form, alone and with a window.
    for mask, window in itertools.product(["b_hkv_1", "1_1_1", "b_h_q", "1_1_q", "1_hkv_q"], [None, 17]):
        for scope in (["visible", "global"] if window else ["visible"]):
            cases.append(Case(Q=64, K=64, mask=mask, window=window, scope=scope, causal=True))
    cases.append(Case(bias=None, mask="b_h_q", causal=True))
    cases.append(Case(bias=None, mask=None, causal=False))
    # Lengths 1, 63, 64, 65, 577; Q != K both ways (Q > K causal leaves the first rows empty).
    for Q, K in [(1, 1), (1, 577), (577, 1), (63, 64), (64, 65), (65, 63), (577, 577), (130, 61), (17, 200)]:
        for scope in ("visible", "global"):
            cases.append(Case(B=1, Q=Q, K=K, window=min(32, K), scope=scope, causal=True))
    # GQA, MQA and plain multi-head attention; window 1, smaller than K, larger than K.
    for H, H_kv in [(4, 4), (4, 1), (6, 2)]:
        for window in (1, 40, 100):
            cases.append(Case(H=H, H_kv=H_kv, window=window, causal=True))
    # Many ties in the bias: the earlier key must win everywhere.
    for scope, causal in itertools.product(["visible", "global"], [False, True]):
        cases.append(Case(ties=True, window=11, scope=scope, causal=causal))
        cases.append(Case(ties=True, bias="b_h_q", mask="b_1_q", window=7, scope=scope, causal=causal))
    # Softcap, with and without window.
    for window in (None, 13):
        cases.append(Case(softcap=2.5, window=window, causal=True))
    # Head dims.
    for D in (1, 8, 80, 128, 256):
        cases.append(Case(B=1, Q=33, K=47, D=D, window=20, causal=True))
    # Decode and a few queries: kernels that take a kv head's whole group of query rows at once and
    # split the key list over programs; a per-query-head selection, and Q > K with empty rows.
    cases += [Case(Q=1, K=300, H=6, H_kv=2, mask="b_hkv_1", window=50),
              Case(Q=3, K=200, H=4, H_kv=1, bias="1_1_1", window=37, scope="global", causal=True, softcap=2.5),
              Case(B=1, Q=1, K=577, H=4, H_kv=4, bias="b_h_1", window=100, causal=True),
              Case(Q=2, K=130, bias="b_h_1", window=20, scope="global", causal=True),
              Case(Q=5, K=3, window=2, scope="global", causal=True)]
    return cases


MATRIX = _matrix()


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_matches_reference(backend, case):
    device = device_for(backend)
    for dtype in dtypes_for(backend):
        q, k, v, bias, mask = make_inputs(case, dtype, device)
        if refused(backend, case, (q, k, v, bias, mask)):
            continue
        got = run_with_grads(backend_fn(case, backend), q, k, v, bias, mask)
        low = run_with_grads(reference_fn(case, dtype), q, k, v, bias, mask)
        truth = run_with_grads(reference_fn(case, torch.float64), q, k, v, bias, mask)
        assert_close_to_reference(got, low, truth, dtype, label=f"[{backend} {dtype}] ")


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_empty_rows_are_zero_with_zero_gradients(backend):
    """Rows that see no key: out 0, lse -inf, no NaN, and no gradient from them anywhere."""
    case = Case(Q=20, K=12, bias="b_h_q", mask="b_h_q", window=4, causal=True)
    q, k, v, bias, mask = make_inputs(case, first_dtype(backend), device_for(backend))
    mask[:, :, 10:] = False  # rows 10.. see nothing; rows 0..7 see nothing by causality (off = -8)
    if refused(backend, case, (q, k, v, bias, mask)):
        return
    out, lse, dq, dk, dv, dbias = run_with_grads(backend_fn(case, backend), q, k, v, bias, mask)
    empty = torch.zeros(case.Q, dtype=torch.bool)
    empty[:8] = True
    empty[10:] = True
    assert torch.all(out[:, empty] == 0)
    assert torch.all(lse[:, :, empty] == float("-inf"))
    assert torch.all(dq[:, empty] == 0)
    assert torch.all(dbias[:, :, empty] == 0)
    for t in (out, dq, dk, dv, dbias):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_all_minus_inf_bias_rows_are_empty(backend):
    """A row whose visible scores are all -inf (bias -inf) behaves like an empty row."""
    case = Case(Q=16, K=16, bias="b_h_q", window=None, causal=True)
    q, k, v, bias, mask = make_inputs(case, first_dtype(backend), device_for(backend))
    bias[:, :, 3] = float("-inf")
    if refused(backend, case, (q, k, v, bias, mask)):
        return
    out, lse, dq, dk, dv, _ = run_with_grads(backend_fn(case, backend), q, k, v, bias, mask)
    assert torch.all(out[:, 3] == 0) and torch.all(lse[:, :, 3] == float("-inf"))
    assert not any(torch.isnan(t).any() for t in (out, dq, dk, dv))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("scope", ["visible", "global"])
def test_bias_only_training(backend, scope):
    """q, k, v without grad: only dbias is computed, and it matches the reference."""
    case = Case(window=9, scope=scope, causal=True)
    dtype = first_dtype(backend)
    inputs = make_inputs(case, dtype, device_for(backend))
    if refused(backend, case, inputs):
        return
    q, k, v, bias, mask = inputs
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(case.B, case.Q, case.H, case.D, generator=g).to(device=q.device, dtype=dtype)

    def dbias(fn):
        b = bias.clone().requires_grad_(True)
        out = fn(q, k, v, b, mask)[0]
        return torch.autograd.grad(out, b, dout.to(out.dtype))[0]

    got = dbias(backend_fn(case, backend))
    low, truth = dbias(reference_fn(case, dtype)), dbias(reference_fn(case, torch.float64))
    none = (None,) * 5
    assert_close_to_reference(none + (got,), none + (low,), none + (truth,), dtype, label=f"[{backend} {dtype}] ")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("scope", ["visible", "global"])
def test_noncontiguous_inputs(backend, scope):
    """Strided views (transposed heads, sliced keys, expanded bias) give the same result."""
    case = Case(Q=40, K=50, window=12, scope=scope, causal=True)
    device = device_for(backend)
    q, k, v, bias, mask = make_inputs(case, first_dtype(backend), device)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    big_k = torch.randn(case.B, case.K * 2, case.H_kv, case.D, device=device).to(k.dtype)
    big_k[:, ::2] = k
    ks = big_k[:, ::2]
    bs = bias[:1].expand_as(bias)  # stride 0 over the batch
    assert not ks.is_contiguous()
    if refused(backend, case, (qs, ks, v, bs, mask)):
        return
    fn = backend_fn(case, backend)
    want = fn(q, k, v, bs.contiguous(), mask)
    got = fn(qs, ks, v, bs, mask)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck_float64(backend):
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"backend {backend} has no float64 kernels")
    case = Case(B=1, Q=7, K=9, H=2, H_kv=1, D=4, window=4, causal=True, softcap=3.0)
    q, k, v, bias, mask = make_inputs(case, torch.float64, device_for(backend))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    fn = backend_fn(case, backend)
    assert torch.autograd.gradcheck(lambda q, k, v, b: fn(q, k, v, b, mask)[0], leaves)
