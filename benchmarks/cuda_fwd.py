"""The CuTe forwards (``dmattn.cuda_ext.forward``: the sm_90a wgmma kernel and the sm_80 one) against
the Triton forward on T32k- and T8k-like shapes.

Default workload: B=1, H=32, H_kv=8, D=128, bfloat16, Q=K in (32768, 8192), bias (B, H_kv, 1, K),
window w=2048, global scope, causal: the LIST path (one sorted list of w keys per (batch, kv head)).
All kernels get the same selection; timed separately with ``triton.testing.do_bench`` (median):

- ``selection``: ``cuda_ext.list_selection`` (the Triton backend's torch selection + block counts)
- ``cuda fwd sm90``: the CuTe kernel the dispatch picks with the sm_90a kernel enabled (on an
  H100/H200 with an sm_90a build: the wgmma kernel), metadata prebuilt
- ``cuda fwd sm80``: the same call with ``cuda_ext.set_sm90_enabled(False)`` (the mma.sync kernel)
- ``triton forward()``: the Triton host wrapper end to end (selection included)
- with ``--dense-seq N``: the DENSE path (no window, causal, same bias) at Q=K=N for the CUDA
  kernels (sm90 and sm80) and Triton, and torch SDPA (causal, no bias) as the hardware's dense
  reference.

Also prints how far the kernels' outputs are apart, and TFLOP/s of useful work (4 * D flops per
visible (query, key) pair). ``--json PATH`` writes every number, keyed "T<seq/1024>k <name>".

    python benchmarks/cuda_fwd.py [--seq 32768 8192] [--window 2048] [--dense-seq 8192] [--json out.json]
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


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(a) & torch.isfinite(b)
    return float((a.float() - b.float())[fin].abs().max().item()) if fin.any() else 0.0


class _Sm90:
    """``with _Sm90(on):`` runs the body with the sm_90a forward enabled or switched off."""

    def __init__(self, on: bool):
        from dmattn import cuda_ext

        self.ext, self.on = cuda_ext, on

    def __enter__(self):
        self.before = self.ext.sm90_enabled()
        self.ext.set_sm90_enabled(self.on)
        return self

    def __exit__(self, *exc):
        self.ext.set_sm90_enabled(self.before)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 8192], help="LIST workloads, Q=K=seq")
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
    B, H, H_kv, D, w = args.batch, args.heads, args.kv_heads, args.head_dim, args.window
    causal = not args.no_causal
    S_max = max(args.seq + [args.dense_seq])
    g = torch.Generator(device=dev).manual_seed(0)
    q_all = torch.randn(B, S_max, H, D, device=dev, dtype=dtype, generator=g)
    k_all = torch.randn(B, S_max, H_kv, D, device=dev, dtype=dtype, generator=g)
    v_all = torch.randn(B, S_max, H_kv, D, device=dev, dtype=dtype, generator=g)
    bias_all = torch.randn(B, H_kv, 1, S_max, device=dev, dtype=dtype, generator=g)

    def inputs(S):
        return (q_all[:, :S].contiguous(), k_all[:, :S].contiguous(), v_all[:, :S].contiguous(),
                bias_all[..., :S].contiguous())

    results = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   torch=torch.__version__, cuda_module=cuda_ext.info(),
                   sm90_selected=cuda_ext.uses_sm90(D),
                   shape=dict(B=B, H=H, H_kv=H_kv, D=D, seqs=args.seq, window=w, causal=causal, dtype=args.dtype))
    rows = []

    def record(name, ms, flops=None):
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        results[name] = dict(ms=ms, tflops=tflops)
        rows.append((name, ms, tflops))
        print(f"  {name:<34} {ms:9.3f} ms" + (f"  {tflops:7.1f} TFLOP/s" if tflops else ""), flush=True)

    print(f"{results['device']} sm_{''.join(map(str, results['capability']))}, torch {torch.__version__}, "
          f"CUDA module {results['cuda_module']}")
    print(f"sm_90a forward selected for D={D} when enabled: {results['sm90_selected']}")

    for S in args.seq:
        tag = f"T{S // 1024}k" if S % 1024 == 0 else f"T{S}"
        q, k, v, bias = inputs(S)
        print(f"{tag} LIST: B={B} H={H} H_kv={H_kv} D={D} Q=K={S} w={w} {args.dtype} causal={causal}")
        meta = cuda_ext.list_selection(bias, None, window=w, Q=S, head_dim=D, is_causal=causal)
        if meta is None:
            print(f"  Q=K={S} does not take the LIST path (window >= K?): skipped", file=sys.stderr)
            continue
        idx, counts = meta
        flops = 4 * D * _visible_pairs(idx, B, H, S, S, causal)
        results[f"{tag} visible_pairs"] = flops // (4 * D)
        record(f"{tag} selection", _bench(lambda: cuda_ext.list_selection(bias, None, window=w, Q=S, head_dim=D,
                                                                          is_causal=causal)))
        outs = {}
        for name, on in (("sm90", True), ("sm80", False)):
            with _Sm90(on):
                out, lse = cuda_ext.forward(q, k, v, bias, None, is_causal=causal, idx=idx, counts=counts)
                torch.cuda.synchronize()
                record(f"{tag} cuda fwd {name}", _bench(lambda: cuda_ext.forward(
                    q, k, v, bias, None, is_causal=causal, idx=idx, counts=counts, out=out, lse=lse)), flops)
                outs[name] = (out, lse)

        p = make_problem(q, k, v, bias, None, window=w, topk_scope="global", is_causal=causal)
        t_out = torch.empty_like(q)
        t_lse = torch.empty(B, H, S, device=dev, dtype=torch.float32)
        record(f"{tag} triton forward()", _bench(lambda: tri.forward(p, q, k, v, bias, None, t_out, t_lse)), flops)
        torch.cuda.synchronize()
        for name, (out, lse) in outs.items():
            d = dict(max_abs_diff_out_vs_triton=_diff(out, t_out), max_abs_diff_lse_vs_triton=_diff(lse, t_lse),
                     lse_neginf_rows=int(torch.isneginf(lse).sum().item()), nan_out=int(torch.isnan(out).sum().item()))
            results[f"{tag} check {name}"] = d
            print(f"  cuda {name} vs triton: max |out diff| {d['max_abs_diff_out_vs_triton']:.3g}, "
                  f"max |lse diff| {d['max_abs_diff_lse_vs_triton']:.3g}, NaN in out: {d['nan_out']}")
        results[f"{tag} max_abs_diff_out_sm90_vs_sm80"] = _diff(outs["sm90"][0], outs["sm80"][0])
        del outs, t_out, t_lse, q, k, v, bias, idx, counts, meta

    if args.dense_seq:
        Sd = args.dense_seq
        tag = f"D{Sd // 1024}k" if Sd % 1024 == 0 else f"D{Sd}"
        print(f"{tag} DENSE: B={B} H={H} H_kv={H_kv} D={D} Q=K={Sd} {args.dtype} causal={causal}, "
              "bias (B, H_kv, 1, K)")
        qd, kd, vd, bd = inputs(Sd)
        pairs = B * H * (Sd * (Sd + 1) // 2 if causal else Sd * Sd)
        dflops = 4 * D * pairs
        douts = {}
        for name, on in (("sm90", True), ("sm80", False)):
            with _Sm90(on):
                od, ld = cuda_ext.forward(qd, kd, vd, bd, None, is_causal=causal)
                record(f"{tag} cuda fwd dense {name}", _bench(lambda: cuda_ext.forward(
                    qd, kd, vd, bd, None, is_causal=causal, out=od, lse=ld)), dflops)
                douts[name] = od
        pd = make_problem(qd, kd, vd, bd, None, is_causal=causal)
        to, tl = torch.empty_like(qd), torch.empty(B, H, Sd, device=dev, dtype=torch.float32)
        record(f"{tag} triton forward() dense", _bench(lambda: tri.forward(pd, qd, kd, vd, bd, None, to, tl)), dflops)
        torch.cuda.synchronize()
        for name, od in douts.items():
            results[f"{tag} dense_max_abs_diff_out {name} vs triton"] = _diff(od, to)
            print(f"  cuda {name} vs triton dense: max |out diff| {_diff(od, to):.3g}")
        qs, ks, vs = (t.transpose(1, 2) for t in (qd, kd.repeat_interleave(H // H_kv, 2),
                                                   vd.repeat_interleave(H // H_kv, 2)))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        record(f"{tag} torch sdpa dense (no bias)", _bench(lambda: sdpa(qs, ks, vs, is_causal=causal)), dflops)

    print("\nsummary (ms, median):")
    for name, ms, tf in rows:
        print(f"{name:<34} {ms:9.3f}" + (f"  {tf:7.1f} TFLOP/s" if tf else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
