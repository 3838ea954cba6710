"""Backend selection: declarations, explain, the environment override, ``python -m dmattn``."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

import dmattn
from dmattn import dispatch
from dmattn.backends import BACKENDS
from dmattn.backends.base import ALL_FEATURES


def _args(device="cpu"):
    return (torch.randn(1, 8, 4, 16, device=device), torch.randn(1, 8, 2, 16, device=device),
            torch.randn(1, 8, 2, 16, device=device), torch.randn(1, 2, 1, 8, device=device))


def test_registry_order_and_reference_is_by_name_only():
    assert dmattn.backends()[-1] == "reference"
    # Triton first; the cuda backend is taken ahead of it only for the calls it says it is preferred
    # for (its sm_90a LIST path, measured faster: docs/performance.md).
    assert dmattn.backends().index("triton") < dmattn.backends().index("cuda")
    assert not BACKENDS["reference"].auto_devices
    assert "cpu" in BACKENDS["cpu"].auto_devices


def test_explain_lists_every_backend():
    e = dmattn.explain(*_args(), window=4, is_causal=True)
    assert set(e.reasons) == set(BACKENDS)
    assert "only used on cpu when requested by name" in " ".join(e.reasons["reference"])
    text = str(e)
    for name in BACKENDS:
        assert name in text
    if not BACKENDS["cpu"].reasons(dispatch_problem()):
        assert e.chosen == "cpu"


def dispatch_problem():
    from dmattn.problem import make_problem
    q, k, v, b = _args()
    return make_problem(q, k, v, b, window=4)


def test_explain_named_backend():
    e = dmattn.explain(*_args(), backend="reference")
    assert e.chosen == "reference" and e.requested == "reference"


def test_env_override(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select(dispatch_problem()).name == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=f"got 'bogus' \\(from {dispatch.ENV_VAR}\\)"):
        dispatch.select(dispatch_problem())


def test_explicit_backend_beats_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    assert dispatch.select(dispatch_problem(), "reference").name == "reference"


def test_deterministic_declined_with_reason():
    class NotDeterministic(type(BACKENDS["reference"])):
        name = "nd"
        deterministic = False
    from dmattn.problem import make_problem
    q, k, v, b = _args()
    p = make_problem(q, k, v, b, deterministic=True)
    assert "cannot promise deterministic=True" in NotDeterministic().reasons(p)


def test_module_report_runs():
    out = subprocess.run([sys.executable, "-m", "dmattn"], capture_output=True, text=True, check=True).stdout
    assert "dmattn" in out and "backends" in out
    for name in BACKENDS:
        assert name in out


def test_cuda_declarations():
    from dmattn import cuda_ext
    b = BACKENDS["cuda"]
    assert b.device_types == {"cuda"} and b.auto_devices == {"cuda"}
    assert b.dtypes == {torch.float16, torch.bfloat16}
    assert b.min_capability == (8, 0) and b.deterministic
    assert b.features == ALL_FEATURES - {"window_per_query"}
    built = cuda_ext.has_forward() and cuda_ext.has_backward()
    assert bool(b.head_dims) == built
    if not built:
        assert b.load_error() is not None and not set(b.head_dims)
    # Unavailable here, the one reason says why (a problem on any device gets only that reason).
    if b.load_error() is not None:
        assert b.reasons(dispatch_problem()) == [f"not available: {b.load_error()}"]


@pytest.mark.parametrize("has_visible", [True, False], ids=["visible-kernels", "older-module"])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("Q,scope,causal", [(8, "visible", True), (8, "global", True), (8, "visible", False),
                                            (1, "visible", True)])
def test_cuda_reasons_for_the_visible_prefix_path(Q, scope, causal, bias_dtype, has_visible, monkeypatch):
    """The CUDA backend computes the visible scope with causality and Q > 1 (each query's own top-w
    of its prefix, the PREFIX path) when its module has the visible-scope kernels, over a 16- or
    32-bit bias; otherwise it declines, and the reason points to the backend that has one."""
    from dmattn import cuda_ext
    from dmattn.problem import make_problem
    monkeypatch.setattr(cuda_ext, "has_visible", lambda: has_visible)
    q = torch.randn(1, Q, 4, 32)
    k = torch.randn(1, 8, 2, 32)
    bias = torch.randn(1, 2, 1, 8, dtype=bias_dtype)
    p = make_problem(q, k, k, bias, window=4, topk_scope=scope, is_causal=causal)
    why = BACKENDS["cuda"].extra_reasons(p)
    prefix = Q > 1 and scope == "visible" and causal
    declined = prefix and (not has_visible or bias_dtype == torch.float64)
    assert bool(why) == declined
    if declined:
        assert "triton" in why[0] and "visible" in why[0]
        assert ("float64" in why[0]) == has_visible
    if Q == 1:
        return
    # Per-query bias: the declared feature says it, not a second reason.
    p4 = make_problem(q, k, k, torch.randn(1, 2, Q, 8), window=4, topk_scope=scope, is_causal=causal)
    assert "window_per_query" in p4.features and BACKENDS["cuda"].extra_reasons(p4) == []


def _cuda_problem(**over):
    """A Problem on a CUDA device, built without tensors (none are needed to dispatch)."""
    from dmattn.problem import Problem
    fields = dict(B=1, Q=4096, K=4096, H=8, H_kv=2, D=128, dtype=torch.bfloat16, device=torch.device("cuda", 0),
                  bias_shape=(1, 2, 1, 4096), bias_dtype=torch.bfloat16, mask_shape=None, window=512,
                  topk_scope="global", is_causal=True, scale=128 ** -0.5, softcap=None, deterministic=False)
    fields.update(over)
    return Problem(**fields)


@pytest.mark.parametrize("over, expected", [
    ({}, True),
    (dict(D=64), True),
    (dict(Q=1, topk_scope="visible"), True),           # decode: one query ranks the same keys either way
    (dict(is_causal=False, topk_scope="visible"), True),
    (dict(topk_scope="visible"), False),               # per-query prefixes: the PREFIX path
    (dict(window=None), False),                        # no window: every key
    (dict(window=4096), False),                        # a window that keeps every key is none
    (dict(bias_shape=(1, 2, 4096, 4096)), False),      # per-query bias: declined for windows anyway
    (dict(D=96), False),                               # no sm_90a kernels for this head dim
    (dict(dtype=torch.float32), False),
    (dict(device=torch.device("cpu")), False),
])
def test_cuda_preferred_for_its_sm90_list_path(over, expected, monkeypatch):
    """The cuda backend asks auto dispatch to take it ahead of triton exactly on the calls that run
    its sm_90a LIST kernels (the device check itself is cuda_ext.uses_sm90, faked here)."""
    from dmattn import cuda_ext
    monkeypatch.setattr(cuda_ext, "uses_sm90", lambda head_dim, per_query=False: head_dim in (64, 128))
    monkeypatch.setattr(cuda_ext, "on_device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(cuda_ext, "SM90_BACKWARD", True)
    assert BACKENDS["cuda"].preferred(_cuda_problem(**over)) is expected
    monkeypatch.setattr(cuda_ext, "SM90_BACKWARD", False)  # the sm_80 backward stays behind triton
    assert BACKENDS["cuda"].preferred(_cuda_problem(**over)) is False


@pytest.mark.parametrize("cuda_preferred", [True, False])
def test_auto_takes_a_preferred_backend_first(cuda_preferred, monkeypatch):
    """With triton and cuda both able to run a call, auto takes triton (registry order) unless cuda
    is preferred for it; explain agrees with select."""
    problem = _cuda_problem()
    for name in BACKENDS:
        monkeypatch.setattr(BACKENDS[name], "reasons", (lambda p: []) if name in ("triton", "cuda") else
                            (lambda p: ["not in this test"]))
    monkeypatch.setattr(BACKENDS["cuda"], "preferred", lambda p: cuda_preferred)
    expected = "cuda" if cuda_preferred else "triton"
    assert dispatch.select(problem).name == expected
    assert dispatch.explain_problem(problem).chosen == expected
    assert dispatch.select(problem, "triton").name == "triton"  # a named backend is never overridden
