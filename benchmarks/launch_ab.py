"""A/B of the Triton backend's short launch path (``kernels/triton/launch.py``) against Triton's own,
on one GPU, in one process.

    python benchmarks/launch_ab.py --json PATH

Workloads (bf16, H=32, H_kv=8, D=128, global scope, forward from the bias, no autograd): D128k
(Q=1, K=131072, w=2048), D32k-B8 (B=8, Q=1, K=32768), T8k (Q=K=8192, w=1024, causal). For each,
``launch.ENABLED`` alternates off/on over 3 rounds, and each setting reports:
- ``host_ms``: the time to enqueue one call while the GPU is busy with a long sleep kernel, so the
  host never waits for the GPU: the Python and launch cost per call;
- ``median_ms``: ``triton.testing.do_bench`` median of the call (what a user measures);
and the largest difference of the outputs between the two settings (should be 0).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

WORKLOADS = (("D128k", 1, 1, 131072, 2048, False), ("D32k-B8", 8, 1, 32768, 2048, False),
             ("T8k", 1, 8192, 8192, 1024, True))
ROUNDS = 3
CALLS = 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    args = ap.parse_args()
    import torch
    import triton

    import dmattn
    from dmattn.kernels.triton import launch

    def host_ms(fn):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(5e8))  # ~0.3 s of GPU work: the queue never drains while we enqueue
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        host = (time.perf_counter() - t0) / CALLS * 1e3
        torch.cuda.synchronize()
        return host

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dmattn": dmattn.__version__, "rounds": ROUNDS, "calls": CALLS, "workloads": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, B, Q, K, w, causal in WORKLOADS:
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
        q, k, v, bias = mk(B, Q, 32, 128), mk(B, K, 8, 128), mk(B, K, 8, 128), mk(B, 8, 1, K)
        fn = lambda: dmattn.dma_attention(q, k, v, bias, window=w, is_causal=causal,  # noqa: E731
                                          topk_scope="global", return_lse=True, backend="triton")
        row = {"off": {"host_ms": [], "median_ms": []}, "on": {"host_ms": [], "median_ms": []}}
        outs = {}
        with torch.no_grad():
            for _ in range(ROUNDS):
                for setting in ("off", "on"):
                    launch.ENABLED = setting == "on"
                    for _ in range(20):
                        outs[setting] = fn()
                    row[setting]["host_ms"].append(host_ms(fn))
                    row[setting]["median_ms"].append(triton.testing.do_bench(fn, warmup=25, rep=200,
                                                                             return_mode="median"))
        launch.ENABLED = True
        for setting in ("off", "on"):
            row[setting]["host_ms_median"] = statistics.median(row[setting]["host_ms"])
            row[setting]["median_ms_median"] = statistics.median(row[setting]["median_ms"])
        row["max_abs_diff"] = max(float((a.float() - b.float()).abs().nan_to_num(0.0).max())
                                  for a, b in zip(outs["off"], outs["on"]))
        row["nonfinite_equal"] = all(bool(torch.equal(a.isfinite(), b.isfinite()))
                                     for a, b in zip(outs["off"], outs["on"]))
        res["workloads"][name] = row
        print(f"{name}: host {row['off']['host_ms_median']:.4f} -> {row['on']['host_ms_median']:.4f} ms/call, "
              f"median {row['off']['median_ms_median']:.4f} -> {row['on']['median_ms_median']:.4f} ms, "
              f"max diff {row['max_abs_diff']}, non-finite equal {row['nonfinite_equal']}", flush=True)
    pathlib.Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
