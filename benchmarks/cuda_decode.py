"""The CUDA backend's decode forward: the split forward (``kernels/cuda/fwd_split.h``) against the
one-block-per-query-block forward it replaces (``cuda_ext.SPLIT_DECODE`` off, same process) and
dense SDPA decode, on BENCHMARKS.md's decode workloads:

- D128k: B=1, Q=1, K=131072, H=32, H_kv=8, D=128, w=2048, bf16, global scope, no causality
- D32k-B8: the same with B=8, K=32768

Rows per workload, each timed eagerly (a loop of calls between two CUDA events: GPU time plus any
host gaps) and as a CUDA graph replay (about the GPU time):

- ``select``: ``cuda_ext.list_selection`` alone (the radix select and the block counts)
- ``fwd split`` / ``fwd one-block``: ``cuda_ext.forward`` with that selection prebuilt
- ``decode`` / ``decode, no PDL``: ``cuda_ext.decode`` (select and split forward in one module call,
  one chain of kernels), with its launches overlapping (the default) and without
  (``cuda_ext.set_pdl_enabled(False)``)
- ``backend split`` / ``backend one-block``: ``dma_attention(backend="cuda")`` end to end from the bias
  (the first through ``cuda_ext.decode``)
- ``sdpa dense``: ``scaled_dot_product_attention`` over all K keys (GQA, no bias), the dense peer

plus the splits the split forward used and how far its output is from the one-block kernel's.
``--q-sweep`` adds the two forwards alone at Q = 2, 4, 8, 16 on the D128k shape (where the split
forward should stop being used: ``kFwdSplitMaxQ``). ``--kernels`` adds the GPU time of each kernel
of one backend call (torch.profiler over eager calls, median per kernel, in launch order; without
overlapping launches, whose spans would include each kernel's wait for the one before). Needs no
Triton. Runs in well under a minute.

    python benchmarks/cuda_decode.py [--json out.json] [--q-sweep] [--kernels] [--reps 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

WORKLOADS = {"D128k": dict(B=1, K=131072), "D32k-B8": dict(B=8, K=32768)}
H, H_KV, D, WINDOW = 32, 8, 128, 2048


def _events_ms(fn, calls: int, reps: int) -> float:
    """Median over ``reps`` of the GPU time of ``calls`` back-to-back calls, per call."""
    per = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) / calls)
    return statistics.median(per)


def _timed(fn, calls: int, reps: int) -> dict:
    """Eager and CUDA-graph-replay milliseconds per call of ``fn``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    eager = _events_ms(fn, calls, reps)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    replay = _events_ms(graph.replay, calls, reps)
    return dict(eager_ms=round(eager, 5), graph_ms=round(replay, 5))


def _kernel_times(fn, calls: int) -> list:
    """The kernels one call of ``fn`` launches, in launch order, each with its median GPU time over
    ``calls`` eager calls (torch.profiler)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_call = len(events) // calls
    if per_call == 0 or per_call * calls != len(events):
        return [dict(error=f"{len(events)} GPU events for {calls} calls: not the same kernels every call")]
    return [dict(kernel=events[i].name[:160],
                 us=round(statistics.median(events[c * per_call + i].time_range.elapsed_us() for c in range(calls)), 2))
            for i in range(per_call)]


@contextlib.contextmanager
def _pdl(on: bool):
    from dmattn import cuda_ext

    before = cuda_ext.pdl_enabled()
    cuda_ext.set_pdl_enabled(on)
    try:
        yield
    finally:
        cuda_ext.set_pdl_enabled(before)


@contextlib.contextmanager
def _split_decode(on: bool):
    from dmattn import cuda_ext

    before = cuda_ext.SPLIT_DECODE
    cuda_ext.SPLIT_DECODE = on
    try:
        yield
    finally:
        cuda_ext.SPLIT_DECODE = before


def _inputs(B: int, Q: int, K: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return rnd(B, Q, H, D), rnd(B, K, H_KV, D), rnd(B, K, H_KV, D), rnd(B, H_KV, 1, K)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(a) & torch.isfinite(b)
    return float((a.float() - b.float())[fin].abs().max().item()) if fin.any() else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--q-sweep", action="store_true", help="also time both forwards at Q = 2, 4, 8, 16 (D128k shape)")
    ap.add_argument("--kernels", action="store_true", help="also the GPU time of each kernel of one backend call")
    ap.add_argument("--calls", type=int, default=20, help="calls per timed loop")
    ap.add_argument("--reps", type=int, default=30, help="timed loops per row (median)")
    args = ap.parse_args()

    import dmattn
    from dmattn import cuda_ext

    if not (torch.cuda.is_available() and cuda_ext.has_forward()):
        print(f"needs a GPU and dmattn._cuda with the forward ({cuda_ext.LOAD_ERROR})", file=sys.stderr)
        return 2
    if not cuda_ext.has_split():
        print("dmattn._cuda has no split forward (fwd_split_count): rebuild the module", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    results = dict(device=props.name, sms=props.multi_processor_count,
                   capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
                   cuda_module=cuda_ext.info(), shape=dict(H=H, H_kv=H_KV, D=D, window=WINDOW, dtype="bfloat16"),
                   timer=f"CUDA events around {args.calls} calls, median of {args.reps}", workloads={})
    print(f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}")
    kw = dict(calls=args.calls, reps=args.reps)
    opts = dict(window=WINDOW, topk_scope="global")

    for name in args.workloads:
        B, K = WORKLOADS[name]["B"], WORKLOADS[name]["K"]
        q, k, v, bias = _inputs(B, 1, K)
        row = {}
        sel = lambda: cuda_ext.list_selection(bias, None, window=WINDOW, Q=1, head_dim=D, is_causal=False)  # noqa: E731
        idx, counts = sel()
        row["splits"] = cuda_ext.split_count(q, k, idx)
        row["select"] = _timed(sel, **kw)
        row["fwd split"] = _timed(lambda: cuda_ext.forward(q, k, v, bias, None, idx=idx, counts=counts), **kw)
        row["fwd one-block"] = _timed(lambda: cuda_ext.forward(q, k, v, bias, None, idx=idx, counts=counts, splits=0),
                                      **kw)
        if cuda_ext.has_decode():
            decode = lambda: cuda_ext.decode(q, k, v, bias, None, window=WINDOW)  # noqa: E731
            row["decode"] = _timed(decode, **kw)
            with _pdl(False):
                row["decode, no PDL"] = _timed(decode, **kw)
        else:
            row["decode"] = dict(skipped="dmattn._cuda has no decode (one-call select + split forward)")
        backend = lambda: dmattn.dma_attention(q, k, v, bias, backend="cuda", **opts)  # noqa: E731
        row["backend split"] = _timed(backend, **kw)
        with _split_decode(False):
            row["backend one-block"] = _timed(backend, **kw)
        qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)  # noqa: E731
        try:
            row["sdpa dense"] = _timed(sdpa, **kw)
        except (RuntimeError, TypeError) as exc:  # enable_gqa needs torch >= 2.5
            row["sdpa dense"] = dict(skipped=str(exc)[:200])
        if args.kernels:
            with _pdl(False):
                row["kernels of backend split"] = _kernel_times(backend, args.calls)
        split_out, _ = cuda_ext.forward(q, k, v, bias, None, idx=idx, counts=counts)
        block_out, _ = cuda_ext.forward(q, k, v, bias, None, idx=idx, counts=counts, splits=0)
        row["max |split - one-block|"] = _diff(split_out, block_out)
        results["workloads"][name] = row
        print(f"{name}: B={B} K={K} w={WINDOW}, {row['splits']} splits, "
              f"max |split - one-block| = {row['max |split - one-block|']:.3g}")
        for key, val in row.items():
            if isinstance(val, dict) and "eager_ms" in val:
                print(f"  {key:<20} eager {val['eager_ms']:8.4f} ms   graph {val['graph_ms']:8.4f} ms")
            elif isinstance(val, dict):
                print(f"  {key:<20} skipped: {val['skipped']}")
            elif isinstance(val, list):
                print(f"  {key}:")
                for kern in val:
                    print(f"    {kern.get('us', float('nan')):8.1f} us  {kern.get('kernel', kern.get('error'))[:100]}")
        del q, k, v, bias, idx, counts
        torch.cuda.empty_cache()

    if args.q_sweep:
        sweep = {}
        K = WORKLOADS["D128k"]["K"]
        _, k, v, bias = _inputs(1, 1, K)
        for Q in (2, 4, 8, 16):
            q = _inputs(1, Q, 1, seed=Q)[0]
            idx, counts = cuda_ext.list_selection(bias, None, window=WINDOW, Q=Q, head_dim=D, is_causal=False)
            sweep[f"Q={Q}"] = dict(
                splits=cuda_ext.split_count(q, k, idx),
                split=_timed(lambda: cuda_ext.forward(q, k, v, bias, None, idx=idx, counts=counts), **kw),
                one_block=_timed(lambda: cuda_ext.forward(q, k, v, bias, None, idx=idx, counts=counts, splits=0),
                                 **kw))
            s = sweep[f"Q={Q}"]
            print(f"  Q={Q:<3} split ({s['splits']}) graph {s['split']['graph_ms']:8.4f} ms   "
                  f"one-block graph {s['one_block']['graph_ms']:8.4f} ms")
        results["q_sweep_D128k_fwd"] = sweep

    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"done in {results['wall_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
