"""A shorter launch path for this package's Triton kernels.

Every ``kernel[grid](*args)`` goes through ``JITFunction.run``, which binds all arguments, derives
each one's specialisation (dtype and 16-byte alignment of a pointer, value 1 and divisibility by 16
of an integer), hashes that into a cache key and builds launch metadata for the hook chains, before
the compiled launcher runs. That is tens of microseconds of Python per launch on the GPU hosts
(cProfile in benchmarks/results/host-overhead-h200-2026-11-28.json), while a decode call does 0.04 ms
of GPU work in 5 launches.

Our kernels are launched with the same kinds of arguments call after call, so ``fast(kernel)`` gives
the kernel a ``run`` that remembers the compiled kernel under a key that fixes Triton's
specialisation exactly: each tensor's dtype and whether its address is 16-byte aligned, every other
argument's type and value (sizes, strides, constexprs, launch options), the device and Triton's
debug and instrumentation settings. A hit launches through the compiled kernel's own launcher with the same arguments and
grid Triton's path would pass. Anything the key does not describe takes Triton's path unchanged:
warm-up, a callable grid, argument kinds other than tensors, host tensor descriptors and plain
values, pre-run hooks, and launch hooks (a profiler such as proton installs those).

What the short path skips is Triton's check that the globals a kernel read have not changed since
it was compiled (a RuntimeError there); our kernels read only module constants, which are not
reassigned. ``ENABLED = False`` (or ``DMATTN_TRITON_FAST_LAUNCH=0``) turns the short path off, for an
A/B or to rule it out. Under ``TRITON_INTERPRET=1`` kernels are not ``JITFunction``s and are left
alone.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
from triton.runtime import driver
from triton.runtime.jit import JITFunction

try:  # Triton 3.4 and newer; older releases keep the slow path
    from triton import knobs
except ImportError:  # pragma: no cover - depends on the installed Triton
    knobs = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None


def _checked_release() -> bool:
    """The short path calls ``CompiledKernel.run`` with the arguments ``JITFunction.run`` passes it;
    that call was read in the sources of Triton 3.6 and 3.9 (identical there). Other releases keep
    Triton's own path rather than risk a launcher whose arguments moved."""
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (3, 6) <= (major, minor) <= (3, 9)


ENABLED = (knobs is not None and _checked_release()
           and os.environ.get("DMATTN_TRITON_FAST_LAUNCH", "1") != "0")

# Keys hold exact sizes, so one kernel collects an entry per distinct shape; past this many the
# cache starts over (a miss costs one launch through Triton's path, no compilation).
_CACHE_LIMIT = 512

_VALUES = (int, float, bool, str, type(None))

# Per tuple of argument types (a call site passes the same kinds call after call): the positions
# of its tensors and of its host tensor descriptors and a small id standing for the tuple in keys,
# or None when a type is one the key does not cover. Building the key then touches only the
# tensors and descriptors in Python; the rest is tuple work in C. The per-argument loop it replaced
# took 17 us of host time for the 72 arguments of the Triton forward on the GPU host
# (benchmarks/results/eager-host-h200-2026-11-29.log); on the CPU machine 5.7 -> 4.2 us for 67.
_KINDS: dict = {}
_KINDS_LIMIT = 256
_KIND_IDS = itertools.count()  # never reused, so a key made before _KINDS was cleared cannot match
_NEW = object()  # a type tuple not in _KINDS yet


def _kinds(types: tuple):
    tensors, descs = [], []
    for i, t in enumerate(types):
        if issubclass(t, torch.Tensor):
            tensors.append(i)
        elif TensorDescriptor is not None and t is TensorDescriptor:
            descs.append(i)
        elif t not in _VALUES:
            return None
    return tuple(tensors), tuple(descs), next(_KIND_IDS)


def _args_key(args, kwargs):
    """The part of the key the arguments give, or None when one of them is not a kind it covers:
    the arguments' types, a tensor's dtype and whether its address is 16-byte aligned, the value of
    every int, float, bool, str or None (types and values: Triton compiles True, 1 and 1.0
    differently), a host tensor descriptor's base dtype, shape, strides, block shape and padding,
    and the keywords' names in the order given."""
    vals = (*args, *kwargs.values()) if kwargs else args
    types = tuple(map(type, vals))
    kinds = _KINDS.get(types, _NEW)
    if kinds is _NEW:
        if len(_KINDS) >= _KINDS_LIMIT:
            _KINDS.clear()
        kinds = _KINDS[types] = _kinds(types)
    if kinds is None:  # a type the key does not cover
        return None
    tensors, descs, kind = kinds
    key = list(vals)
    for i in tensors:
        a = key[i]
        key[i] = (a.dtype, a.data_ptr() % 16 == 0)
    for i in descs:
        # Its base is 16-byte aligned by construction; the rest of what Triton may specialise on.
        a = key[i]
        key[i] = (a.base.dtype, tuple(a.shape), tuple(a.strides), tuple(a.block_shape), a.padding)
    return kind, tuple(key), tuple(kwargs)


def _hooks_idle() -> bool:
    """No launch hook would be called: the short path passes none to the launcher."""
    rt = knobs.runtime
    for chain in (rt.launch_enter_hook, rt.launch_exit_hook):
        if chain is not None and getattr(chain, "calls", True):
            return False
    return True


class _Run:
    """``run`` of one JIT kernel with the short path in front of Triton's own."""

    def __init__(self, kernel: JITFunction):
        self.kernel = kernel
        self.slow = kernel.run  # Triton's bound method
        self.cache: dict = {}
        self.hits = 0  # read by tests: the short path was taken

    def __call__(self, *args, grid, warmup, **kwargs):
        fn = self.kernel
        if warmup or not ENABLED or callable(grid) or fn.pre_run_hooks or not _hooks_idle():
            return self.slow(*args, grid=grid, warmup=warmup, **kwargs)
        key = _args_key(args, kwargs)
        if key is None:
            return self.slow(*args, grid=grid, warmup=warmup, **kwargs)
        device = driver.active.get_current_device()
        key = (device, knobs.runtime.debug, getattr(knobs.compilation, "instrumentation_mode", None), key)
        entry = self.cache.get(key)
        if entry is None:
            compiled = self.slow(*args, grid=grid, warmup=warmup, **kwargs)
            if compiled is not None and not hasattr(compiled, "result"):
                if len(self.cache) >= _CACHE_LIMIT:
                    self.cache.clear()
                # The parameters after the positional ones, in signature order, as the binder fills
                # them: the keyword's value if given, else the default.
                tail = fn.params[len(args):]
                self.cache[key] = (compiled, tuple(p.name for p in tail), tuple(p.default for p in tail))
            return compiled
        compiled, names, defaults = entry
        full = args + tuple(map(kwargs.get, names, defaults)) if names else args
        n = len(grid)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *full)
        self.hits += 1
        return compiled


def fast(kernel):
    """Give a Triton kernel the short launch path (see the module docstring); returns the kernel."""
    if knobs is None:
        return kernel
    if isinstance(kernel, JITFunction) and not isinstance(getattr(kernel, "run", None), _Run):
        # ``kernel[grid]`` calls ``self.run``, so an instance attribute takes over every launch.
        kernel.run = _Run(kernel)
    return kernel


def fast_all(namespace: dict) -> None:
    """``fast`` for every launchable kernel of a module (pass ``globals()`` at its end)."""
    for value in list(namespace.values()):
        if isinstance(value, JITFunction) and not getattr(value, "__name__", "_").startswith("_"):
            fast(value)
