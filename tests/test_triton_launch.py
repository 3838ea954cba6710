"""The short launch path of the Triton kernels (``kernels/triton/launch.py``).

On the CPU the wrapper runs against a stand-in kernel whose slow path binds arguments the way
Triton's binder does: the short path must hand the launcher exactly the arguments and grid the slow
path would, and fall back to it for every call its key does not describe. On a GPU the backend's own
kernels must take the short path and give bitwise the results of Triton's path."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
import triton.language as tl

from cases import Case, device_for, make_inputs, unavailable

launch = pytest.importorskip("dmattn.kernels.triton.launch")
if launch.knobs is None:
    pytest.skip("this Triton has no knobs module: the short launch path is off", allow_module_level=True)


def _kernel_source(a, b, n, flag, BLOCK=4, EXTRA=None):
    pass


class _Compiled:
    """Stands in for a CompiledKernel: its launcher records what it was handed."""

    function = "fn-handle"
    packed_metadata = ("meta",)

    def __init__(self):
        self.launches = []

    def run(self, gx, gy, gz, stream, function, packed, metadata, enter, exit_, *args):
        self.launches.append(((gx, gy, gz), stream, function, packed, metadata, enter, exit_, args))


class _Kernel:
    """Stands in for a JITFunction: ``run`` binds like Triton's binder, compiles once per call of it."""

    def __init__(self):
        sig = inspect.signature(_kernel_source)
        self.params = [types.SimpleNamespace(name=n, default=p.default) for n, p in sig.parameters.items()]
        self.pre_run_hooks = []
        self.sig = sig
        self.slow_calls = 0
        self.compiled = _Compiled()

    def run(self, *args, grid, warmup, **kwargs):
        self.slow_calls += 1
        for option in ("num_warps", "num_stages"):  # launch options, not parameters
            kwargs.pop(option, None)
        bound = self.sig.bind(*args, **kwargs)
        bound.apply_defaults()
        if not warmup:
            g = tuple(grid(bound.arguments) if callable(grid) else grid) + (1, 1)
            self.compiled.run(g[0], g[1], g[2], 7, self.compiled.function, self.compiled.packed_metadata,
                              None, None, None, *bound.arguments.values())
        return self.compiled


@pytest.fixture
def kernel(monkeypatch):
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(launch, "driver", types.SimpleNamespace(active=active))
    monkeypatch.setattr(launch, "ENABLED", True)
    k = _Kernel()
    k.run = launch._Run(k)
    return k


def _launch(k, grid, *args, **kwargs):
    k.run(*args, grid=grid, warmup=False, **kwargs)
    return k.compiled.launches[-1]


def test_hit_passes_the_slow_paths_arguments(kernel):
    a, b = torch.zeros(8), torch.ones(8)
    slow = _launch(kernel, (3,), a, b, 5, False, BLOCK=8, num_warps=4)
    fast = _launch(kernel, (3,), a, b, 5, False, BLOCK=8, num_warps=4)
    assert kernel.slow_calls == 1 and kernel.run.hits == 1
    assert fast == slow
    assert fast[0] == (3, 1, 1) and fast[-1][-2:] == (8, None)  # grid padded; defaults filled in order
    # Keyword arguments for parameters land in their signature positions.
    slow = _launch(kernel, (2, 5), a, b, n=9, flag=True, EXTRA=3)
    fast = _launch(kernel, (2, 5), a, b, n=9, flag=True, EXTRA=3)
    assert kernel.slow_calls == 2 and kernel.run.hits == 2 and fast == slow
    assert fast[-1][2:] == (9, True, 4, 3)


@pytest.mark.parametrize("change", ["int", "bool_vs_int", "float_vs_int", "dtype", "alignment", "constexpr",
                                    "option"])
def test_anything_that_changes_the_specialisation_misses(kernel, change):
    a, b = torch.zeros(16, dtype=torch.float16), torch.ones(8)
    base = dict(args=(a, b, 1, False), kwargs=dict(BLOCK=4, num_warps=4))
    other = dict(args=list(base["args"]), kwargs=dict(base["kwargs"]))
    if change == "int":
        other["args"][2] = 16
    elif change == "bool_vs_int":
        other["args"][2] = True
    elif change == "float_vs_int":
        other["args"][2] = 1.0
    elif change == "dtype":
        other["args"][0] = a.to(torch.bfloat16)
    elif change == "alignment":
        other["args"][0] = a[1:]  # 2 bytes past a 16-byte boundary
        assert other["args"][0].data_ptr() % 16 != 0
    elif change == "constexpr":
        other["kwargs"]["BLOCK"] = 8
    elif change == "option":
        other["kwargs"]["num_warps"] = 8
    for form in (base, other, base, other):
        _launch(kernel, (1,), *form["args"], **form["kwargs"])
    assert kernel.slow_calls == 2 and kernel.run.hits == 2


def test_calls_the_key_does_not_describe_take_the_slow_path(kernel, monkeypatch):
    a, b = torch.zeros(8), torch.ones(8)
    for _ in range(2):
        _launch(kernel, lambda meta: (meta["n"],), a, b, 3, False)  # callable grid
        _launch(kernel, (1,), a, b, object(), False)  # an argument kind the key does not cover
        kernel.run(a, b, 3, False, grid=(1,), warmup=True)
    assert kernel.run.hits == 0 and kernel.slow_calls == 6
    assert kernel.compiled.launches[0][0] == (3, 1, 1)

    _launch(kernel, (1,), a, b, 3, False)
    calls = kernel.slow_calls
    monkeypatch.setattr(launch, "ENABLED", False)
    _launch(kernel, (1,), a, b, 3, False)
    assert kernel.slow_calls == calls + 1 and kernel.run.hits == 0
    monkeypatch.setattr(launch, "ENABLED", True)
    hook = lambda metadata: None  # noqa: E731
    chain = launch.knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton's launch hook is not a chain")
    chain.add(hook)
    try:
        _launch(kernel, (1,), a, b, 3, False)
    finally:
        chain.remove(hook)
    assert kernel.slow_calls == calls + 2 and kernel.run.hits == 0
    kernel.pre_run_hooks.append(lambda *args, **kwargs: None)
    _launch(kernel, (1,), a, b, 3, False)
    assert kernel.slow_calls == calls + 3 and kernel.run.hits == 0


def test_only_checked_releases_take_the_short_path(monkeypatch):
    for version, ok in (("3.6.0", True), ("3.9.1+git", True), ("3.5.1", False), ("3.10.0", False),
                        ("4.0.0", False), ("main", False)):
        monkeypatch.setattr(launch.triton, "__version__", version)
        assert launch._checked_release() == ok, version


def test_cache_is_bounded(kernel, monkeypatch):
    monkeypatch.setattr(launch, "_CACHE_LIMIT", 4)
    a, b = torch.zeros(8), torch.ones(8)
    for n in range(10):
        _launch(kernel, (1,), a, b, n, False)
    assert len(kernel.run.cache) <= 4


def test_kinds_cleared_do_not_alias(kernel, monkeypatch):
    """The key names the argument types by an id per type tuple. When that table starts over, a new
    tuple must not take an id an older key still holds: 1 and True compare equal, so an entry made
    for ints would otherwise serve a call with a bool."""
    monkeypatch.setattr(launch, "_KINDS_LIMIT", 2)
    launch._KINDS.clear()
    a, b = torch.zeros(8), torch.ones(8)
    _launch(kernel, (1,), a, b, 1, False)
    _launch(kernel, (1,), a, b, 1.5, None)  # a second type tuple: the table is full
    _launch(kernel, (1,), a, b, True, False)  # a third: the table starts over
    assert kernel.slow_calls == 3 and kernel.run.hits == 0
    _launch(kernel, (1,), a, b, True, False)
    _launch(kernel, (1,), a, b, 1, False)  # its type tuple has a new id now: one miss
    assert kernel.slow_calls == 4 and kernel.run.hits == 1


def _probe_kernel(X, Y, n, flag, BLOCK: tl.constexpr, EXTRA=None):
    pass


class _ProbeCompiled(_Compiled):
    """What Triton's ``run`` finds in its cache for the probe kernel."""

    def launch_metadata(self, grid, stream, *args):
        return None


def _same(a, b):
    return len(a) == len(b) and all(x is y or (not isinstance(x, torch.Tensor) and type(x) is type(y) and x == y)
                                    for x, y in zip(a, b))


@pytest.mark.skipif(not launch._checked_release(), reason="the short path is off for this Triton release")
def test_short_path_launches_what_tritons_own_run_launches(monkeypatch):
    """Against Triton's real ``JITFunction.run`` (binder, specialisation, cache key, launch), with
    only the compiler and the driver stood in for: for every call form the hit hands the compiled
    launcher the grid, stream, handles and arguments Triton's own path handed it. This is the check
    that fails when a Triton release moves the launcher's arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as triton_driver
    from triton.runtime.jit import JITFunction

    class _Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 7

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(triton_driver, "_active", _Driver())
    monkeypatch.setattr(launch, "ENABLED", True)
    kernel = JITFunction(_probe_kernel)
    compiled = _ProbeCompiled()
    kernel._do_compile = lambda *args, **kwargs: compiled
    launch.fast(kernel)
    a, b = torch.zeros(8), torch.ones(8)
    forms = [((3,), (a, b, 5, False), dict(BLOCK=8, num_warps=4)),
             ((2, 5), (a, b), dict(n=9, flag=True, BLOCK=16, EXTRA=3)),
             ((1, 2, 3), (a, b, 1, True, 4), dict(EXTRA=2.5)),
             ((4,), (a[1:], b, 17, False), dict(BLOCK=8))]
    for grid, args, kwargs in forms:
        kernel[grid](*args, **kwargs)  # a miss: Triton's own run launches
        hits = kernel.run.hits
        kernel[grid](*args, **kwargs)  # a hit: the short path
        assert kernel.run.hits == hits + 1
        slow, fast = compiled.launches[-2:]
        # (grid, stream, function, packed metadata, launch metadata, enter hook, exit hook, arguments)
        assert _same(fast[:4], slow[:4]) and _same(fast[7], slow[7]), (grid, args, kwargs)
        assert fast[4:7] == (None, None, None)  # no metadata, no hooks: Triton's hooks were idle
        assert slow[4] is None and all(not getattr(h, "calls", None) for h in slow[5:7])


def _modules():
    from dmattn.kernels.triton import attention, prefix, topk
    return attention, prefix, topk


def test_backend_kernels_are_wrapped_only_when_compiled():
    from triton.runtime.jit import JITFunction
    kernels = [v for m in _modules() for n, v in vars(m).items() if n.endswith("_kernel")]
    assert kernels
    for k in kernels:
        assert isinstance(k.run, launch._Run) == isinstance(k, JITFunction)


def _hits():
    return sum(v.run.hits for m in _modules() for v in vars(m).values() if isinstance(getattr(v, "run", None),
                                                                                  launch._Run))


@pytest.mark.skipif(unavailable("triton") is not None or device_for("triton") != "cuda",
                    reason="needs the triton backend on a GPU")
@pytest.mark.parametrize("case", [Case(B=2, Q=300, K=300, H=4, H_kv=2, D=64, window=100, causal=True),
                                  Case(B=2, Q=1, K=5000, H=8, H_kv=2, D=128, window=300)], ids=str)
def test_gpu_short_path_is_taken_and_matches_tritons(monkeypatch, case):
    import dmattn
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda")
    call = lambda: dmattn.dma_attention(q, k, v, bias, mask, window=case.window, is_causal=case.causal,  # noqa: E731
                                        return_lse=True, backend="triton")
    monkeypatch.setattr(launch, "ENABLED", False)
    with torch.no_grad():
        want = call()
        monkeypatch.setattr(launch, "ENABLED", True)
        call()
        hits = _hits()
        got = call()
    # Every launch of the second call hits, except those whose arguments include a tensor
    # descriptor (the compact forward on sm_90): the selection launches at least.
    assert _hits() >= hits + 1
    for g, w in zip(got, want):
        assert torch.equal(g.nan_to_num(), w.nan_to_num()) and torch.equal(g.isnan(), w.isnan())


def test_tensors_passed_by_keyword_are_keyed(kernel):
    a, b = torch.zeros(8), torch.ones(8)
    for extra in (torch.zeros(4), torch.zeros(4, dtype=torch.float16), torch.zeros(4), torch.zeros(9)[1:]):
        _launch(kernel, (1,), a, b, 3, False, EXTRA=extra)
    # float32 aligned (miss), float16 (miss), float32 aligned again (hit), misaligned (miss)
    assert kernel.slow_calls == 3 and kernel.run.hits == 1


def test_tensor_descriptors_are_keyed(kernel):
    TensorDescriptor = launch.TensorDescriptor
    if TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    a, b = torch.zeros(8), torch.ones(8)
    rows = torch.zeros(64, 32, dtype=torch.float16)
    descs = [TensorDescriptor.from_tensor(rows, block_shape=[16, 32]),
             TensorDescriptor.from_tensor(rows, block_shape=[32, 32]),  # other block: miss
             TensorDescriptor.from_tensor(rows[:48], block_shape=[16, 32]),  # other shape: miss
             TensorDescriptor.from_tensor(rows.clone(), block_shape=[16, 32])]  # same kind: hit
    launches = [_launch(kernel, (1,), a, b, 3, False, EXTRA=d) for d in descs]
    assert kernel.slow_calls == 3 and kernel.run.hits == 1
    assert launches[-1][-1][-1] is descs[-1]


class _KeyCheck:
    """Stands in for a module's kernel: records whether the short path's key covers each launch."""

    def __init__(self, name, kernel, seen):
        self.name, self.kernel, self.seen = name, kernel, seen

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.seen.append((self.name, launch._args_key(args, kwargs) is not None))
            return self.kernel[grid](*args, **kwargs)
        return call


@pytest.mark.skipif(unavailable("triton") is not None, reason="needs the triton backend")
@pytest.mark.parametrize("case", [
    Case(B=2, Q=70, K=70, H=4, H_kv=2, D=32, window=20, causal=True),  # visible scope (PREFIX)
    Case(B=1, Q=60, K=80, H=4, H_kv=2, D=32, window=20, causal=True, scope="global"),  # LIST
    Case(B=2, Q=1, K=300, H=8, H_kv=2, D=32, window=40, scope="global"),  # decode split
    Case(B=1, Q=40, K=40, H=2, H_kv=1, D=16, bias="b_h_q", window=9),  # per-query bias: tiles
    Case(B=1, Q=30, K=30, H=2, H_kv=2, D=16, window=None, causal=True)], ids=str)  # dense
def test_every_launch_of_the_backend_is_keyed(monkeypatch, case):
    """The key covers every argument kind the backend passes, so no launch silently takes
    Triton's path; forward and backward."""
    import dmattn
    seen = []
    for module in _modules():
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _KeyCheck(name, value, seen))
    monkeypatch.setattr(_modules()[0], "COMPACT_DESC", True)  # the LIST path passes tensor descriptors
    q, k, v, bias, mask = make_inputs(case, torch.float32, device_for("triton"))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = dmattn.dma_attention(*leaves, bias, mask, window=case.window, is_causal=case.causal,
                               topk_scope=case.scope, backend="triton")
    out.sum().backward()
    assert seen and all(ok for _, ok in seen), [name for name, ok in seen if not ok]
