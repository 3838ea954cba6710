"""The benchmark harness (``python -m dmattn.bench``): its CPU ``--smoke`` pipeline end to end, and
the pieces whose GPU use cannot run here (Flex's selection tables, the useful-pair count, the
correctness gate) checked on the CPU against the reference."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dmattn import bench, reference

CPU = torch.device("cpu")


def test_smoke_pipeline(tmp_path):
    """Checks, tables, JSON and plot on tiny CPU shapes; every row is either timed or says why."""
    assert bench.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert report["machine"]["card"] == "cpu" and report["machine"]["torch"] == torch.__version__
    names = {w["name"] for w in report["workloads"]}
    assert {"T256/global", "T256/visible", "B512", "D1k", "D1k-B2", "T128/global"} <= names
    assert all(w["useful_pairs"] > 0 for w in report["workloads"])
    rows = report["results"]
    assert rows and all(r["status"] in ("ok", "skipped", "error", "WRONG") for r in rows)
    assert all("reason" in r for r in rows if r["status"] != "ok")
    ok = [r for r in rows if r["status"] == "ok"]
    for impl in ("dmattn:cpu", "sdpa_math"):
        timed = [r for r in ok if r["impl"] == impl]
        assert len(timed) == sum(len(w["passes"]) for w in report["workloads"]), impl
        assert all(r["ms"] > 0 and r["tflops"] > 0 for r in timed)
    assert all(r["selection_ms"] > 0 for r in ok if r["impl"] == "dmattn:cpu")
    assert not any("graph_ms" in r or "host_ms" in r for r in rows)  # CUDA graphs and host times only on a GPU
    assert {r["status"] for r in rows if r["impl"] == "flex"} == {"skipped"}
    assert all(c["status"] == "ok" for c in report["correctness"] if c["impl"] in ("dmattn:cpu", "sdpa_math"))
    md = path.with_suffix(".md").read_text()
    assert "| T256/global | fwd |" in md and "flex" in md
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert path.with_suffix(".png").exists() == has_mpl


def test_graph_times_in_markdown():
    """Forward rows with a CUDA-graph time (GPU runs only) get their own table next to the eager ms;
    rows without one (every CPU row) leave it out."""
    machine = dict(card="H200", date="2026-11-28", torch="2", triton="3", cuda="13", driver="580")
    row = dict(workload="D128k", impl="dmattn:triton", status="ok", ms=0.3, tflops=0.1, notes=[])
    report = dict(machine=machine, impls=["dmattn:triton"], correctness=[],
                  results=[dict(row, **{"pass": "fwd"}, graph_ms=0.038, host_ms=0.21)])
    md = bench.markdown(report)
    assert "Forward calls in a CUDA graph" in md and "| D128k | dmattn:triton | 0.3 | 0.038 | 0.21 |" in md
    report["results"][0].pop("graph_ms")
    assert "in a CUDA graph" not in bench.markdown(report)


def test_filters_and_user_shape(tmp_path):
    rc = bench.main(["--smoke", "--out-dir", str(tmp_path), "--workloads", "D1k", "--impls", "dmattn",
                     "--shape", "Q=48,K=80,H=4,H_kv=1,D=16,window=24,causal=1,scope=visible,B=2,passes=fwd"])
    assert rc == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {r["workload"] for r in report["results"]} == {"D1k", "custom:Q=48,K=80,H=4,H_kv=1,D=16,window=24,"
                                                          "causal=1,scope=visible,B=2,passes=fwd"}
    assert {r["impl"] for r in report["results"]} == {"dmattn:cpu"}
    assert all(r["status"] == "ok" for r in report["results"])


def test_declining_backend_is_skipped_with_its_reasons(monkeypatch):
    """A registered backend that declines a workload is a "skipped" row carrying its reasons."""
    from dmattn.backends import BACKENDS
    from dmattn.backends.reference import ReferenceBackend

    class Fp16Only(ReferenceBackend):
        name = "fp16only"
        dtypes = frozenset({torch.float16})

    monkeypatch.setitem(BACKENDS, "fp16only", Fp16Only())
    wl = bench.smoke_workloads()[0].small()
    with pytest.raises(bench.Skip, match="declined: dtype bfloat16 not supported \\(supports float16\\)"):
        bench.build_dmattn(bench.make_inputs(wl, CPU), wl, False, "fp16only")


def test_parse_shape():
    wl = bench.parse_shape("Q=4096,K=4096,H=16,H_kv=4,D=128,window=512,causal=1,scope=global,B=1")
    assert (wl.Q, wl.K, wl.H, wl.H_kv, wl.D, wl.window, wl.causal, wl.scope, wl.B) == \
        (4096, 4096, 16, 4, 128, 512, True, "global", 1)
    assert wl.passes == ("fwd", "fwd+bwd")
    assert bench.parse_shape("Q=1,K=64,causal=0").passes == ("fwd",)
    assert bench.parse_shape("Q=8,K=8,window=0").window is None
    with pytest.raises(ValueError, match="unknown field"):
        bench.parse_shape("Q=8,K=8,heads=2")


def test_standard_workloads_match_benchmarks_md():
    wls = {w.name: w for w in bench.standard_workloads()}
    assert set(wls) == {"T8k/global", "T8k/visible", "T32k/global", "T32k/visible", "B32k", "D128k", "D32k-B8"}
    assert (wls["T8k/global"].Q, wls["T8k/global"].window) == (8192, 1024)
    assert (wls["T32k/visible"].K, wls["T32k/visible"].window) == (32768, 2048)
    assert wls["B32k"].bias == "block" and wls["D128k"].passes == ("fwd",) and not wls["D128k"].causal
    assert (wls["D32k-B8"].B, wls["D32k-B8"].Q, wls["D32k-B8"].K) == (8, 1, 32768)
    assert all((w.H, w.H_kv, w.D) == (32, 8, 128) for w in wls.values())
    extra = {w.name for w in bench.standard_workloads(seqs=[4096, 8192], scopes=["global"])}
    assert "T4k/global" in extra and "T4k/visible" not in extra and len(extra) == 8


def test_block_bias_selects_whole_blocks():
    wl = bench.Workload("b", 1, 512, 512, H=4, H_kv=2, D=16, window=128, bias="block")
    bias = bench.make_inputs(wl, CPU)["bias"]
    assert torch.equal(bias, bias[..., ::64].repeat_interleave(64, -1))
    sel = reference.topk_indices(bias, 128)
    assert torch.equal(sel % 64 == 0, (torch.arange(128) % 64 == 0).expand_as(sel))


@pytest.mark.parametrize("w", [1, 5, 16, 40, 100])
def test_prefix_wth_smallest(w):
    g = torch.Generator().manual_seed(w)
    x = torch.stack([torch.randperm(100, generator=g) for _ in range(3)]).to(torch.int32)
    got = bench.prefix_wth_smallest(x, w, chunk=16)
    for p in range(100):
        prefix = x[:, :p + 1].sort(-1).values
        want = prefix[:, w - 1] if p + 1 >= w else torch.full((3,), 100, dtype=torch.int32)
        assert torch.equal(got[:, p], want), p


@pytest.mark.parametrize("Q,K,window,scope,causal,ties", [
    (64, 64, 8, "visible", True, False), (64, 64, 8, "global", True, True), (64, 64, 8, "visible", True, True),
    (24, 64, 10, "visible", True, False), (64, 24, 10, "visible", True, True), (24, 64, 10, "global", True, False),
    (1, 300, 32, "global", False, True), (16, 64, 8, "visible", False, False), (32, 32, None, "global", True, False),
    (16, 20, 64, "visible", True, False),
])
def test_flex_mask_matches_reference(Q, K, window, scope, causal, ties):
    """The mask_mod FlexAttention gets is exactly SPEC's visible set (ties in bf16 included)."""
    wl = bench.Workload("f", 2, Q, K, H=4, H_kv=2, D=16, window=window, scope=scope, causal=causal)
    bias = bench.make_inputs(wl, CPU)["bias"]
    if ties:
        bias = (bias * 2).round().to(torch.bfloat16)  # few distinct values: many ties
    fm = bench.FlexMask(wl, CPU)
    fm.fill(bias[:, :, 0, :])
    want = reference.visible_mask(bias, None, B=2, H=4, Q=Q, K=K, window=window, topk_scope=scope,
                                  is_causal=causal)
    assert torch.equal(fm.dense(), want)


@pytest.mark.parametrize("name", ["T256/global", "T256/visible", "B512", "D1k-B2"])
def test_useful_pairs_exact(name):
    wl = {w.name: w for w in bench.smoke_workloads()}[name]
    bias = bench.make_inputs(wl, CPU)["bias"]
    want = reference.visible_mask(bias, None, B=wl.B, H=wl.H, Q=wl.Q, K=wl.K, window=wl.window,
                                  topk_scope=wl.scope, is_causal=wl.causal).sum().item()
    assert bench.useful_pairs(wl, bias) == want


def test_check_flags_a_wrong_implementation():
    """A plausible bug (global instead of visible selection) is caught by the correctness gate."""
    wl = bench.smoke_workloads()[1].small()
    assert wl.scope == "visible"

    def wrong(x, wl_, grad):
        return bench.build_dmattn(x, bench.dataclasses.replace(wl_, scope="global"), grad, "cpu")

    status, detail = bench.check("dmattn:cpu", wrong, wl, CPU, grad=False)
    assert status == "WRONG" and "max err" in detail
    status, _ = bench.check("dmattn:cpu", lambda x, w, g: bench.build_dmattn(x, w, g, "cpu"), wl, CPU, grad=True)
    assert status == "ok"

    def broken(x, wl_, grad):
        raise RuntimeError("no kernel image")

    assert bench.check("x", broken, wl, CPU, grad=False) == ("error", "correctness run failed: RuntimeError: "
                                                                     "no kernel image")


@pytest.mark.parametrize("name", ["T256/global", "T256/visible", "D1k-B2"])
def test_flex_runner_eager_on_cpu(monkeypatch, name):
    """The Flex runner (tables, block mask, score_mod, GQA) computes the windowed reference: forward,
    eager on the CPU (the GPU run compiles the same functions)."""
    monkeypatch.setattr(bench, "FLEX_EAGER_ON_CPU", True)
    wl = {w.name: w for w in bench.smoke_workloads()}[name].small()
    status, detail = bench.check("flex", bench.build_flex, wl, CPU, grad=False)
    assert status == "ok", detail
