"""Host time against GPU time of one dmattn call: is it bound by the host or by its kernels?

For each workload and backend: the eager median (``triton.testing.do_bench``), the replay of the
forward captured in a CUDA graph (its GPU time plus one launch), and a torch.profiler trace of a
few calls giving the summed GPU time of every kernel per call and the heaviest kernels by name.
bf16, H=32, H_kv=8, D=128, B=1, causal, bias (1, 8, 1, K), end to end from the bias.

    python benchmarks/gpu_time.py --workloads T8k-visible T32k-visible --backends triton cuda --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

import dmattn
from dmattn.bench import graph_ms

WORKLOADS = {"T8k": (8192, 1024, "global"), "T32k": (32768, 2048, "global"),
             "T8k-visible": (8192, 1024, "visible"), "T32k-visible": (32768, 2048, "visible")}


def kernel_times(fn, calls: int) -> tuple[float, list]:
    """GPU ms per call summed over all kernels, and the top kernels (name, ms per call)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] += e.device_time / 1e3 / calls
    return sum(per.values()), [(n[:90], round(t, 4)) for n, t in per.most_common(8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    ap.add_argument("--calls", type=int, default=10, help="profiled calls per measurement")
    ap.add_argument("--json")
    args = ap.parse_args()
    import triton
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": []}
    for wl in args.workloads:
        S, w, scope = WORKLOADS[wl]
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
        q, k, v, b = mk(1, S, 32, 128), mk(1, S, 8, 128), mk(1, S, 8, 128), mk(1, 8, 1, S)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, b)]
        for be in args.backends:
            opts = dict(window=w, is_causal=True, topk_scope=scope, backend=be)
            why = dmattn.explain(q, k, v, b, **opts).reasons.get(be)
            if why:
                res["rows"].append(dict(workload=wl, backend=be, skipped="; ".join(why)))
                continue

            def fwd():
                with torch.no_grad():
                    return dmattn.dma_attention(q, k, v, b, **opts)

            def step():
                out = dmattn.dma_attention(*leaves, **opts)
                out.backward(torch.ones_like(out))
                for t in leaves:
                    t.grad = None
            row = dict(workload=wl, backend=be)
            row["fwd_eager_ms"] = triton.testing.do_bench(fwd, warmup=20, rep=100, return_mode="median")
            row["fwd_graph_ms"], why = graph_ms(fwd, q.device, 20, 100)
            if why:
                row["fwd_graph_error"] = why
            row["fwd_gpu_ms"], row["fwd_kernels"] = kernel_times(fwd, args.calls)
            row["step_eager_ms"] = triton.testing.do_bench(step, warmup=5, rep=60, return_mode="median")
            row["step_gpu_ms"], row["step_kernels"] = kernel_times(step, args.calls)
            res["rows"].append(row)
            graph = "-" if row["fwd_graph_ms"] is None else f"{row['fwd_graph_ms']:.3f}"
            print(f"{wl} {be}: fwd eager {row['fwd_eager_ms']:.3f} graph {graph} "
                  f"kernels {row['fwd_gpu_ms']:.3f} ms; fwd+bwd eager {row['step_eager_ms']:.3f} "
                  f"kernels {row['step_gpu_ms']:.3f} ms", flush=True)
            for name, t in row["fwd_kernels"]:
                print(f"    fwd  {t:8.4f}  {name}")
            for name, t in row["step_kernels"]:
                print(f"    step {t:8.4f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
