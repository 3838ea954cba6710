"""Top-w list selection on the GPU: the Triton radix select (``kernels/triton/topk.py``) against the
torch-op path it replaces (``selection.selected_lists``), on query-broadcast bf16 biases.

    python benchmarks/triton_select.py --out-dir benchmarks/results      # H100/H200, ~1 minute
    python benchmarks/triton_select.py --smoke --out-dir /tmp/sel_smoke  # CPU interpreter: harness only

For each shape and value distribution: both paths must give identical lists (without and with a
random mask) before anything is timed; then ``triton.testing.do_bench(return_mode="median")`` times
old and new (and new with the mask), and a host timer measures what one call of the new path costs
the CPU to enqueue (decode is bound by it when the GPU work is a few microseconds). A sweep then
times the new path with each forced chunk size (keys per program; the row's length means one
program per row) against the launch plan's choice, to check the constants of ``topk._plan``. Value
distributions: ``randn`` (few ties) and ``doge`` (exp(-softplus(x)) in bf16, the paper's bias form:
values in (0, 1), many ties and few distinct high bytes). Prints a table and writes
``triton-select-<card>-<date>.json`` into --out-dir.

Imports the kernels from the installed ``dmattn``, or, when that build predates topk.py, from this
checkout's ``kernels/triton``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time

SHAPES = [((1, 8, 1, 8192), 1024), ((1, 8, 1, 32768), 2048), ((1, 32, 1, 32768), 2048),
          ((1, 8, 1, 131072), 2048), ((8, 8, 1, 32768), 2048)]
SMOKE_SHAPES = [((1, 2, 1, 300), 40), ((2, 2, 1, 1000), 100)]
SWEEP_CHUNKS = (1024, 2048, 4096, 8192, 32768)
SMOKE_SWEEP_CHUNKS = (128, 256)
DISTRIBUTIONS = ("randn", "doge")


def _kernels():
    """(selection, topk) modules: the installed package's, else this checkout's kernels/triton
    loaded as a package of its own (selection.py imports topk relatively)."""
    try:
        from dmattn.kernels.triton import selection, topk
        return selection, topk, "installed dmattn"
    except ImportError:
        root = pathlib.Path(__file__).resolve().parent.parent / "kernels" / "triton"
        spec = importlib.util.spec_from_file_location("_select_bench_kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pkg
        spec.loader.exec_module(pkg)
        return (importlib.import_module(f"{spec.name}.selection"), importlib.import_module(f"{spec.name}.topk"),
                str(root))


def _bias(shape, dist, device, torch):
    g = torch.Generator(device="cpu").manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    if dist == "doge":
        x = torch.exp(-torch.nn.functional.softplus(x))
    return x.to(torch.bfloat16).to(device)


def _time_ms(fn, device, torch, triton):
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _host_us(fn, device, torch, n=50):
    """CPU time to enqueue one call (synchronised before and after, not in between)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    import triton

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --smoke to check the harness", file=sys.stderr)
        return 2
    selection, topk, source = _kernels()
    card = "cpu-interpreter" if device == "cpu" else torch.cuda.get_device_name()
    machine = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), card=card,
                   python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                   kernels=source)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine.update(sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                       cuda=torch.version.cuda)
    rows = []
    chunks = SMOKE_SWEEP_CHUNKS if args.smoke else SWEEP_CHUNKS
    for shape, window in (SMOKE_SHAPES if args.smoke else SHAPES):
        B, H = shape[0], shape[1]
        for dist in DISTRIBUTIONS:
            bias = _bias(shape, dist, device, torch)
            g = torch.Generator(device="cpu").manual_seed(7)
            mask = (torch.rand((1, H, 1, shape[3]), generator=g) < 0.5).to(device)
            old = lambda m=None: selection.selected_lists(bias, m, window).squeeze(2)  # noqa: E731
            new = lambda m=None: topk.select_lists(bias, m, window, B, H)  # noqa: E731
            row = dict(shape=list(shape), window=window, dist=dist)
            try:
                same = all(torch.equal(old(m), new(m)) for m in (None, mask))
                row["equal"] = same
                if same:
                    row["old_ms"] = _time_ms(old, device, torch, triton)
                    row["new_ms"] = _time_ms(new, device, torch, triton)
                    row["new_mask_ms"] = _time_ms(lambda: new(mask), device, torch, triton)
                    row["new_host_us"] = _host_us(new, device, torch)
                    row["speedup"] = row["old_ms"] / row["new_ms"]
                    row["plan_chunk"] = topk._plan(shape[3], B * H, bias.device, None)[0]
                    K2 = triton.next_power_of_2(shape[3])
                    sweep = {}
                    for chunk in sorted({c for c in chunks if c < K2} | {K2}):
                        forced = lambda c=chunk: topk.select_lists(bias, None, window, B, H, chunk=c)  # noqa: E731
                        if not torch.equal(forced(), new()):
                            raise AssertionError(f"chunk {chunk} gives other lists")
                        sweep[chunk] = _time_ms(forced, device, torch, triton)
                    row["sweep_ms"] = sweep
                    row["best_chunk"] = min(sweep, key=sweep.get)
            except Exception as exc:  # one failing row must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)

    head = (f"{'shape':>20} {'w':>5} {'dist':>6} {'equal':>6} {'old ms':>8} {'new ms':>8} {'+mask':>8} "
            f"{'host us':>8} {'x':>6} {'chunk':>6} {'best':>6} {'best ms':>8}")
    print(f"top-w list selection, bf16, {card}, torch {torch.__version__}, triton {triton.__version__}")
    print(head)
    for r in rows:
        if "error" in r or not r.get("equal"):
            print(f"{str(tuple(r['shape'])):>20} {r['window']:>5} {r['dist']:>6}  {r.get('error', 'LISTS DIFFER')}")
            continue
        print(f"{str(tuple(r['shape'])):>20} {r['window']:>5} {r['dist']:>6} {'yes':>6} {r['old_ms']:8.4f} "
              f"{r['new_ms']:8.4f} {r['new_mask_ms']:8.4f} {r['new_host_us']:8.1f} {r['speedup']:6.1f} "
              f"{r['plan_chunk']:>6} {r['best_chunk']:>6} {r['sweep_ms'][r['best_chunk']]:8.4f}")
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-")
    path = out_dir / f"triton-select-{slug}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    print(f"wrote {path}")
    return 0 if all(r.get("equal") and "error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
