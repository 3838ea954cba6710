"""A/B of the Triton dq kernel over compact copies of the selected keys (``attention.COMPACT_DQ``)
against the default dq that gathers keys through the indices, on one GPU, in one process.

    python benchmarks/compact_dq_ab.py --json PATH

Times the forward and backward of ``dma_attention(q, k, v, bias, window=w, is_causal=True,
backend="triton")`` end to end from the bias (median of ``triton.testing.do_bench`` over
``torch.autograd.grad`` of out into q, k, v and the bias), bf16, B=1, H=32, H_kv=8, D=128, global
scope: T32k (Q = K = 32768, w = 2048) and T8k (Q = K = 8192, w = 1024). Variants alternate within
each of 2 rounds: ``gather`` (COMPACT_DQ False), ``compact`` (True, tensor descriptors where the
device allows) and ``compact-ptr`` (True, descriptors off: contiguous pointer loads). The forward
is the default one (COMPACT_LIST as set in the module) in every variant. Also checks the compact
gradients against the gathering ones (max abs difference of dq, dk, dv and dbias; dq should be 0)
and times the dq launch's compact copy alone (``_compact_lists`` at the dq BLOCK_N).
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
           "dmattn_path": dmattn.__file__, "compact_list": attention.COMPACT_LIST, "ms": {}, "copy_ms": {},
           "max_abs_diff": {}, "use_desc": {}}
    default_dq, default_desc = attention.COMPACT_DQ, attention.COMPACT_DESC

    def set_variant(compact, desc):
        attention.COMPACT_DQ = compact
        attention.COMPACT_DESC = desc

    for name, Q, K, w in WORKLOADS:
        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v, b = rand(1, Q, 32, 128), rand(1, K, 8, 128), rand(1, K, 8, 128), rand(1, 8, 1, K)
        dout = torch.randn(1, Q, 32, 128, device="cuda", dtype=torch.bfloat16)
        opts = dict(window=w, is_causal=True, topk_scope="global", backend="triton")

        def call():
            out = dmattn.dma_attention(q, k, v, b, **opts)
            return torch.autograd.grad(out, (q, k, v, b), dout)

        grads = {}
        for label, compact, desc in VARIANTS:
            set_variant(compact, desc)
            grads[label] = call()
            torch.cuda.synchronize()
        for label, _, _ in VARIANTS[1:]:
            res["max_abs_diff"][f"{name} {label}"] = {
                gname: (g.float() - g0.float()).abs().max().item()
                for gname, g, g0 in zip(("dq", "dk", "dv", "dbias"), grads[label], grads["gather"])}
            print(f"{name} {label} vs gather: {res['max_abs_diff'][f'{name} {label}']}", flush=True)
        del grads

        for r in range(ROUNDS):
            for label, compact, desc in VARIANTS:
                set_variant(compact, desc)
                t = triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median")
                res["ms"].setdefault(f"{name} fwd+bwd {label}", []).append(t)
                print(f"round {r} {name} fwd+bwd {label} {t:.4f} ms", flush=True)

        # The copy alone at the dq launch's BLOCK_N: one _Launch (selection included, not timed).
        qd, kd, vd, bd = (t.detach() for t in (q, k, v, b))
        p = make_problem(qd, kd, vd, bd, None, window=w, is_causal=True, topk_scope="global")
        a = attention._Launch(p, qd, kd, vd, bd, None)
        bn = attention.launch_config(p.D, qd.element_size(), "dq")["BLOCK_N"]
        for label, _, desc in VARIANTS[1:]:
            set_variant(True, desc)
            res["use_desc"][f"{name} {label}"] = attention._compact_lists(a, bn)["USE_DESC"]
            t = triton.testing.do_bench(lambda: attention._compact_lists(a, bn), warmup=20, rep=100,
                                        return_mode="median")
            res["copy_ms"][f"{name} {label}"] = t
            print(f"{name} dq compact copy ({label}, BLOCK_N {bn}) {t:.4f} ms, descriptors "
                  f"{res['use_desc'][f'{name} {label}']}", flush=True)
        set_variant(default_dq, default_desc)
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
