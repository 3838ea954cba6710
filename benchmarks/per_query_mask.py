"""Per-query (4-D) masks: what tile skipping buys.

Workload: bf16, B=1, Q=K=8192 (``--seq``), H=32, H_kv=8, D=128, causal, no bias, no window, a
per-query bool mask (1, 1, Q, K) built from 128 x 64 blocks, each kept with probability ``frac``
(the diagonal blocks always, so no row is empty). The Triton backend skips the key tiles that
hold no visible pair (``tile_occupancy_kernel``); the cuda backend visits every causal tile with a
per-element test; dense causal cuDNN SDPA (no mask) is the hardware's reference for the same shape.
Forward only, ``triton.testing.do_bench`` median in ms.

    python benchmarks/per_query_mask.py [--seq 8192] [--fracs 1.0 0.25 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import triton

import dmattn


def block_mask(S: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    blocks = torch.rand(S // 128, S // 64, device="cuda", generator=gen) < frac
    blocks |= torch.eye(S // 128, S // 64, device="cuda", dtype=torch.bool)
    return blocks.repeat_interleave(128, 0).repeat_interleave(64, 1)[None, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--fracs", type=float, nargs="+", default=[1.0, 0.25, 0.1])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    S, H, H_kv, D = args.seq, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v = mk(1, S, H, D), mk(1, S, H_kv, D), mk(1, S, H_kv, D)
    bench = lambda f: triton.testing.do_bench(f, warmup=5, rep=50, return_mode="median")  # noqa: E731
    res = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), seq=S, ms={})
    for frac in args.fracs:
        m = block_mask(S, frac, gen)
        for backend in ("triton", "cuda"):
            f = lambda: dmattn.dma_attention(q, k, v, mask=m, is_causal=True, backend=backend)  # noqa: E731
            try:
                t = bench(f)
            except ValueError as exc:  # a backend that declines the call says why
                print(f"frac={frac} {backend}: declined ({exc})")
                continue
            res["ms"][f"{backend} frac={frac}"] = t
            print(f"frac={frac} {backend}: {t:.3f} ms", flush=True)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(H // H_kv, 2), v.repeat_interleave(H // H_kv, 2)))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        t = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    res["ms"]["sdpa_cudnn dense causal, no mask"] = t
    print(f"cuDNN SDPA dense causal (no mask): {t:.3f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
