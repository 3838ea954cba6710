"""Host overhead of one eager decode call on a GPU: the D128k workload (BENCHMARKS.md).

For each backend (triton, cuda) that can run the call, reports the median eager wall time per call
(``torch.cuda.synchronize`` around a loop of calls, after warm-up), the time the loop took to
enqueue before that synchronize (host-bound when it is close to the wall time), the same call
through the custom op ``dmattn::fwd`` and with grad enabled, the replay time of a CUDA graph of the
call (about the GPU time plus one launch), a few host-only stages, and a cProfile top 25 by
tottime. Imports only torch and dmattn; runs against older dmattn trees too (for before/after).

    python benchmarks/host_overhead.py --json host_overhead.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import time

import torch

import dmattn


def d128k(device="cuda", dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, 1, 32, 128, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, 131072, 8, 128, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, 131072, 8, 128, device=device, dtype=dtype, generator=g)
    bias = torch.randn(1, 8, 1, 131072, device=device, dtype=dtype, generator=g)
    return q, k, v, bias


def timed_loop(fn, calls, repeats):
    """Per repeat: wall ms per call (synchronised) and enqueue ms per call (before the sync)."""
    wall, enqueue = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) / calls * 1e3)
        wall.append((t2 - t0) / calls * 1e3)
    return wall, enqueue


def host_loop(fn, calls, repeats):
    """Microseconds per call of host-only work (no GPU work to wait for): median and best."""
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    return {"median_us": round(statistics.median(per), 2), "best_us": round(min(per), 2)}


def graph_replay_ms(fn, calls, repeats):
    """Median ms per replay of a CUDA graph holding one call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):
        graph.replay()
    wall, _ = timed_loop(graph.replay, calls, repeats)
    return statistics.median(wall)


def profile_top(fn, calls, top=25):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def run_backend(name, tensors, window, calls, repeats, warmup):
    q, k, v, bias = tensors
    why = dmattn.explain(q, k, v, bias, window=window, backend=name).reasons.get(name)
    if why:
        return {"skipped": "; ".join(why)}
    call = lambda: dmattn.dma_attention(q, k, v, bias, window=window, backend=name)  # noqa: E731
    res = {}
    with torch.no_grad():
        for _ in range(warmup):
            call()
        torch.cuda.synchronize()
        wall, enqueue = timed_loop(call, calls, repeats)
        res["eager_ms"] = statistics.median(wall)
        res["eager_best_ms"] = min(wall)
        res["eager_enqueue_ms"] = statistics.median(enqueue)
        res["eager_ms_all"] = wall
        res["graph_replay_ms"] = graph_replay_ms(call, calls, repeats)
        # The same call through the custom op itself (what every eager call paid before the direct path).
        options = (q.shape[-1] ** -0.5, 0.0, False, window, False, False, name)
        op = lambda: torch.ops.dmattn.fwd(q, k, v, bias, None, *options)  # noqa: E731
        for _ in range(warmup):
            op()
        res["op_eager_ms"] = statistics.median(timed_loop(op, calls, repeats)[0])
        res["profile_top25_tottime"] = profile_top(call, calls * 2)
    # Grad enabled, no input requires grad: what a plain eager script outside no_grad pays.
    for _ in range(warmup):
        call()
    res["grad_enabled_eager_ms"] = statistics.median(timed_loop(call, calls, repeats)[0])
    # Host-only stages (no GPU work), when this dmattn tree has them.
    try:
        from dmattn import dispatch
        from dmattn.problem import make_problem
        problem = make_problem(q, k, v, bias, window=window)
        res["make_problem"] = host_loop(lambda: make_problem(q, k, v, bias, window=window), calls, repeats)
        res["dispatch_select"] = host_loop(lambda: dispatch.select(problem, name), calls, repeats)
        res["torch_empty_cuda"] = host_loop(lambda: torch.empty(1024, device=q.device), calls, repeats)
    except (ImportError, AttributeError, TypeError) as exc:
        res["stages_error"] = repr(exc)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {"workload": "D128k: q (1,1,32,128), k/v (1,131072,8,128), bias (1,8,1,131072) bf16, window 2048",
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton_version,
              "python": platform.python_version(), "dmattn": getattr(dmattn, "__version__", None),
              "dmattn_file": dmattn.__file__, "calls": args.calls, "repeats": args.repeats, "backends": {}}
    tensors = d128k()
    for name in args.backends:
        try:
            res = run_backend(name, tensors, 2048, args.calls, args.repeats, args.warmup)
        except Exception as exc:  # one backend's failure should not hide the other's numbers
            res = {"error": repr(exc)}
        report["backends"][name] = res
        print(f"== {name}")
        for key, val in res.items():
            if key in ("profile_top25_tottime", "eager_ms_all"):
                continue
            print(f"  {key}: {val:.4f}" if isinstance(val, float) else f"  {key}: {val}")
        if "profile_top25_tottime" in res:
            print(res["profile_top25_tottime"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
