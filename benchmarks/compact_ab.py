"""A/B of the Triton forward over compact copies of the selected keys (``attention.COMPACT_LIST``)
against the default forward that gathers keys through the indices, on one GPU, in one process.

    python benchmarks/compact_ab.py --json PATH

Times ``dma_attention(q, k, v, bias, window=w, is_causal=True, backend="triton")`` end to end from
the bias (median of ``triton.testing.do_bench``), bf16, B=1, H=32, H_kv=8, D=128, global scope:
T32k (Q = K = 32768, w = 2048) and T8k (Q = K = 8192, w = 1024). Variants alternate within each
of 2 rounds: ``gather`` (COMPACT_LIST False), ``compact`` (True, tensor descriptors where the
device allows) and ``compact-ptr`` (True, descriptors off: contiguous pointer loads). Also times
the compact copy alone (``_compact_lists``: the gather launch and its allocations) and checks the
compact outputs against the gathering one (max abs difference of out and lse).
"""

from __future__ import annotations

import argparse
import json
import pathlib

WORKLOADS = (("T32k", 32768, 32768, 2048), ("T8k", 8192, 8192, 1024))
VARIANTS = (("gather", False, None), ("compact", True, None), ("compact-ptr", True, False))
ROUNDS = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    args = ap.parse_args()
    import torch
    import triton

    import dmattn
    from dmattn.kernels.triton import attention
    from dmattn.problem import make_problem

    torch.manual_seed(0)
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dmattn_path": dmattn.__file__, "ms": {}, "copy_ms": {}, "max_abs_diff": {}, "use_desc": {}}

    def set_variant(compact, desc):
        attention.COMPACT_LIST = compact
        attention.COMPACT_DESC = desc

    for name, Q, K, w in WORKLOADS:
        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        q, k, v, b = rand(1, Q, 32, 128), rand(1, K, 8, 128), rand(1, K, 8, 128), rand(1, 8, 1, K)
        opts = dict(window=w, is_causal=True, topk_scope="global", backend="triton")

        def call():
            return dmattn.dma_attention(q, k, v, b, return_lse=True, **opts)

        outs = {}
        for label, compact, desc in VARIANTS:
            set_variant(compact, desc)
            outs[label] = call()
            torch.cuda.synchronize()
        for label, _, _ in VARIANTS[1:]:
            o, lse = outs[label]
            o0, lse0 = outs["gather"]
            fin = torch.isfinite(lse0)
            res["max_abs_diff"][f"{name} {label}"] = {
                "out": (o.float() - o0.float()).abs().max().item(),
                "lse": (lse[fin] - lse0[fin]).abs().max().item() if fin.any() else 0.0,
                "lse_inf_equal": bool(torch.equal(torch.isfinite(lse), fin)),
            }
            print(f"{name} {label} vs gather: {res['max_abs_diff'][f'{name} {label}']}", flush=True)

        for r in range(ROUNDS):
            for label, compact, desc in VARIANTS:
                set_variant(compact, desc)
                t = triton.testing.do_bench(call, warmup=20, rep=100, return_mode="median")
                res["ms"].setdefault(f"{name} fwd {label}", []).append(t)
                print(f"round {r} {name} fwd {label} {t:.4f} ms", flush=True)

        # The copy alone: one _Launch (selection included, not timed), then _compact_lists.
        p = make_problem(q, k, v, b, None, window=w, is_causal=True, topk_scope="global")
        a = attention._Launch(p, q, k, v, b, None)
        bn = attention.launch_config(p.D, q.element_size(), "fwd")["BLOCK_N"]
        for label, _, desc in VARIANTS[1:]:
            set_variant(True, desc)
            res["use_desc"][f"{name} {label}"] = attention._compact_lists(a, bn)["USE_DESC"]
            t = triton.testing.do_bench(lambda: attention._compact_lists(a, bn), warmup=20, rep=100,
                                        return_mode="median")
            res["copy_ms"][f"{name} {label}"] = t
            print(f"{name} compact copy ({label}) {t:.4f} ms, descriptors {res['use_desc'][f'{name} {label}']}",
                  flush=True)
        set_variant(False, None)

    for key, ts in res["ms"].items():
        print(f"{key}: " + " ".join(f"{t:.4f}" for t in ts) + " ms")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
