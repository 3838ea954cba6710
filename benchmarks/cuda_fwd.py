"""The CuTe forward (``dmattn.cuda_ext.forward``) against the Triton forward on a T32k-like shape.

Default workload: B=1, H=32, H_kv=8, D=128, bfloat16, Q=K=32768, bias (B, H_kv, 1, K), window
w=2048, global scope, causal: the LIST path (one sorted list of w keys per (batch, kv head)).
Both kernels get the same selection; timed separately with ``triton.testing.do_bench`` (median):

- ``selection``: ``cuda_ext.list_selection`` (the Triton backend's torch selection + block counts)
- ``cuda fwd``: the CuTe kernel alone, metadata prebuilt
- ``triton fwd``: the Triton forward kernel alone, metadata prebuilt (same launch as
  ``kernels/triton/attention.forward``)
- ``triton forward()``: the Triton host wrapper end to end (selection included)
- with ``--dense-seq N``: the DENSE path (no window, causal, same bias) at Q=K=N for both kernels,
  and torch SDPA (causal, no bias) as the hardware's dense reference.

Also prints how far the two kernels' outputs are apart, and TFLOP/s of useful work (4 * D flops per
visible (query, key) pair). ``--json PATH`` writes every number.

    python benchmarks/cuda_fwd.py [--seq 32768] [--window 2048] [--dense-seq 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _visible_pairs(idx: torch.Tensor, B: int, H: int, Q: int, K: int, causal: bool) -> int:
    """Sum over (batch, head, query) of the listed keys the query sees; every selection row of
    idx (B_s, H_s, W) serves B * H / (B_s * H_s) (batch, head) pairs."""
    rows = idx.reshape(-1, idx.shape[-1])
    last = torch.arange(Q, device=idx.device, dtype=torch.int32) + (K - Q) if causal else \
        torch.full((Q,), K - 1, device=idx.device, dtype=torch.int32)
    per_row = torch.searchsorted(rows, last.expand(rows.shape[0], Q).contiguous(), right=True).sum()
    return int(per_row.item()) * (B * H // rows.shape[0])


def _triton_kernel_launcher(p, q, k, v, bias, out, lse):
    """The Triton forward kernel with its metadata built once (the launch of attention.forward)."""
    import triton

    from dmattn.kernels.triton import attention as tri

    a = tri._Launch(p, q, k, v, bias, None)
    cfg = tri.launch_config(p.D, q.element_size(), "fwd")
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    counts = a.counts(bm)
    grid = (triton.cdiv(p.Q, bm), p.B * p.H)
    nblk = counts.shape[-1] if a.sel.path == tri.LIST else 1

    def run():
        tri.dma_fwd_kernel[grid](q, k, v, a.bias, a.mask, out, lse, a.idx, counts, a.tv, a.ti, *a.strides,
                                 *out.stride(), **a.sizes, NBLK=nblk, **a.scalars, BLOCK_M=bm, BLOCK_N=bn,
                                 **a.flags, **cfg)
    return run


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(a) & torch.isfinite(b)
    return float((a.float() - b.float())[fin].abs().max().item()) if fin.any() else 0.0


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
    ap.add_argument("--dense-seq", type=int, default=8192, help="DENSE comparison length (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from dmattn import cuda_ext
    from dmattn.kernels.triton import attention as tri
    from dmattn.problem import make_problem

    if not (torch.cuda.is_available() and cuda_ext.has_forward()):
        print(f"needs a GPU and dmattn._cuda with the forward ({cuda_ext.LOAD_ERROR})", file=sys.stderr)
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

    results = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   torch=torch.__version__, cuda_module=cuda_ext.info(),
                   shape=dict(B=B, H=H, H_kv=H_kv, D=D, Q=S, K=S, window=w, causal=causal, dtype=args.dtype))
    rows = []

    def record(name, ms, flops=None):
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        results[name] = dict(ms=ms, tflops=tflops)
        rows.append((name, ms, tflops))
        print(f"  {name:<28} {ms:9.3f} ms" + (f"  {tflops:7.1f} TFLOP/s" if tflops else ""), flush=True)

    print(f"{results['device']} sm_{''.join(map(str, results['capability']))}, torch {torch.__version__}, "
          f"CUDA module {results['cuda_module']}")
    print(f"LIST: B={B} H={H} H_kv={H_kv} D={D} Q=K={S} w={w} {args.dtype} causal={causal}")

    meta = cuda_ext.list_selection(bias, None, window=w, Q=S, head_dim=D, is_causal=causal)
    if meta is None:
        print("this shape does not take the LIST path (window >= K?)", file=sys.stderr)
        return 2
    idx, counts = meta
    flops = 4 * D * _visible_pairs(idx, B, H, S, S, causal)
    results["visible_pairs"] = flops // (4 * D)
    record("selection", _bench(lambda: cuda_ext.list_selection(bias, None, window=w, Q=S, head_dim=D,
                                                                  is_causal=causal)))

    out, lse = cuda_ext.forward(q, k, v, bias, None, is_causal=causal, idx=idx, counts=counts)
    torch.cuda.synchronize()
    record("cuda fwd", _bench(lambda: cuda_ext.forward(q, k, v, bias, None, is_causal=causal, idx=idx,
                                                       counts=counts, out=out, lse=lse)), flops)

    p = make_problem(q, k, v, bias, None, window=w, topk_scope="global", is_causal=causal)
    t_out = torch.empty_like(q)
    t_lse = torch.empty(B, H, S, device=dev, dtype=torch.float32)
    try:
        record("triton fwd", _bench(_triton_kernel_launcher(p, q, k, v, bias, t_out, t_lse)), flops)
    except Exception as exc:  # the launcher reaches into the Triton wrapper's internals
        print(f"  triton fwd kernel alone: skipped ({type(exc).__name__}: {exc})")
    record("triton forward()", _bench(lambda: tri.forward(p, q, k, v, bias, None, t_out, t_lse)), flops)
    torch.cuda.synchronize()
    results["max_abs_diff_out"] = _diff(out, t_out)
    results["max_abs_diff_lse"] = _diff(lse, t_lse)
    results["lse_neginf_rows_cuda"] = int(torch.isneginf(lse).sum().item())
    results["nan_out_cuda"] = int(torch.isnan(out).sum().item())
    print(f"  cuda vs triton: max |out diff| {results['max_abs_diff_out']:.3g}, "
          f"max |lse diff| {results['max_abs_diff_lse']:.3g}, NaN in cuda out: {results['nan_out_cuda']}")

    if args.dense_seq:
        Sd = args.dense_seq
        print(f"DENSE: B={B} H={H} H_kv={H_kv} D={D} Q=K={Sd} {args.dtype} causal={causal}, bias (B, H_kv, 1, K)")
        qd, kd, vd, bd = q[:, :Sd].contiguous(), k[:, :Sd].contiguous(), v[:, :Sd].contiguous(), \
            bias[..., :Sd].contiguous()
        pairs = B * H * (Sd * (Sd + 1) // 2 if causal else Sd * Sd)
        dflops = 4 * D * pairs
        od, ld = cuda_ext.forward(qd, kd, vd, bd, None, is_causal=causal)
        record("cuda fwd dense", _bench(lambda: cuda_ext.forward(qd, kd, vd, bd, None, is_causal=causal,
                                                                 out=od, lse=ld)), dflops)
        pd = make_problem(qd, kd, vd, bd, None, is_causal=causal)
        to, tl = torch.empty_like(qd), torch.empty(B, H, Sd, device=dev, dtype=torch.float32)
        record("triton forward() dense", _bench(lambda: tri.forward(pd, qd, kd, vd, bd, None, to, tl)), dflops)
        torch.cuda.synchronize()
        results["dense_max_abs_diff_out"] = _diff(od, to)
        print(f"  cuda vs triton dense: max |out diff| {results['dense_max_abs_diff_out']:.3g}")
        qs, ks, vs = (t.transpose(1, 2) for t in (qd, kd.repeat_interleave(H // H_kv, 2),
                                                   vd.repeat_interleave(H // H_kv, 2)))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        record("torch sdpa dense (no bias)", _bench(lambda: sdpa(qs, ks, vs, is_causal=causal)), dflops)

    print("\nsummary (ms, median):")
    for name, ms, tf in rows:
        print(f"{name:<28} {ms:9.3f}" + (f"  {tf:7.1f} TFLOP/s" if tf else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
