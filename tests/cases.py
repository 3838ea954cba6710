"""Shared test machinery: backends from the registry, input builders, the tolerance rule."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional
from unittest import mock

import pytest
import torch

import dmattn
from dmattn import ops, reference
from dmattn.backends import BACKENDS
from dmattn.problem import make_problem

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Where the Triton selection kernels can be called directly: CPU tensors only under the interpreter.
SELECTION_DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() else [])


def device_for(name: str) -> Optional[str]:
    """The device a backend is tested on here: CUDA when it runs there and a GPU exists, else CPU."""
    types = BACKENDS[name].device_types
    if "cuda" in types and torch.cuda.is_available():
        return "cuda"
    return "cpu" if "cpu" in types else None


def dtypes_for(name: str) -> list[torch.dtype]:
    """The dtypes of a backend that this machine can check meaningfully."""
    out = []
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        if dt not in BACKENDS[name].dtypes:
            continue
        # The Triton interpreter computes bfloat16 wrongly (ENV.md); bf16 is covered on the GPU.
        if dt == torch.bfloat16 and name == "triton" and device_for(name) == "cpu":
            continue
        out.append(dt)
    return out


def unavailable(name: str) -> Optional[str]:
    """Why a backend cannot be tested here (it did not load, or no device of its kinds), or None."""
    b = BACKENDS[name]
    err = b.load_error()
    if err is not None:
        return f"backend {name} unavailable: {err}"
    if device_for(name) is None:
        return f"backend {name}: no device of {sorted(b.device_types)}"
    return None


def backend_params(include_reference: bool = False):
    """One pytest param per registered backend, skipped (with the reason) when it cannot run here."""
    params = []
    for name in BACKENDS:
        if name == "reference" and not include_reference:
            continue
        why = unavailable(name)
        marks = [pytest.mark.skip(reason=why)] if why else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call's shape and options; ``bias``/``mask`` name a broadcast form."""

    B: int = 2
    Q: int = 65
    K: int = 65
    H: int = 4
    H_kv: int = 2
    D: int = 32
    bias: Optional[str] = "b_hkv_1"
    mask: Optional[str] = None
    window: Optional[int] = None
    scope: str = "visible"
    causal: bool = False
    softcap: Optional[float] = None
    ties: bool = False

    def __str__(self):
        f = dataclasses.asdict(self)
        return "-".join(f"{k}{v}" for k, v in f.items() if v not in (None, False))


# Broadcast forms: which of (batch, heads, query) are full (the names say which, "1" = broadcast).
FORMS = {
    "b_hkv_1": ("B", "H_kv", 1), "1_hkv_1": (1, "H_kv", 1), "b_h_1": ("B", "H", 1),
    "1_1_1": (1, 1, 1), "b_h_q": ("B", "H", "Q"), "1_hkv_q": (1, "H_kv", "Q"), "b_1_q": ("B", 1, "Q"),
    "1_1_q": (1, 1, "Q"),
}


def form_shape(case: Case, form: str):
    sizes = dict(B=case.B, H=case.H, H_kv=case.H_kv, Q=case.Q)
    return tuple(sizes[x] if isinstance(x, str) else x for x in FORMS[form]) + (case.K,)


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0, bias_dtype=None):
    """Random q, k, v, bias, mask for a case (mask keeps ~70% of keys; some rows may be empty)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.Q, case.H, case.D, generator=g)
    k = torch.randn(case.B, case.K, case.H_kv, case.D, generator=g)
    v = torch.randn(case.B, case.K, case.H_kv, case.D, generator=g)
    bias = mask = None
    if case.bias is not None:
        bias = torch.randn(form_shape(case, case.bias), generator=g)
        if case.ties:
            bias = torch.randint(0, 3, bias.shape, generator=g).to(torch.float32) * 0.5
    if case.mask is not None:
        mask = torch.rand(form_shape(case, case.mask), generator=g) < 0.7
    cast = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return (cast(q, dtype), cast(k, dtype), cast(v, dtype), cast(bias, bias_dtype or dtype),
            None if mask is None else mask.to(device))


def call_options(case: Case) -> dict:
    return dict(window=case.window, topk_scope=case.scope, is_causal=case.causal, softcap=case.softcap)


def run_with_grads(fn, q, k, v, bias, mask, dout_seed: int = 1):
    """Runs ``fn`` (returning out, lse) and the backward of a random cotangent; returns
    ``(out, lse, dq, dk, dv, dbias)`` (dbias None without bias)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (q, k, v, bias)]
    out, lse = fn(*leaves, mask)
    g = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, dout))
    dq, dk, dv = next(grads), next(grads), next(grads)
    dbias = next(grads) if bias is not None else None
    return out.detach(), lse.detach(), dq, dk, dv, dbias


def reference_fn(case: Case, dtype):
    """The reference at a given precision (float64 inputs give the ground truth)."""
    def fn(q, k, v, bias, mask):
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return reference.attention(cast(q), cast(k), cast(v), cast(bias), mask, **call_options(case))
    return fn


def refused(name: str, case: Case, inputs, **extra) -> bool:
    """Whether backend ``name`` declares reasons against this call (``BACKENDS[name].reasons`` of the
    Problem that ``make_problem`` builds from the inputs, the case's options and ``extra``).

    When it does, this checks that it declines honestly: ``dma_attention(..., backend=name)`` raises
    the dispatcher's ValueError, naming the backend and every one of those reasons, and no op runs.
    The caller then has nothing to compute; when it does not, the caller must check the result."""
    q, k, v, bias, mask = inputs
    options = {**call_options(case), **extra}
    why = BACKENDS[name].reasons(make_problem(q, k, v, bias, mask, **options))
    if not why:
        return False
    ran = AssertionError(f"backend {name!r} declined the call but an op ran: {why}")
    with mock.patch.object(ops, "attention_op", side_effect=ran), pytest.raises(ValueError) as info:
        dmattn.dma_attention(q, k, v, bias, mask, backend=name, **options)
    assert_declined(name, why, info.value)
    return True


def assert_declined(name: str, why: list[str], error: BaseException) -> None:
    """``error`` is the dispatcher's refusal of backend ``name`` and carries every reason in ``why``."""
    text = str(error)
    assert text.startswith(f"backend {name!r} cannot run this call"), text
    for reason in why:
        assert reason in text, f"reason {reason!r} missing from {text!r}"


def first_dtype(name: str) -> torch.dtype:
    """The dtype a single-precision test runs a backend in: float32 where it has it, else the first
    of ``dtypes_for`` (judged by ``assert_close_to_reference`` at that precision)."""
    return dtypes_for(name)[0]


def backend_fn(case: Case, name: str, **extra):
    def fn(q, k, v, bias, mask):
        return dmattn.dma_attention(q, k, v, bias, mask, return_lse=True, backend=name,
                                    **call_options(case), **extra)
    return fn


NAMES = ("out", "lse", "dq", "dk", "dv", "dbias")
# Floor of the tolerance, relative to the magnitude of the true value: a few units in the last place.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_reference(got, low, truth, dtype, label=""):
    """The FlashAttention rule: |kernel - truth| <= 2 |PyTorch at the same precision - truth| + floor,
    per output, where ``truth`` is the float64 reference. -inf lse entries must match exactly."""
    for name, g, lo, t in zip(NAMES, got, low, truth):
        if t is None:
            assert g is None, f"{label}{name}: expected no gradient"
            continue
        assert g is not None, f"{label}{name}: missing"
        assert g.shape == t.shape, f"{label}{name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        g64, lo64, t64 = (x.detach().to("cpu", torch.float64) for x in (g, lo, t))
        assert not torch.isnan(g64).any(), f"{label}{name}: NaN in output"
        inf = torch.isinf(t64)
        assert torch.equal(torch.isinf(g64), inf) and torch.equal(g64[inf], t64[inf]), \
            f"{label}{name}: infinities differ from the reference"
        fin = ~inf
        err = (g64[fin] - t64[fin]).abs().max().item() if fin.any() else 0.0
        base = (lo64[fin] - t64[fin]).abs().max().item() if fin.any() else 0.0
        scale = max(1.0, t64[fin].abs().max().item() if fin.any() else 1.0)
        # lse is float32 whatever the inputs' precision (SPEC), so float64 runs get float32's floor.
        floor = FLOOR[torch.float32 if name == "lse" and dtype == torch.float64 else dtype]
        tol = 2 * base + floor * scale
        assert err <= tol, f"{label}{name}: max error {err:.3g} > tolerance {tol:.3g} (torch {base:.3g})"


# The LIST path (global scope, query-broadcast bias and mask) for the compact-copy tests: lists of
# 100 entries are 4 tiles of 32 under the interpreter (the last one partial), and 200 queries 7
# blocks, so causal calls have FULL tiles, tested tiles and blocks that see nothing.
LIST_BASE = dict(B=2, Q=200, K=200, H=4, H_kv=2, D=32, window=100, scope="global")
LIST_CASES = [
    Case(**LIST_BASE, causal=True),
    Case(**LIST_BASE, causal=False),
    Case(**{**LIST_BASE, "Q": 131, "K": 301}, causal=True),  # Q < K, odd lengths
    Case(**{**LIST_BASE, "Q": 301, "K": 131, "window": 77}, causal=True),  # Q > K: leading rows empty
    Case(**{**LIST_BASE, "Q": 97, "K": 245, "window": 63}, causal=False),
    Case(**{**LIST_BASE, "H": 6, "H_kv": 1}, causal=True),  # MQA
    Case(**{**LIST_BASE, "H": 4, "H_kv": 4}, causal=True),
    Case(**{**LIST_BASE, "bias": "1_hkv_1"}, causal=True),
    Case(**{**LIST_BASE, "bias": "b_h_1"}, causal=True),  # one list per query head
    Case(**{**LIST_BASE, "bias": "1_1_1", "H": 6, "H_kv": 2}, causal=True),  # one list for every head
    Case(**{**LIST_BASE, "mask": "b_hkv_1"}, causal=True),
    Case(**{**LIST_BASE, "mask": "b_hkv_1", "window": 150}, causal=True),  # ~140 allowed keys < w: padding
    Case(**{**LIST_BASE, "mask": "b_hkv_1", "bias": "1_1_1", "window": 150}, causal=False),
    Case(**LIST_BASE, causal=True, softcap=2.5),
]


def list_inputs(case: Case, dtype: torch.dtype):
    """``make_inputs`` on the Triton backend's device, with one selection row of the mask (if any)
    allowing no key, so its heads' rows are empty."""
    q, k, v, bias, mask = make_inputs(case, dtype, device_for("triton"))
    if mask is not None:
        mask[0, 0] = False
    return q, k, v, bias, mask


def brute_death(values: torch.Tensor, allowed, window: int) -> torch.Tensor:
    """death_j = position of the w-th key, in position order, among the allowed keys better than j
    (bias descending, then index ascending), or K; j for a masked key or one dead at birth."""
    K = values.shape[-1]
    v = values.double()
    ok = torch.ones(K, dtype=torch.bool) if allowed is None else allowed
    i = torch.arange(K)
    better = ok[:, None] & ((v[:, None] > v[None, :]) | ((v[:, None] == v[None, :]) & (i[:, None] < i[None, :])))
    death = (better.int().cumsum(0) < window).sum(0)  # first position where w better keys are in
    return torch.where(ok, torch.maximum(death, i), i).to(torch.int32)


def ranking_values(rows: int, K: int, kind: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """(rows, K) bias rows for the selection tests: ``random`` normal values, or ``ties``: three
    values (-0.5, 0, 0.5) with -0.0 next to +0.0 and -inf among them."""
    if kind == "ties":
        t = torch.randint(-1, 2, (rows, K), generator=g) * 0.5
        t[:, 1::5] = -0.0
        t[:, 3::7] = float("-inf")
        return t.to(dtype)
    return torch.randn(rows, K, generator=g).to(dtype)
