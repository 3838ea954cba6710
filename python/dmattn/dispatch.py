"""Picks the backend for a Problem: the first in priority order that declares no reasons against it,
unless a later one that can run it too declares itself preferred for it (``Backend.preferred``: it
was measured faster on such calls).

``backend="auto"`` (the default) consults ``DMATTN_BACKEND`` first, then the registry order, skipping
backends that do not take part in auto-selection on the problem's device type (the reference never
does; a backend that runs CPU tensors only for testing, like Triton's interpreter, does not on CPU).
A named backend that cannot run the problem, or an auto call that no backend can run, raises one
``ValueError`` listing every backend's reasons.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from .backends import BACKENDS, Backend
from .problem import Problem

ENV_VAR = "DMATTN_BACKEND"


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Which backend a call would use and why the others would not (``dmattn.explain``)."""

    chosen: Optional[str]
    reasons: dict[str, list[str]]
    requested: str

    def __str__(self) -> str:
        width = max(len(n) for n in self.reasons)
        lines = [f"requested: {self.requested}; chosen: {self.chosen or 'none'}"]
        for name, why in self.reasons.items():
            mark = "*" if name == self.chosen else " "
            lines.append(f"{mark} {name:<{width}}  {'ok' if not why else '; '.join(why)}")
        return "\n".join(lines)


def _requested(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}"
                         + (f" (from {ENV_VAR})" if os.environ.get(ENV_VAR) == backend else ""))
    return backend


def explain_problem(problem: Problem, backend: str = "auto") -> Explanation:
    requested = _requested(backend)
    reasons = {name: b.reasons(problem) for name, b in BACKENDS.items()}
    if requested != "auto":
        chosen = requested if not reasons[requested] else None
    else:
        device = problem.device.type
        runnable = [n for n, b in BACKENDS.items() if device in b.auto_devices and not reasons[n]]
        preferred = [n for n in runnable if BACKENDS[n].preferred(problem)]
        chosen = (preferred or runnable or [None])[0]
        for name, b in BACKENDS.items():
            if device not in b.auto_devices:
                reasons[name] = reasons[name] + [f"only used on {device} when requested by name"]
    return Explanation(chosen=chosen, reasons=reasons, requested=requested)


def select(problem: Problem, backend: str = "auto") -> Backend:
    """Returns the backend that runs ``problem``, or raises ValueError with every backend's reasons."""
    requested = _requested(backend)
    if requested != "auto":
        why = BACKENDS[requested].reasons(problem)
        if why:
            raise ValueError(f"backend {requested!r} cannot run this call: {'; '.join(why)}")
        return BACKENDS[requested]
    candidates = [b for b in BACKENDS.values() if problem.device.type in b.auto_devices]
    # preferred() is a few attribute checks, reasons() a longer walk: ask it only of a preferred one.
    for b in candidates:
        if b.preferred(problem) and not b.reasons(problem):
            return b
    for b in candidates:
        if not b.reasons(problem):
            return b
    raise ValueError("no dmattn backend can run this call:\n" + str(explain_problem(problem, "auto")))
