"""Backend selection: declarations, explain, the environment override, ``python -m dmattn``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dmattn
from dmattn import dispatch
from dmattn.backends import BACKENDS


def _args(device="cpu"):
    return (torch.randn(1, 8, 4, 16, device=device), torch.randn(1, 8, 2, 16, device=device),
            torch.randn(1, 8, 2, 16, device=device), torch.randn(1, 2, 1, 8, device=device))


def test_registry_order_and_reference_is_by_name_only():
    assert dmattn.backends()[-1] == "reference"
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
