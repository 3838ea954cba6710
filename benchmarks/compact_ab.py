"""A/B of the Triton kernels over compact copies of the selected keys against the ones that gather
keys through the indices, on one GPU, in one process.

    python benchmarks/compact_ab.py --json PATH [--kernel fwd|dq]

bf16, B=1, H=32, H_kv=8, D=128, global scope, causal: T32k (Q = K = 32768, w = 2048) and T8k
(Q = K = 8192, w = 1024), end to end from the bias (median of ``triton.testing.do_bench``).
Variants alternate within each of 2 rounds: ``gather`` (the switch off), ``compact`` (on, tensor
descriptors where the device allows) and ``compact-ptr`` (on, descriptors off: contiguous pointer
loads). Also times the compact copy alone (``_compact_lists``: the gather launch and its
allocations, at the kernel's BLOCK_N) and reports the largest difference against ``gather``.

- ``--kernel fwd`` (default): ``attention.COMPACT_LIST``; times the forward
  ``dma_attention(q, k, v, bias, window=w, is_causal=True, backend="triton")``; differences of out
  and lse (both should be 0).
- ``--kernel dq``: ``attention.COMPACT_DQ``; times forward and backward (``torch.autograd.grad`` of
  out into q, k, v and the bias), the forward as the module sets it; differences of dq, dk, dv and
  dbias (all should be 0).
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
    ap.add_argument("--kernel", choices=["fwd", "dq"], default="fwd", help="which kernel's compact path")
    args = ap.parse_args()
    import torch
    import triton

    import dmattn
    from dmattn.kernels.triton import attention
    from dmattn.problem import make_problem

    switch = "COMPACT_LIST" if args.kernel == "fwd" else "COMPACT_DQ"
    timed = "fwd" if args.kernel == "fwd" else "fwd+bwd"
    torch.manual_seed(0)
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dmattn_path": dmattn.__file__, "kernel": args.kernel, "compact_list": attention.COMPACT_LIST,
           "ms": {}, "copy_ms": {}, "max_abs_diff": {}, "use_desc": {}}
    defaults = getattr(attention, switch), attention.COMPACT_DESC

    def set_variant(compact, desc):
        setattr(attention, switch, compact)
        attention.COMPACT_DESC = desc

    for name, Q, K, w in WORKLOADS:
        grad = args.kernel == "dq"

        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        q, k, v, b = rand(1, Q, 32, 128), rand(1, K, 8, 128), rand(1, K, 8, 128), rand(1, 8, 1, K)
        dout = torch.randn(1, Q, 32, 128, device="cuda", dtype=torch.bfloat16)
        opts = dict(window=w, is_causal=True, topk_scope="global", backend="triton")

        if grad:
            names = ("dq", "dk", "dv", "dbias")

            def call():
                return torch.autograd.grad(dmattn.dma_attention(q, k, v, b, **opts), (q, k, v, b), dout)
        else:
            names = ("out", "lse")

            def call():
                return dmattn.dma_attention(q, k, v, b, return_lse=True, **opts)

        results = {}
        for label, compact, desc in VARIANTS:
            set_variant(compact, desc)
            results[label] = call()
            torch.cuda.synchronize()
        for label, _, _ in VARIANTS[1:]:
            diff = {}
            for n, x, x0 in zip(names, results[label], results["gather"]):
                fin = torch.isfinite(x0)  # lse is -inf on empty rows
                diff[n] = (x.float() - x0.float())[fin].abs().max().item() if fin.any() else 0.0
                diff[f"{n} non-finite equal"] = bool(torch.equal(torch.isfinite(x), fin))
            res["max_abs_diff"][f"{name} {label}"] = diff
            print(f"{name} {label} vs gather: {diff}", flush=True)
        del results

        for r in range(ROUNDS):
            for label, compact, desc in VARIANTS:
                set_variant(compact, desc)
                t = triton.testing.do_bench(call, warmup=20, rep=100, return_mode="median")
                res["ms"].setdefault(f"{name} {timed} {label}", []).append(t)
                print(f"round {r} {name} {timed} {label} {t:.4f} ms", flush=True)

        # The copy alone at the kernel's BLOCK_N: one _Launch (selection included, not timed).
        qd, kd, vd, bd = (t.detach() for t in (q, k, v, b))
        p = make_problem(qd, kd, vd, bd, None, window=w, is_causal=True, topk_scope="global")
        a = attention._Launch(p, qd, kd, vd, bd, None)
        bn = attention.launch_config(p.D, qd.element_size(), args.kernel)["BLOCK_N"]
        for label, _, desc in VARIANTS[1:]:
            set_variant(True, desc)
            res["use_desc"][f"{name} {label}"] = attention._compact_lists(a, bn)["USE_DESC"]
            t = triton.testing.do_bench(lambda: attention._compact_lists(a, bn), warmup=20, rep=100,
                                        return_mode="median")
            res["copy_ms"][f"{name} {label}"] = t
            print(f"{name} compact copy ({label}, BLOCK_N {bn}) {t:.4f} ms, descriptors "
                  f"{res['use_desc'][f'{name} {label}']}", flush=True)
        set_variant(*defaults)
        del q, k, v, b, dout, qd, kd, vd, bd, a
        torch.cuda.empty_cache()

    for key, ts in res["ms"].items():
        print(f"{key}: " + " ".join(f"{t:.4f}" for t in ts) + " ms")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
