"""The Triton backend's kernels compiled for sm_90a without a GPU, and the instruction mix of their loops.

    python benchmarks/triton_sass.py --scope visible --out /tmp/sass          # forward kernels
    python benchmarks/triton_sass.py --scope visible --bwd --cfg fwd=128,32,4,3 --out /tmp/sass

Runs the backend's real host code (``attention.forward``/``backward``) on CPU tensors of a small
T-like workload (bf16, H 32, H_kv 8, D 128 or --dim, causal, bias (1, 8, 1, S)) with Triton's driver stood in
for: every launch compiles its kernel for sm_90a (the H200's target, TMA descriptors on, as there)
and returns without running. The selection comes from torch (the brute-force death positions, or
the torch lists), since no kernel runs. For each kernel it writes the PTX, cubin and SASS into
--out, and prints its registers and stack (spill) bytes and, per loop of the SASS (a backward
branch), the instruction count and the counts of spills (STL/LDL), tensor-core ops (HGMMA),
async copies (LDGSTS, UTMALDG), global loads, MUFU, IMAD and float ops. Tile sizes are those of
``launch_config`` unless --cfg overrides a kind.

A proxy, not a timing: the kernels are issue-bound at 12.5% occupancy on the H200 (ncu:
benchmarks/results/ncu-t32k-h200-2026-11-28.log), so instructions per tile track their time, but
only a GPU run shows speed. Needs Triton's NVIDIA backend (cuobjdump and nvdisasm ship with it).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

PATTERNS = [("STL", r"\bSTL"), ("LDL", r"\bLDL"), ("HGMMA", r"HGMMA"), ("LDGSTS", r"LDGSTS"),
            ("UTMALDG", r"UTMALDG"), ("LDG", r"\bLDG\b|\bLDG\."), ("MUFU", r"MUFU"), ("IMAD", r"IMAD"),
            ("FP32", r"\bF(FMA|MUL|ADD|MNMX|SEL)\b")]


class StandInDriver:
    """What ``JITFunction.run`` asks of the driver before it launches: a device, a stream, a target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def loops(sass: str) -> list[tuple[int, int, list[str]]]:
    """(start, end, instructions) of every innermost loop: a branch to a label at a lower address."""
    label_at, pending, ins = {}, None, []
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            if pending:
                label_at[pending], pending = addr, None
            ins.append((addr, m.group(2)))
    found = set()
    for addr, text in ins:
        m = re.search(r"BRA\b.*?\.?(L_x_\d+)", text)
        if m and label_at.get(m.group(1), addr) < addr:
            found.add((label_at[m.group(1)], addr))
    # Innermost loops only: a range that holds another loop is an outer loop (or a branch-joined
    # span of several); its body would double-count the inner ones.
    inner = [(lo, hi) for lo, hi in found
             if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in found)]
    return [(lo, hi, [t for a, t in ins if lo <= a <= hi]) for lo, hi in sorted(inner)]


def summarize(name: str, kernel, out_dir: str) -> None:
    for ext in ("ttgir", "ptx", "cubin"):
        if ext in kernel.asm:
            data = kernel.asm[ext]
            with open(os.path.join(out_dir, f"{name}.{ext}"), "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
    cubin = os.path.join(out_dir, f"{name}.cubin")
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    usage = " ".join(re.findall(r"(REG:\d+|STACK:\d+)", res))
    sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    with open(os.path.join(out_dir, f"{name}.sass"), "w") as f:
        f.write(sass)
    n_ins = sum(1 for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line))
    print(f"== {name}: {usage}, {n_ins} instructions")
    for lo, hi, body in loops(sass):
        if len(body) < 16:
            continue  # barrier spins and the like
        counts = ", ".join(f"{k} {sum(1 for t in body if re.search(p, t))}" for k, p in PATTERNS)
        print(f"   loop {lo:#07x}-{hi:#07x}: {len(body):5d} instr; {counts}")
    mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, _, b in loops(sass)[:1] for t in b)
    if mix:
        print("   first loop's commonest:", ", ".join(f"{k} {v}" for k, v in mix.most_common(12)))


def brute_death(values: torch.Tensor, window: int) -> torch.Tensor:
    """death_j of SPEC's visible scope for one bias row, O(K^2) (small K only)."""
    K = values.shape[-1]
    x, i = values.double(), torch.arange(K)
    better = (x[:, None] > x[None, :]) | ((x[:, None] == x[None, :]) & (i[:, None] < i[None, :]))
    return torch.maximum((better.int().cumsum(0) < window).sum(0), i).to(torch.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scope", choices=["visible", "global"], default="visible")
    ap.add_argument("--seq", type=int, default=1024, help="Q = K (the brute-force death is O(S^2))")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128, help="head dim D")
    ap.add_argument("--bwd", action="store_true", help="also compile the backward's kernels")
    ap.add_argument("--cfg", action="append", default=[], help="kind=BLOCK_M,BLOCK_N,warps,stages (fwd, dq, dkdv)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    driver.set_active(StandInDriver())
    compiled = {}
    run = JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        kernel = run(self, *a, grid=grid, warmup=True, **kw)
        compiled[self.__name__] = kernel
        return kernel

    JITFunction.run = compile_only
    from dmattn.kernels.triton import attention, launch, selection
    from dmattn.problem import make_problem

    launch.ENABLED = False
    attention._use_desc = lambda q, D: D == attention._head_block(D)  # TMA as on sm_90
    overrides = {}
    for item in args.cfg:
        kind, values = item.split("=")
        bm, bn, nw, ns = (int(v) for v in values.split(","))
        overrides[kind] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
    config = attention.launch_config
    attention.launch_config = lambda D, e, kind, *a: dict(overrides[kind]) if kind in overrides else config(D, e, kind, *a)

    torch.manual_seed(0)
    S, w = args.seq, args.window
    q = torch.randn(1, S, 32, args.dim, dtype=torch.bfloat16)
    k, v = (torch.randn(1, S, 8, args.dim, dtype=torch.bfloat16) for _ in range(2))
    bias = torch.randn(1, 8, 1, S, dtype=torch.bfloat16)
    p = make_problem(q, k, v, bias, None, window=w, topk_scope=args.scope, is_causal=True)
    if args.scope == "visible":
        death = torch.stack([brute_death(bias[0, r, 0], w) for r in range(8)]).view(1, 8, S)
        sel = selection.Selection(selection.PREFIX, 1, 8, death=death)
    else:
        sel = selection.Selection(selection.LIST, 1, 8, idx=selection.selected_lists(bias, None, w, (1, 8)).squeeze(2))
    attention._selection = lambda *_: sel
    out, lse = torch.empty_like(q), torch.empty(1, 32, S)
    attention.forward(p, q, k, v, bias, None, out, lse)
    if args.bwd:
        grads = [torch.empty_like(t) for t in (q, k, v, bias)]
        attention.backward(p, torch.randn_like(q), q, k, v, bias, None, out, lse, *grads)
    for name, kernel in compiled.items():
        summarize(name, kernel, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
