"""Key selection: the reference against a brute force written from SPEC.md's words, and every
backend's ``topk_mask`` / ``topk_indices`` against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch

import dmattn
from dmattn import api, reference
from dmattn.backends import BACKENDS
from cases import assert_declined, backend_params, device_for


def brute_visible(bias, mask, B, H, Q, K, window, scope, causal):
    """SPEC "Which keys query i sees", one (b, h, i) at a time with Python lists."""
    off = K - Q
    out = torch.zeros(B, H, Q, K, dtype=torch.bool)
    for b, h, i in itertools.product(range(B), range(H), range(Q)):
        bb = lambda t: t[b % t.shape[0], h * t.shape[1] // H, i % t.shape[2]]  # noqa: E731
        allowed = [bool(bb(mask)[j]) if mask is not None else True for j in range(K)]
        cvis = [j <= i + off for j in range(K)]
        if window is None:
            vis = [a and (c or not causal) for a, c in zip(allowed, cvis)]
        else:
            row = bb(bias)
            cands = [j for j in range(K) if allowed[j] and (cvis[j] or not (causal and scope == "visible"))]
            ranked = sorted(cands, key=lambda j: (-float(row[j]), j))
            chosen = set(ranked[:window])
            vis = [j in chosen and (cvis[j] or not causal) for j in range(K)]
        out[b, h, i] = torch.tensor(vis)
    return out


def _bias(shape, ties, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if ties:
        return (torch.randint(0, 3, shape, generator=g) * 0.25).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


SEL_CASES = [
    # (B, H, Q, K, bias shape, mask shape or None, window)
    (2, 2, 7, 9, (2, 2, 1, 9), None, 3),
    (1, 4, 9, 6, (1, 2, 1, 6), (1, 4, 1, 6), 2),
    (2, 2, 5, 11, (1, 2, 5, 11), (2, 1, 1, 11), 4),
    (1, 2, 12, 12, (1, 1, 1, 12), (1, 2, 12, 12), 5),
    (1, 1, 1, 10, (1, 1, 1, 10), None, 20),
    (1, 1, 10, 1, (1, 1, 10, 1), None, 1),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scope", ["visible", "global"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sel", SEL_CASES, ids=str)
def test_reference_selection_is_the_spec(sel, causal, scope, ties):
    B, H, Q, K, bshape, mshape, window = sel
    bias = _bias(bshape, ties)
    mask = None if mshape is None else torch.rand(mshape, generator=torch.Generator().manual_seed(3)) < 0.7
    for w in (None, window):
        got = reference.visible_mask(bias, mask, B=B, H=H, Q=Q, K=K, window=w, topk_scope=scope,
                                     is_causal=causal)
        assert torch.equal(got, brute_visible(bias, mask, B, H, Q, K, w, scope, causal))


def test_reference_properties():
    """Consequences of the SPEC that hold for any input."""
    bias = _bias((2, 3, 1, 40), ties=True)
    kw = dict(B=2, H=3, Q=30, K=40)
    full = reference.visible_mask(bias, None, **kw, is_causal=True)
    for scope in ("visible", "global"):
        # A window at least K keeps everything.
        assert torch.equal(reference.visible_mask(bias, None, **kw, window=40, topk_scope=scope,
                                                  is_causal=True), full)
        # Each query sees at most `window` keys.
        vis = reference.visible_mask(bias, None, **kw, window=7, topk_scope=scope, is_causal=True)
        assert vis.sum(-1).max() <= 7
    # Without causality both scopes are the same selection.
    a = reference.visible_mask(bias, None, **kw, window=7, topk_scope="visible")
    b = reference.visible_mask(bias, None, **kw, window=7, topk_scope="global")
    assert torch.equal(a, b)
    # Visible scope, causal: every query whose prefix holds >= w keys sees exactly w.
    vis = reference.visible_mask(bias, None, **kw, window=7, topk_scope="visible", is_causal=True)
    prefix = torch.arange(30) + 10 + 1
    assert torch.equal(vis.sum(-1)[0, 0], torch.clamp(prefix, max=7))


def selection_refused(backend, call, bias, mask, query_len, **options) -> bool:
    """Whether ``backend`` declares reasons against this selection call (the Problem the helpers
    build: sizes from bias/mask, float32 stand-ins of head dim 1 for q/k/v); if so, checks that
    ``call()`` raises the dispatcher's ValueError naming every reason."""
    why = BACKENDS[backend].reasons(api._selection_problem(bias, mask, query_len, **options))
    if not why:
        return False
    with pytest.raises(ValueError) as info:
        call()
    assert_declined(backend, why, info.value)
    return True


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("sel", SEL_CASES, ids=str)
def test_topk_mask_matches_reference(backend, sel, bias_dtype):
    B, H, Q, K, bshape, mshape, window = sel
    device = device_for(backend)
    # bfloat16 rounding makes ties common: exactly the case the tie rule exists for.
    bias = _bias(bshape, ties=False, dtype=bias_dtype).to(device)
    mask = None if mshape is None else (torch.rand(mshape, generator=torch.Generator().manual_seed(3)) < 0.7).to(device)
    for causal, scope in itertools.product([False, True], ["visible", "global"]):
        call = lambda: dmattn.topk_mask(bias, window, mask, is_causal=causal, topk_scope=scope,  # noqa: E731
                                        query_len=Q, backend=backend)
        if selection_refused(backend, call, bias, mask, Q, window=window, topk_scope=scope, is_causal=causal):
            continue
        got = call()
        Hs = max(bshape[1], 1 if mshape is None else mshape[1])
        Bs = max(bshape[0], 1 if mshape is None else mshape[0])
        want = reference.visible_mask(bias.cpu(), None if mask is None else mask.cpu(), B=Bs, H=Hs, Q=Q, K=K,
                                      window=window, topk_scope=scope, is_causal=causal)
        assert torch.equal(got.cpu(), want), (causal, scope)


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("sel", SEL_CASES, ids=str)
def test_topk_indices_matches_reference(backend, sel):
    B, H, Q, K, bshape, mshape, window = sel
    device = device_for(backend)
    bias = _bias(bshape, ties=True).to(device)
    mask = None if mshape is None else (torch.rand(mshape, generator=torch.Generator().manual_seed(3)) < 0.5).to(device)
    call = lambda: dmattn.topk_indices(bias, window, mask, backend=backend)  # noqa: E731
    if selection_refused(backend, call, bias, mask, None, window=window, topk_scope="global", is_causal=False):
        return
    got = call().cpu()
    want = reference.topk_indices(bias.cpu(), window, None if mask is None else mask.cpu())
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_reference_topk_indices_pads_with_minus_one():
    bias = torch.tensor([[[[3.0, 1.0, 3.0, 2.0]]]])
    mask = torch.tensor([[[[True, False, True, False]]]])
    assert reference.topk_indices(bias, 3, mask).tolist() == [[[[0, 2, -1]]]]
    assert reference.topk_indices(bias, 2).tolist() == [[[[0, 2]]]]
    assert reference.topk_indices(bias, 1).tolist() == [[[[0]]]]
