"""Host (Python) time of one eager D128k decode call or T8k forward, measured without a GPU.

The D128k call (BENCHMARKS.md), or with ``--workload T8k`` the T8k global-scope forward, runs on CPU
tensors with every kernel of the chosen backend replaced by a no-op, so what is timed is the host
path alone: validation, dispatch, the custom op, output and metadata allocations, launch-argument
preparation. Neither the kernels' own launch cost (Triton's argument binding, the CUDA driver) nor
torch.cuda device/stream calls are included: on the GPU both come on top. A GPU run of ``benchmarks/host_overhead.py`` gives the real numbers.

    TRITON_INTERPRET=1 python benchmarks/host_overhead_cpu.py --backend triton [--workload T8k] [--profile]
    python benchmarks/host_overhead_cpu.py --backend cuda [--profile]

The Triton backend takes CPU tensors only under the interpreter; its launch plans are computed as
on a 132-SM GPU (multi-chunk select, split forward). The cuda backend is made to accept CPU tensors
with a stand-in for the compiled module that converts its tensor arguments as nanobind does.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import types

import torch

import dmattn
from dmattn.backends import BACKENDS

SM_COUNT = 132


class _NoLaunch:
    """A kernel stand-in: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return self._noop

    @staticmethod
    def _noop(*args, **kwargs):
        return None


class _FakeCudaDevice:
    type = "cuda"
    index = 0


def _patch_triton():
    from dmattn.kernels.triton import attention, topk
    assert os.environ.get("TRITON_INTERPRET") == "1", "the triton backend needs TRITON_INTERPRET=1 on CPU"
    for mod, names in ((topk, ("select_row_kernel", "select_hist_kernel", "select_write_kernel",
                               "list_counts_kernel")),
                       (attention, ("dma_fwd_kernel", "dma_fwd_split_kernel", "dma_fwd_combine_kernel",
                                    "compact_gather_kernel"))):
        for name in names:
            setattr(mod, name, _NoLaunch())
    topk._sm_count = lambda index: SM_COUNT
    plan, split_count = topk._plan, attention._split_count

    def gpu_plan(K, rows, device, chunk):
        topk._INTERPRETED = False
        try:
            return plan(K, rows, _FakeCudaDevice, chunk)
        finally:
            topk._INTERPRETED = True

    topk._plan = gpu_plan
    attention._split_count = lambda dev, tiles, programs: split_count(_FakeCudaDevice, tiles, programs)


def _like_nanobind(*args, **kwargs):
    """What nanobind does with each ndarray argument before the C++ function runs: a tensor is
    exported through ``Tensor.__dlpack__`` (Python), a DLPack capsule is taken as it is."""
    for a in args:
        if isinstance(a, torch.Tensor):
            a.__dlpack__(max_version=(1, 0))


def _patch_cuda():
    from dmattn import cuda_ext
    from dmattn.backends import cuda as cuda_backend

    fake = types.SimpleNamespace(
        fwd=_like_nanobind, bwd=_like_nanobind, select_lists=_like_nanobind, decode=_like_nanobind,
        list_counts=_like_nanobind, select_plan=lambda rows, K, bits, dev, chunk: (8192, 16, 1 << 20),
        decode_plan=lambda B, Q, H, H_kv, D, B_s, H_s, K, window, bits, dev: (32, 2 << 20),
        fwd_block_m=lambda d: 64, bwd_dq_block_m=lambda d: 64,
        info=lambda: {"fwd_head_dims": "64 128", "bwd_head_dims": "64 128"})
    cuda_ext._cuda = fake
    cuda_ext._select_plan.cache_clear()
    cuda_ext._decode_plan.cache_clear()
    b = BACKENDS["cuda"]
    b.device_types = frozenset({"cuda", "cpu"})
    b.head_dims = frozenset({64, 128})
    b.min_capability = None
    b._load_error_text = None
    # No device or stream on CPU: the device switch and the stream query become no-ops (a CPU
    # tensor's device index is None, so it reads as the current device).
    torch.cuda.device = lambda dev: contextlib.nullcontext()
    torch.cuda.current_device = lambda: None
    torch.cuda.current_stream = lambda dev=None: types.SimpleNamespace(cuda_stream=0)
    cuda_ext._raw_stream = lambda index: 0
    assert cuda_backend.CudaBackend is type(b)


# (Q, K, dma_attention options) of the two workloads: H 32, H_kv 8, D 128, bias (1, H_kv, 1, K).
WORKLOADS = {"D128k": (1, 131072, dict(window=2048)),
             "T8k": (8192, 8192, dict(window=1024, topk_scope="global", is_causal=True))}


def inputs(Q: int, K: int, dtype=torch.bfloat16):
    """q, k, v, bias on the CPU: q/k/v uninitialised (the kernels are no-ops), the bias random (the
    host path does not read it, but its dtype and strides must be a real bias's)."""
    q = torch.empty(1, Q, 32, 128, dtype=dtype)
    k = torch.empty(1, K, 8, 128, dtype=dtype)
    v = torch.empty(1, K, 8, 128, dtype=dtype)
    bias = torch.randn(1, 8, 1, K).to(dtype)
    return q, k, v, bias


def time_calls(fn, calls=200, repeats=25):
    """Median over ``repeats`` of the mean time per call of ``calls`` calls, in microseconds."""
    for _ in range(calls):
        fn()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return statistics.median(per_call), min(per_call)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("triton", "cuda"), default="triton")
    ap.add_argument("--workload", choices=tuple(WORKLOADS), default="D128k")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile top 25 by tottime")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=25)
    args = ap.parse_args(argv)
    (_patch_triton if args.backend == "triton" else _patch_cuda)()
    Q, K, options = WORKLOADS[args.workload]
    q, k, v, bias = inputs(Q, K)
    with torch.no_grad():
        call = lambda: dmattn.dma_attention(q, k, v, bias, backend=args.backend, **options)  # noqa: E731
        call()
        med, best = time_calls(call, args.calls, args.repeats)
        print(f"{args.backend} {args.workload}: host time per call {med:.1f} us median, {best:.1f} us best "
              f"({args.repeats} x {args.calls} calls, no-op kernels, CPU tensors)")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls * 5):
                call()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
