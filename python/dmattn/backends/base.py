"""What a backend is: a class that declares what it supports and runs the op's passes.

``reasons(problem)`` is derived from the declarations, so a backend never computes a problem it
did not declare; dispatch takes the first backend in priority order that has no reasons, unless a
later one without reasons says it is ``preferred`` for the problem.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from ..problem import Problem

ALL_FEATURES = frozenset({"bias", "mask", "softcap", "causal", "window_visible", "window_global",
                          "window_per_query"})


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class Backend:
    """Base class: subclasses set the declarations and implement ``forward``/``backward``.

    Declarations:
      name              registry name (``backend=`` argument, ``DMATTN_BACKEND``)
      device_types      torch device types it runs on, e.g. {"cpu"} or {"cuda"}
      dtypes            query/key/value dtypes
      head_dims         supported head dims (a ``range`` or a set)
      min_capability    minimum CUDA compute capability, or None
      deterministic     whether ``deterministic=True`` is honoured
      features          optional features it implements (see ``ALL_FEATURES``)
      layouts           Problem layouts it implements
      auto_devices      device types ``backend="auto"`` may pick it for (empty: by name only)
    """

    name: str = "?"
    device_types: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] = frozenset()
    head_dims: Sequence[int] = range(1, 257)
    min_capability: Optional[tuple[int, int]] = None
    deterministic: bool = False
    features: frozenset[str] = ALL_FEATURES
    layouts: frozenset[str] = frozenset({"padded"})
    auto_devices: frozenset[str] = frozenset({"cpu", "cuda"})

    def load_error(self) -> Optional[str]:
        """Why the backend's compiled module or package cannot be used (None when it can)."""
        return None

    def extra_reasons(self, problem: Problem) -> list[str]:
        """Checks beyond the declarations (subclasses extend; default none)."""
        return []

    def preferred(self, problem: Problem) -> bool:
        """Whether ``backend="auto"`` should take this backend for ``problem`` ahead of the ones before
        it in the registry (it was measured faster on such calls). Only asked of a backend that can
        run the problem; default False: the registry order decides."""
        return False

    def reasons(self, problem: Problem) -> list[str]:
        """Everything that stops this backend from computing ``problem``; empty means it can."""
        err = self.load_error()
        if err is not None:
            return [f"not available: {err}"]
        out = []
        if problem.device.type not in self.device_types:
            out.append(f"runs on {'/'.join(sorted(self.device_types))} tensors, got {problem.device.type}")
        if problem.dtype not in self.dtypes:
            names = ", ".join(sorted(_dtype_name(d) for d in self.dtypes))
            out.append(f"dtype {_dtype_name(problem.dtype)} not supported (supports {names})")
        if problem.D not in self.head_dims:
            out.append(f"head dim {problem.D} not supported (supports {_describe(self.head_dims)})")
        if problem.layout not in self.layouts:
            out.append(f"layout {problem.layout!r} not supported")
        missing = sorted(problem.features - self.features)
        if missing:
            out.append(f"does not implement {', '.join(missing)}")
        if problem.deterministic and not self.deterministic:
            out.append("cannot promise deterministic=True")
        if self.min_capability is not None and problem.device.type == "cuda":
            cap = _capability(problem.device)
            if cap < self.min_capability:
                out.append(f"needs compute capability >= {self.min_capability[0]}.{self.min_capability[1]}, "
                           f"device has {cap[0]}.{cap[1]}")
        return out + self.extra_reasons(problem)

    def forward(self, problem: Problem, q, k, v, bias, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(out (B, Q, H, D) in q's dtype, lse (B, H, Q) float32)``."""
        raise NotImplementedError

    def backward(self, problem: Problem, dout, q, k, v, bias, mask, out, lse, needs: tuple[bool, ...]):
        """Returns ``(dq, dk, dv, dbias)``; an entry whose ``needs`` flag is False may be None."""
        raise NotImplementedError

    def select(self, problem: Problem, bias, mask):
        """The selection metadata this backend's kernels consume, built alone, or None when the
        backend selects inside its kernels. Used to time selection separately (benchmarks)."""
        return None

    def visible_mask(self, problem: Problem, bias, mask) -> torch.Tensor:
        """Dense bool (B, H, Q, K) ``visible`` mask (SPEC), for ``topk_mask``."""
        raise NotImplementedError

    def topk_indices(self, bias, mask, window: int) -> torch.Tensor:
        """Global-scope selected indices per broadcast row (see ``dmattn.topk_indices``)."""
        raise NotImplementedError


@functools.lru_cache(maxsize=None)
def _indexed_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, remembered per device index: a device's
    capability does not change, and the query (device properties) is microseconds of host time
    on every call of a backend that declares a minimum. A device without an index means the
    current one, which can change, so it is asked each time."""
    if device.index is None:
        return torch.cuda.get_device_capability(device)
    return _indexed_capability(device.index)


def _describe(dims: Sequence[int]) -> str:
    if isinstance(dims, range) and dims.step == 1:
        return f"{dims.start}..{dims.stop - 1}"
    return ", ".join(map(str, sorted(dims)))


# Tests set DMATTN_POISON_OUTPUTS=1 so every output a kernel should write starts as NaN (or, for
# bool outputs True, for integer outputs -2): an element a kernel forgets shows up as a failure
# instead of passing by luck. Read once at import: nothing on the call path touches the environment.
_POISON = os.environ.get("DMATTN_POISON_OUTPUTS", "") not in ("", "0")


def new_output(shape, dtype, device) -> torch.Tensor:
    """An uninitialised output tensor (NaN-filled when ``DMATTN_POISON_OUTPUTS`` is set)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        t.fill_(float("nan") if dtype.is_floating_point else True if dtype == torch.bool else -2)
    return t


def forward_outputs(problem: Problem, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Q, H, D) in q's dtype, lse (B, H, Q) float32)``, contiguous, for a kernel to fill."""
    p = problem
    return (new_output((p.B, p.Q, p.H, p.D), q.dtype, q.device),
            new_output((p.B, p.H, p.Q), torch.float32, q.device))


def gradient_outputs(inputs, needs) -> list:
    """One contiguous gradient per (input, wanted) pair in the input's shape and dtype, else None."""
    return [new_output(t.shape, t.dtype, t.device) if n and t is not None else None
            for t, n in zip(inputs, needs)]


def dlpack(*tensors) -> list:
    """The tensors as DLPack capsules for a compiled (nanobind) module, without their autograd view
    (None stays None). nanobind takes a capsule as it takes the tensor, but a tensor goes through
    ``torch.Tensor.__dlpack__``, whose Python checks cost ~1.5 us per tensor: a decode call of the
    cuda backend passes a dozen. A capsule is used once: make them at the call."""
    return [None if t is None else _to_dlpack(t.detach() if t.requires_grad else t) for t in tensors]


def plain(*tensors) -> tuple:
    """The tensors without their autograd view: kernels never need it, and DLPack refuses tensors
    that require grad. A tensor that does not require grad is passed as it is (``detach`` makes a
    new tensor object, host time on every call)."""
    return tuple(t.detach() if t is not None and t.requires_grad else t for t in tensors)
