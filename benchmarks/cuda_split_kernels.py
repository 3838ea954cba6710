"""The CUDA backend's two split (decode) kernels against each other on decode shapes: the tensor-core
kernel (fwd_split_mma_kernel.cuh) and the CUDA-core one (fwd_split_kernel.cuh, forced with
``cuda_ext.set_split_mma_enabled(False)``). Per shape and kernel: max error against the float64
reference, us per call in a CUDA graph of 20 calls and of one call, and the split kernel's span from
torch.profiler with overlapping launches off. GPU only.

    python benchmarks/cuda_split_kernels.py    (results: benchmarks/results/cuda-split-mma-h200-*.log)
"""
import torch
import dmattn
from dmattn import cuda_ext

dev = "cuda"
bf = torch.bfloat16

def graph_ms(fn, inner=20, reps=15):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) / inner)
    ts.sort(); return ts[len(ts) // 2]

def kernels(fn, n=10):
    cuda_ext.set_pdl_enabled(False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    cuda_ext.set_pdl_enabled(True)
    agg = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.split("<")[0].split("(")[0][-34:]
            agg.setdefault(name, []).append(e.time_range.elapsed_us())
    return {k: sorted(v)[len(v) // 2] for k, v in agg.items()}

shapes = [
    ("D128k w2048", 1, 1, 32, 8, 128, 131072, 2048),
    ("K128k w8192", 1, 1, 32, 8, 128, 131072, 8192),
    ("Q8 w2048", 1, 8, 32, 8, 128, 131072, 2048),
    ("B4 K32k w1024", 4, 1, 32, 8, 128, 32768, 1024),
    ("dense K32k", 1, 1, 32, 8, 128, 32768, None),
    ("D64 K128k w2048", 1, 1, 32, 8, 64, 131072, 2048),
]
for name, B, Q, H, H_kv, D, K, w in shapes:
    torch.manual_seed(0)
    q = torch.randn(B, Q, H, D, device=dev, dtype=bf)
    k = torch.randn(B, K, H_kv, D, device=dev, dtype=bf)
    v = torch.randn(B, K, H_kv, D, device=dev, dtype=bf)
    bias = torch.randn(B, H_kv, 1, K, device=dev, dtype=bf)
    call = lambda: dmattn.dma_attention(q, k, v, bias=bias, window=w, topk_scope="global", backend="cuda")
    try:
        ref = dmattn.dma_attention(q.double(), k.double(), v.double(), bias=bias.double(), window=w,
                                   topk_scope="global", backend="reference")
    except Exception as exc:
        print(name, "reference failed", exc); continue
    for on in (True, False):
        cuda_ext.set_split_mma_enabled(on)
        try:
            out = call(); torch.cuda.synchronize()
            err = (out.double() - ref).abs().max().item()
            ks = kernels(call)
            split = {k2: v2 for k2, v2 in ks.items() if "split" in k2}
            print(f"{name:16s} {'mma  ' if on else 'cores'} err {err:.2e} graph20 {graph_ms(call)*1e3:6.1f} us "
                  f"graph1 {graph_ms(call, inner=1, reps=40)*1e3:6.1f} us  {split}", flush=True)
        except Exception as exc:
            print(name, on, "failed:", repr(exc)[:300], flush=True)
    cuda_ext.set_split_mma_enabled(True)
    del q, k, v, bias, ref
    torch.cuda.empty_cache()
