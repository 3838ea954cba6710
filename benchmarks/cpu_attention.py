"""CPU benchmark: dmattn's CPU backend against the reference and the dense top-k path users run today.

Workload (the foundation issue): H=4, H_kv=2, D=64, B=1, causal, visible top-k scope, float32,
S = Q = K in {1024, 4096, 8192}, window w in {256, 1024}; the bias is (B, H_kv, 1, K), the paper's
per-key score. Every implementation starts from the bias (selection is part of the time):

- ``dmattn``: ``dma_attention(..., backend="cpu")``.
- ``dense_topk_sdpa``: what the transformers Doge model does on CPU: broadcast the bias to a dense
  (B, H, Q, K) float mask, mask the future, ``torch.topk`` per query, scatter the kept keys into
  the mask, then ``scaled_dot_product_attention`` with that float mask.
- ``reference``: ``dmattn.reference`` through ``backend="reference"`` (float64, materialising),
  only up to S=4096 (at 8192 it needs more memory than this machine has).

Each (implementation, S, w) runs in a fresh subprocess: the median of ``--repeats`` timed calls
after one warm-up, and the peak extra resident memory of one call (VmHWM after resetting it,
minus the resident size before the call). Results: a JSON file and a Markdown table.

    python benchmarks/cpu_attention.py --out benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

IMPLS = ("dmattn", "dense_topk_sdpa", "reference")
BACKEND_OF = {"dmattn": "cpu", "reference": "reference"}
REFERENCE_MAX_S = 4096


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current resident size (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _dense_topk_sdpa(q, k, v, bias, window):
    """The transformers Doge recipe: dense float mask from the bias, causal, top-k, then SDPA."""
    import torch

    B, Q, H, D = q.shape
    K, H_kv = k.shape[1], k.shape[2]
    neg = torch.finfo(q.dtype).min
    scores = bias.expand(B, H_kv, Q, K)
    causal = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
    scores = scores.masked_fill(~causal, neg)
    if K > window:
        keep = torch.zeros_like(scores).scatter(-1, torch.topk(scores, window, dim=-1, sorted=False).indices, 1.0)
        scores = scores.masked_fill(keep == 0, neg)
    scores = scores.repeat_interleave(H // H_kv, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=scores, enable_gqa=True)
    return out.transpose(1, 2)


def _worker(impl: str, S: int, window: int, repeats: int, threads: int) -> dict:
    import torch

    import dmattn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    H, H_kv, D = 4, 2, 64
    q = torch.randn(1, S, H, D)
    k = torch.randn(1, S, H_kv, D)
    v = torch.randn(1, S, H_kv, D)
    bias = torch.randn(1, H_kv, 1, S)
    if impl == "dense_topk_sdpa":
        call = lambda: _dense_topk_sdpa(q, k, v, bias, window)  # noqa: E731
    else:
        call = lambda: dmattn.dma_attention(q, k, v, bias, window=window, is_causal=True,  # noqa: E731
                                            topk_scope="visible", backend=BACKEND_OF[impl])
    with torch.no_grad():
        call()
        before = _rss_kib("VmRSS")
        _reset_peak_rss()
        call()
        peak = _rss_kib("VmHWM") - before
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return dict(impl=impl, S=S, window=window, median_s=statistics.median(times), min_s=min(times),
                repeats=repeats, peak_extra_mib=peak / 1024)


def _machine() -> dict:
    import torch

    import dmattn
    from dmattn import _C

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gib=round(os.sysconf("SC_PAGE_SIZE") *
                os.sysconf("SC_PHYS_PAGES") / 2**30, 1), python=platform.python_version(),
                torch=torch.__version__, dmattn=dmattn.__version__, core=_C.info(),
                date=datetime.date.today().isoformat())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="benchmarks/results/cpu.json")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "S", "W"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, S, W = args.worker
        print(json.dumps(_worker(impl, int(S), int(W), args.repeats, args.threads)))
        return 0

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # large buffers go back to the OS on free
    results = []
    for S in args.seqs:
        for W in args.windows:
            for impl in args.impls:
                if impl == "reference" and S > REFERENCE_MAX_S:
                    results.append(dict(impl=impl, S=S, window=W, skipped=f"needs > 24 GiB at S={S}"))
                    continue
                cmd = [sys.executable, __file__, "--worker", impl, str(S), str(W),
                       "--repeats", str(1 if impl == "reference" else args.repeats), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    results.append(dict(impl=impl, S=S, window=W, skipped=proc.stderr.strip().splitlines()[-1]))
                else:
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    report = dict(machine=_machine(), workload=dict(B=1, H=4, H_kv=2, D=64, dtype="float32", causal=True,
                                                    topk_scope="visible", bias_shape="(1, H_kv, 1, K)"),
                  results=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(markdown_table(report))
    return 0


def markdown_table(report: dict) -> str:
    by = {(r["impl"], r["S"], r["window"]): r for r in report["results"]}
    lines = ["| S | w | dmattn cpu (s) | dense top-k + SDPA (s) | reference (s) | speed-up vs dense | "
             "peak extra MiB: dmattn / dense / reference |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["S"], r["window"]) for r in report["results"]})
    for S, W in keys:
        cells = [by.get((i, S, W), {}) for i in IMPLS]
        t = [f"{c['median_s']:.4f}" if "median_s" in c else "-" for c in cells]
        m = [f"{c['peak_extra_mib']:.0f}" if "peak_extra_mib" in c else "-" for c in cells]
        ratio = (f"{cells[1]['median_s'] / cells[0]['median_s']:.1f}x"
                 if "median_s" in cells[0] and "median_s" in cells[1] else "-")
        lines.append(f"| {S} | {W} | {t[0]} | {t[1]} | {t[2]} | {ratio} | {' / '.join(m)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
