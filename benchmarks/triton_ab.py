"""Quick A/B timing of the Triton backend between two checkouts, on one GPU, in one session.

    PYTHONPATH=<checkout A's dmattn> python benchmarks/triton_ab.py --tag A --out-dir DIR
    PYTHONPATH=<checkout B's dmattn> python benchmarks/triton_ab.py --tag B --out-dir DIR

Times ``dma_attention(..., backend="triton")`` end to end from the bias (median of
``triton.testing.do_bench``), bf16, H=32, H_kv=8, D=128, B=1: T32k and T8k (global scope, causal,
forward and forward+backward), T32k and T8k in the visible scope, and D128k decode (forward). No
peers: for the comparison with dense attention and FlexAttention use ``python -m dmattn.bench``. Writes
``triton-ab-<tag>.json`` (times in ms, card, versions).
"""

from __future__ import annotations

import argparse
import json
import pathlib

WORKLOADS = (("T32k", 32768, 32768, 2048, "global", True), ("T8k", 8192, 8192, 1024, "global", True),
             ("T32k-visible", 32768, 32768, 2048, "visible", True), ("T8k-visible", 8192, 8192, 1024, "visible", True),
             ("D128k", 1, 131072, 2048, "global", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", required=True, help="names the checkout in the output")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--workloads", nargs="+", help="names or prefixes of names to time (default: all)")
    args = ap.parse_args()
    import torch
    import triton

    import dmattn

    torch.manual_seed(0)
    res = {"tag": args.tag, "card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "dmattn_path": dmattn.__file__, "ms": {}}

    def bench(name, fn, grads=None):
        t = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median", grad_to_none=grads)
        res["ms"][name] = t
        print(f"{args.tag} {name} {t:.4f} ms", flush=True)

    for name, Q, K, w, scope, with_bwd in WORKLOADS:
        if args.workloads and not any(name.startswith(x) for x in args.workloads):
            continue
        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        q, k, v, b = rand(1, Q, 32, 128), rand(1, K, 8, 128), rand(1, K, 8, 128), rand(1, 8, 1, K)
        opts = dict(window=w, is_causal=Q > 1, topk_scope=scope, backend="triton")
        bench(f"{name} fwd", lambda: dmattn.dma_attention(q, k, v, b, **opts))
        if with_bwd:
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v, b)]

            def step():
                out = dmattn.dma_attention(*leaves, **opts)
                out.backward(torch.ones_like(out))
            bench(f"{name} fwd+bwd", step, leaves)
    out = pathlib.Path(args.out_dir) / f"triton-ab-{args.tag}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
