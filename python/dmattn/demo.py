"""``python -m dmattn.demo``: one Dynamic Mask Attention layer step, checked against the reference.

It builds the bias the way the DMA paper's Doge model does (a learned score per key computed from
the values), lets ``backend="auto"`` pick a backend for this machine, runs forward and backward,
compares output, log-sum-exp and all four gradients with the float64 reference, and prints the
errors and the time. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import dmattn
from dmattn import reference


def doge_bias(v: torch.Tensor, dt_proj: torch.nn.Linear, A: torch.Tensor) -> torch.Tensor:
    """(B, K, H_kv, D) values -> (B, H_kv, 1, K) bias = exp(A * softplus(dt_proj(v_j)))."""
    B, K, H_kv, D = v.shape
    dt = torch.nn.functional.softplus(dt_proj(v.reshape(B, K, H_kv * D)))  # (B, K, H_kv)
    return torch.exp(A * dt).transpose(1, 2).unsqueeze(2)


def _timed(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _default_device(args) -> str:
    """CUDA when some backend would run this demo's call there, else CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    meta = lambda *shape: torch.empty(shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k = meta(1, 1, args.heads, args.head_dim), meta(1, 1, args.kv_heads, args.head_dim)
    chosen = dmattn.explain(q, k, k, meta(1, args.kv_heads, 1, 1), window=args.window, is_causal=True).chosen
    return "cuda" if chosen is not None else "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=1024, help="query and key length")
    ap.add_argument("--window", type=int, default=128, help="keys kept per query")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--scope", choices=["visible", "global"], default="visible")
    ap.add_argument("--device", default=None,
                    help="cpu or cuda (default: cuda when a backend there supports the call, else cpu)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or _default_device(args))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    B, S, H, H_kv, D = 1, args.seq, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(B, S, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, H_kv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, H_kv, D, device=device, dtype=dtype, requires_grad=True)
    dt_proj = torch.nn.Linear(H_kv * D, H_kv, device=device, dtype=dtype)
    A = torch.randn(H_kv, device=device, dtype=dtype) * 0.5
    with torch.no_grad():
        bias = doge_bias(v, dt_proj, A)
    bias.requires_grad_(True)
    options = dict(window=args.window, topk_scope=args.scope, is_causal=True)

    chosen = dmattn.explain(q, k, v, bias, **options)
    print(f"dmattn {dmattn.__version__}: B={B} S={S} H={H} H_kv={H_kv} D={D} window={args.window} "
          f"scope={args.scope} causal, {str(dtype).replace('torch.', '')} on {device}")
    print(chosen)
    if chosen.chosen is None:
        return 1

    out, lse = dmattn.dma_attention(q, k, v, bias, return_lse=True, **options)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)

    f64 = [t.detach().double() for t in (q, k, v, bias)]
    ref_out, ref_lse = reference.attention(*f64, None, **options)
    ref_grads = reference.attention_backward(*f64, None, dout.double(), **options)
    # What plain PyTorch at the same precision loses: the yardstick for the backend's error.
    low = [t.detach() for t in (q, k, v, bias)]
    low_out, _ = reference.attention(*low, None, **options)

    rows = [("out", out, ref_out), ("lse", lse, ref_lse)] + \
        [(n, g, r) for n, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads)]
    print(f"\n{'tensor':<7} {'max |err|':>10} {'max |ref|':>10}")
    ok = True
    for name, got, want in rows:
        got64 = got.detach().double()
        finite = torch.isfinite(want)
        err = (got64[finite] - want[finite]).abs().max().item()
        ok &= bool(torch.equal(torch.isfinite(got64), finite)) and not torch.isnan(got64).any().item()
        print(f"{name:<7} {err:>10.2e} {want[finite].abs().max().item():>10.2e}")
    torch_err = (low_out.double() - ref_out).abs().max().item()
    out_err = (out.detach().double() - ref_out).abs().max().item()
    tol = 2 * torch_err + 1e-5 * max(1.0, ref_out.abs().max().item())
    ok &= out_err <= tol
    print(f"out error {out_err:.2e} vs PyTorch at the same precision {torch_err:.2e}: "
          f"{'OK' if ok else 'FAILED'}")

    step = lambda: dmattn.dma_attention(q.detach(), k.detach(), v.detach(), bias.detach(), **options)  # noqa: E731
    print(f"forward time: {_timed(step, 5) * 1e3:.2f} ms (backend {chosen.chosen}, selection included)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
