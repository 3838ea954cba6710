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


def _args_key(args, kwargs):
    """The part of the key the arguments give, or None when one of them is not a kind it covers:
    a tensor gives its dtype and whether its address is 16-byte aligned, an int its value, a
    float, bool, str or None its type and value (Triton compiles True, 1 and 1.0 differently), and a
    host tensor descriptor its base's dtype, shape, strides, block shape and padding."""
    key = []
    for a in (*args, *kwargs.values()):
        t = type(a)
        if t is int:
            key.append(a)
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif t in _VALUES:
            key.append((t, a))
        elif t is TensorDescriptor:
            # Its base is 16-byte aligned by construction; the rest of what Triton may specialise on.
            key.append((t, a.base.dtype, tuple(a.shape), tuple(a.strides), tuple(a.block_shape), a.padding))
        else:
            return None
    key.append(tuple(kwargs))  # the keywords' names, in the order given
    return tuple(key)


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
                # The parameters after the positional ones, in signature order, as the binder fills them.
                tail = tuple((p.name, p.default) for p in fn.params[len(args):])
                self.cache[key] = (compiled, tail)
            return compiled
        compiled, tail = entry
        full = args + tuple(kwargs[name] if name in kwargs else default for name, default in tail)
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
