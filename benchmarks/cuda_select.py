"""LIST selection on the GPU: the CUDA radix select (``kernels/cuda/select.h`` through
``dmattn.cuda_ext.select_lists``) against the Triton radix select (``kernels/triton/topk.py``) in the
same run, on query-broadcast biases.

    python benchmarks/cuda_select.py --out-dir benchmarks/results     # H100/H200, ~1 minute

Shapes (B, rows, 1, K), window: T8k (1, 8, 1, 8192) w=1024, T32k (1, 8, 1, 32768) w=2048, D128k
(1, 8, 1, 131072) w=2048, and 64 rows of 32768 (many rows). Value distributions ``randn`` and ``doge``
(exp(-softplus(x)): values in (0, 1), many ties and few distinct high bytes), bf16, plus float32
randn. For each: the CUDA lists must equal Triton's and the torch lists (``selected_lists``), and the
counts ``selection.block_counts``, before anything is timed. Then, median of
``triton.testing.do_bench``: the CUDA select alone and with the forward's per-block counts (what
``cuda_ext.list_selection`` runs), the Triton select alone and with ``block_counts`` (what the cuda
backend ran before); the same replayed from a CUDA graph (GPU time without the host's launch cost);
and the host time to enqueue one call. A sweep times the CUDA select for each forced chunk size (keys
per thread block; the row length means one block per row) next to the plan's choice, to check the
constants of ``select_plan`` (kernels/cuda/select.cu). Prints a table and writes
``cuda-select-<card>-<date>.json`` into --out-dir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

SHAPES = [("T8k", (1, 8, 1, 8192), 1024), ("T32k", (1, 8, 1, 32768), 2048),
          ("D128k", (1, 8, 1, 131072), 2048), ("T32k-64rows", (8, 8, 1, 32768), 2048)]
CASES = [("randn", "bfloat16"), ("doge", "bfloat16"), ("randn", "float32")]
SWEEP_CHUNKS = (1024, 2048, 4096, 8192, 16384, 32768, 131072)
# The forward's query rows per block for D=128 (counts); read from the module when it has it.
ATTENTION_MS = {"T32k": 2.5}  # the T32k attention this select feeds (H200, docs/performance)
GRAPH_REPS = 20


def _bias(shape, dist, dtype, torch):
    g = torch.Generator(device="cpu").manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    if dist == "doge":
        x = torch.exp(-torch.nn.functional.softplus(x))
    return x.to(getattr(torch, dtype)).cuda()


def _graph_ms(fn, torch):
    """GPU time of one call replayed from a CUDA graph of GRAPH_REPS calls (median of 20 replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPS):
            fn()
    times = []
    for _ in range(20):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / GRAPH_REPS)
    return sorted(times)[len(times) // 2]


def _host_us(fn, torch, n=50):
    """CPU time to enqueue one call (synchronised before and after, not in between)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--no-sweep", action="store_true", help="skip the chunk-size sweep")
    args = ap.parse_args(argv)
    import torch
    import triton
    import triton.testing

    from dmattn import cuda_ext
    from dmattn.kernels.triton import selection, topk

    if not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine", file=sys.stderr)
        return 2
    if not (cuda_ext.available() and hasattr(cuda_ext._cuda, "select_lists")):
        print(f"dmattn._cuda has no select_lists: {cuda_ext.LOAD_ERROR}", file=sys.stderr)
        return 2
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    props = torch.cuda.get_device_properties(0)
    card = torch.cuda.get_device_name()
    machine = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), card=card,
                   python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                   sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   cuda=torch.version.cuda, cuda_module=cuda_ext.info())
    block_m = cuda_ext.fwd_block_m(128) if cuda_ext.has_forward() else 128
    rows_out = []
    for name, shape, window in SHAPES:
        B, H, _, K = shape
        for dist, dtype in CASES:
            bias = _bias(shape, dist, dtype, torch)
            g = torch.Generator(device="cpu").manual_seed(7)
            mask = (torch.rand((1, H, 1, K), generator=g) < 0.5).cuda()
            Q = K

            def new(m=None, counts=True, chunk=None):
                return cuda_ext.select_lists(bias, m, window, (B, H), Q=Q, block_m=block_m if counts else None,
                                             is_causal=True, chunk=chunk)

            def old(m=None, counts=True):
                idx = topk.select_lists(bias, m, window, B, H)
                return idx, (selection.block_counts(idx, Q, K, block_m, True) if counts else None)

            equal = True
            for m in (None, mask):
                got, got_counts = new(m)
                want_t, _ = old(m, counts=False)
                want = selection.selected_lists(bias, m, window, (B, H)).squeeze(2)
                want_counts = selection.block_counts(want, Q, K, block_m, True)
                equal &= bool(torch.equal(got, want) and torch.equal(want_t, want)
                              and torch.equal(got_counts, want_counts))
            plan_chunk, plan_chunks, ws = cuda_ext._select_plan(B * H, K, 16 if dtype != "float32" else 32,
                                                                bias.device.index, 0)
            r = dict(shape=list(shape), window=window, name=name, dist=dist, dtype=dtype, equal=equal,
                     plan_chunk=plan_chunk, plan_chunks=plan_chunks, workspace_bytes=ws, block_m=block_m)
            r["cuda_ms"] = bench(lambda: new(counts=False))
            r["cuda_counts_ms"] = bench(lambda: new())
            r["cuda_mask_ms"] = bench(lambda: new(mask, counts=False))
            r["triton_ms"] = bench(lambda: old(counts=False))
            r["triton_counts_ms"] = bench(lambda: old())
            r["cuda_graph_ms"] = _graph_ms(lambda: new(), torch)
            r["triton_graph_ms"] = _graph_ms(lambda: old(), torch)
            r["cuda_host_us"] = _host_us(lambda: new(), torch)
            r["triton_host_us"] = _host_us(lambda: old(), torch)
            r["speedup_counts"] = r["triton_counts_ms"] / r["cuda_counts_ms"]
            if name in ATTENTION_MS:
                r["fraction_of_attention"] = r["cuda_counts_ms"] / ATTENTION_MS[name]
            if not args.no_sweep:
                r["sweep_ms"] = {}
                for chunk in SWEEP_CHUNKS:
                    if chunk <= K:
                        r["sweep_ms"][str(chunk)] = bench(lambda c=chunk: new(counts=False, chunk=c))
                r["best_chunk"] = int(min(r["sweep_ms"], key=r["sweep_ms"].get))
            rows_out.append(r)
            print(f"{name:12s} {dist:5s} {dtype:8s} equal={equal!s:5s} plan={plan_chunk:6d}x{plan_chunks:<3d} "
                  f"cuda {r['cuda_ms']:.4f} (+counts {r['cuda_counts_ms']:.4f}, graph {r['cuda_graph_ms']:.4f}, "
                  f"host {r['cuda_host_us']:.0f} us)  triton {r['triton_ms']:.4f} (+counts "
                  f"{r['triton_counts_ms']:.4f}, graph {r['triton_graph_ms']:.4f}, host {r['triton_host_us']:.0f} us)"
                  + (f"  best chunk {r['best_chunk']}" if "best_chunk" in r else ""), flush=True)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = card.lower().replace(" ", "-")
    path = out_dir / f"cuda-select-{slug}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(dict(machine=machine, rows=rows_out), indent=1))
    print(f"wrote {path}")
    return 0 if all(r["equal"] for r in rows_out) else 1


if __name__ == "__main__":
    raise SystemExit(main())
