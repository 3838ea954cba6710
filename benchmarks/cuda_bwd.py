"""The CuTe backward (``dmattn.cuda_ext.backward``) and forward+backward against Triton's on a
T32k-like shape.

Default workload: B=1, H=32, H_kv=8, D=128, bfloat16, Q=K=32768, bias (B, H_kv, 1, K) with
gradient, window w=2048, global scope, causal: the LIST path. The selection is built once and
shared; timed with ``triton.testing.do_bench`` (median):

- ``cuda bwd`` / ``triton bwd``: the backward alone (delta, dq, dk/dv, dbias), forward outputs
  prebuilt
- ``cuda fwd+bwd`` / ``triton fwd+bwd``: forward then backward, selection excluded for CUDA (its
  metadata is prebuilt) and included for Triton's host wrappers (they build it per call); the
  ``selection`` row is what that costs

Also prints how far the two backwards' gradients are apart and TFLOP/s of useful work (10 * D
flops per visible (query, key) pair for the backward, 14 * D for forward+backward).
``--json PATH`` writes every number.

    python benchmarks/cuda_bwd.py [--seq 32768] [--window 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from cuda_fwd import _bench, _diff, _visible_pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from dmattn import cuda_ext
    from dmattn.kernels.triton import attention as tri
    from dmattn.problem import make_problem

    if not (torch.cuda.is_available() and cuda_ext.has_backward()):
        print(f"needs a GPU and dmattn._cuda with the backward ({cuda_ext.LOAD_ERROR})", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    B, H, H_kv, D, S, w = args.batch, args.heads, args.kv_heads, args.head_dim, args.seq, args.window
    causal = not args.no_causal
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, S, H, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, S, H_kv, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, S, H_kv, D, device=dev, dtype=dtype, generator=g)
    bias = torch.randn(B, H_kv, 1, S, device=dev, dtype=dtype, generator=g)
    dout = torch.randn(B, S, H, D, device=dev, dtype=dtype, generator=g)

    results = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   torch=torch.__version__, cuda_module=cuda_ext.info(),
                   shape=dict(B=B, H=H, H_kv=H_kv, D=D, Q=S, K=S, window=w, causal=causal, dtype=args.dtype))
    rows = []

    def record(name, ms, flops=None):
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        results[name] = dict(ms=ms, tflops=tflops)
        rows.append((name, ms, tflops))
        print(f"  {name:<22} {ms:9.3f} ms" + (f"  {tflops:7.1f} TFLOP/s" if tflops else ""), flush=True)

    print(f"{results['device']} sm_{''.join(map(str, results['capability']))}, torch {torch.__version__}, "
          f"CUDA module {results['cuda_module']}")
    print(f"LIST: B={B} H={H} H_kv={H_kv} D={D} Q=K={S} w={w} {args.dtype} causal={causal}, dbias wanted")

    meta = cuda_ext.list_selection(bias, None, window=w, Q=S, head_dim=D, is_causal=causal)
    if meta is None:
        print("this shape does not take the LIST path (window >= K?)", file=sys.stderr)
        return 2
    idx, counts = meta
    pairs = _visible_pairs(idx, B, H, S, S, causal)
    results["visible_pairs"] = pairs
    record("selection", _bench(lambda: cuda_ext.list_selection(bias, None, window=w, Q=S, head_dim=D,
                                                                  is_causal=causal)))

    def cuda_fwd():
        return cuda_ext.forward(q, k, v, bias, None, is_causal=causal, idx=idx, counts=counts)

    out, lse = cuda_fwd()

    def cuda_bwd(o, l):
        return cuda_ext.backward(dout, q, k, v, o, l, bias, None, is_causal=causal, idx=idx)

    grads = cuda_bwd(out, lse)
    torch.cuda.synchronize()
    record("cuda bwd", _bench(lambda: cuda_bwd(out, lse)), 10 * D * pairs)
    record("cuda fwd+bwd", _bench(lambda: cuda_bwd(*cuda_fwd())), 14 * D * pairs)

    p = make_problem(q, k, v, bias, None, window=w, topk_scope="global", is_causal=causal)
    t_out = torch.empty_like(q)
    t_lse = torch.empty(B, H, S, device=dev, dtype=torch.float32)
    tri.forward(p, q, k, v, bias, None, t_out, t_lse)
    t_grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)]

    def triton_bwd(o, l):
        tri.backward(p, dout, q, k, v, bias, None, o, l, *t_grads)

    def triton_fwd_bwd():
        tri.forward(p, q, k, v, bias, None, t_out, t_lse)
        triton_bwd(t_out, t_lse)

    record("triton bwd", _bench(lambda: triton_bwd(t_out, t_lse)), 10 * D * pairs)
    record("triton fwd+bwd", _bench(triton_fwd_bwd), 14 * D * pairs)
    torch.cuda.synchronize()
    triton_bwd(t_out, t_lse)
    torch.cuda.synchronize()
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), grads, t_grads):
        results[f"max_abs_diff_{name}"] = _diff(a, b)
        results[f"nan_{name}_cuda"] = int(torch.isnan(a).sum().item())
    print("  cuda vs triton: " + ", ".join(f"max |{n} diff| {results[f'max_abs_diff_{n}']:.3g}"
                                            for n in ("dq", "dk", "dv", "dbias")))

    print("\nsummary (ms, median):")
    for name, ms, tf in rows:
        print(f"{name:<22} {ms:9.3f}" + (f"  {tf:7.1f} TFLOP/s" if tf else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
