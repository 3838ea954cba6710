"""The reference's attention against a per-row loop written from SPEC.md's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from dmattn import reference
from cases import Case, call_options, make_inputs


def loop_attention(q, k, v, bias, mask, *, window, topk_scope, is_causal, softcap):
    B, Q, H, D = q.shape
    K, H_kv = k.shape[1], k.shape[2]
    vis = reference.visible_mask(bias, mask, B=B, H=H, Q=Q, K=K, window=window, topk_scope=topk_scope,
                                 is_causal=is_causal)
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    lse = torch.full((B, H, Q), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // H_kv)
            for i in range(Q):
                js = [j for j in range(K) if vis[b, h, i, j]]
                s = []
                for j in js:
                    x = float(q[b, i, h] @ k[b, j, g]) / math.sqrt(D)
                    if softcap:
                        x = softcap * math.tanh(x / softcap)
                    if bias is not None:
                        x += float(bias[b % bias.shape[0], h * bias.shape[1] // H, i % bias.shape[2], j])
                    s.append(x)
                if not s:
                    continue
                m = max(s)
                w = [math.exp(x - m) for x in s]
                total = sum(w)
                lse[b, h, i] = m + math.log(total)
                for wj, j in zip(w, js):
                    out[b, i, h] += wj / total * v[b, j, g]
    return out, lse


@pytest.mark.parametrize("case", [
    Case(B=2, Q=6, K=9, H=4, H_kv=2, D=5, window=3, causal=True),
    Case(B=1, Q=9, K=4, H=2, H_kv=1, D=3, bias="b_h_q", mask="b_h_q", window=2, scope="global", causal=True),
    Case(B=1, Q=5, K=5, H=2, H_kv=2, D=4, bias=None, mask="1_1_q", softcap=1.5),
    Case(B=1, Q=7, K=7, H=3, H_kv=1, D=2, ties=True, window=4, causal=True),
], ids=str)
def test_reference_attention_is_the_spec(case):
    q, k, v, bias, mask = make_inputs(case, torch.float64, "cpu")
    out, lse = reference.attention(q, k, v, bias, mask, **call_options(case))
    want_out, want_lse = loop_attention(q, k, v, bias, mask, window=case.window, topk_scope=case.scope,
                                        is_causal=case.causal, softcap=case.softcap)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [
    Case(B=2, Q=6, K=9, H=4, H_kv=2, D=5, window=3, causal=True, softcap=2.0),
    Case(B=2, Q=9, K=4, H=2, H_kv=1, D=3, bias="1_1_q", mask="b_h_q", window=2, scope="global", causal=True),
    Case(B=1, Q=5, K=8, H=4, H_kv=2, D=4, bias="b_h_1", mask="1_1_q"),
    Case(B=2, Q=7, K=7, H=3, H_kv=1, D=2, bias="1_hkv_q", ties=True, window=4, causal=True),
], ids=str)
def test_reference_backward_matches_autograd(case):
    q, k, v, bias, mask = make_inputs(case, torch.float64, "cpu")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out, _ = reference.attention(*leaves, mask, **call_options(case))
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, dout)
    got = reference.attention_backward(q, k, v, bias, mask, dout, **call_options(case))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
