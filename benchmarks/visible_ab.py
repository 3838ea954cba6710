"""A/B of the visible-scope (PREFIX) Triton forward over compact super-block copies
(``attention.COMPACT_PREFIX`` on) against the gathering forward (off), on one GPU, in one process.

    python benchmarks/visible_ab.py --json PATH [--profile] [--superblock N ...]

bf16, B=1, H=32, H_kv=8, D=128, causal, ``topk_scope="visible"``, bias (1, 8, 1, K): T32k
(Q = K = 32768, w = 2048) and T8k (Q = K = 8192, w = 1024), end to end from the bias (median of
``triton.testing.do_bench``), forward only (the backward is unchanged). Variants alternate within
each of 2 rounds: ``gather`` (off), ``compact`` (on, tensor descriptors where the device allows),
``compact-ptr`` (on, pointer loads), and ``compact-sb<N>`` for each ``--superblock N`` (queries per
super-block, default the window). Reports the largest |difference| of out and lse against
``gather`` over its finite entries and whether the non-finite entries match (the keys are summed in
another order, so out differs by rounding only). ``--profile`` adds a torch.profiler table of the
kernels of one ``compact`` call per workload.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

WORKLOADS = (("T32k", 32768, 32768, 2048), ("T8k", 8192, 8192, 1024))
ROUNDS = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the compact forward")
    ap.add_argument("--superblock", type=int, nargs="*", default=[], help="extra queries-per-super-block variants")
    args = ap.parse_args()
    import torch
    import triton

    import dmattn
    from dmattn.kernels.triton import attention

    t_start = time.time()
    torch.manual_seed(0)
    variants = [("gather", False, None, None), ("compact", True, None, None), ("compact-ptr", True, False, None)]
    variants += [(f"compact-sb{n}", True, None, n) for n in args.superblock]
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dmattn_path": dmattn.__file__, "ms": {}, "median_ms": {}, "diff": {}, "profile": {}}
    defaults = attention.COMPACT_PREFIX, attention.COMPACT_DESC, attention.PREFIX_SUPERBLOCK

    def set_variant(on, desc, sbq):
        attention.COMPACT_PREFIX, attention.COMPACT_DESC, attention.PREFIX_SUPERBLOCK = on, desc, sbq

    for name, Q, K, w in WORKLOADS:
        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        q, k, v, b = rand(1, Q, 32, 128), rand(1, K, 8, 128), rand(1, K, 8, 128), rand(1, 8, 1, K)

        def call():
            return dmattn.dma_attention(q, k, v, b, window=w, is_causal=True, topk_scope="visible",
                                        return_lse=True, backend="triton")

        results = {}
        for label, on, desc, sbq in variants:
            set_variant(on, desc, sbq)
            results[label] = call()
            torch.cuda.synchronize()
        for label, *_ in variants[1:]:
            diff = {}
            for n, x, x0 in zip(("out", "lse"), results[label], results["gather"]):
                fin = torch.isfinite(x0)
                diff[n] = (x.float() - x0.float())[fin].abs().max().item() if fin.any() else 0.0
                diff[f"{n} non-finite equal"] = bool(torch.equal(torch.isfinite(x), fin))
            res["diff"][f"{name} {label}"] = diff
            print(f"{name} {label} vs gather: {diff}", flush=True)
        del results

        for r in range(ROUNDS):
            for label, on, desc, sbq in variants:
                set_variant(on, desc, sbq)
                t = triton.testing.do_bench(call, warmup=10, rep=60, return_mode="median")
                res["ms"].setdefault(f"{name} fwd {label}", []).append(t)
                print(f"round {r} {name} fwd {label} {t:.4f} ms", flush=True)

        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            set_variant(True, None, None)
            call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    call()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
            res["profile"][name] = table
            print(f"{name} compact forward, 5 calls:\n{table}", flush=True)
        set_variant(*defaults)
        del q, k, v, b
        torch.cuda.empty_cache()

    for key, ts in res["ms"].items():
        res["median_ms"][key] = sorted(ts)[len(ts) // 2]
        print(f"{key}: " + " ".join(f"{t:.4f}" for t in ts) + " ms")
    res["wall_s"] = time.time() - t_start
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
