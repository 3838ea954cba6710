"""Tests of the compiled CPU core `dmattn._C`, called directly (no dispatch, no autograd).

The selection (visible_mask, topk_indices) is checked against a brute force written here: sort
each row's candidates by (-bias, index) and keep the first `window`. Attention is checked against
the package's float64 reference.
"""

import itertools

import pytest
import torch

from dmattn import _C
from dmattn import reference

B, H, HKV = 2, 4, 2
NAN = float("nan")


def brute_visible(bias, mask, *, Q, K, window, scope, causal):
    """(B, H, Q, K) bool, one Python sort per row."""
    visible = torch.zeros(B, H, Q, K, dtype=torch.bool)
    for b, h, i in itertools.product(range(B), range(H), range(Q)):
        limit = i + K - Q
        allowed = [j for j in range(K) if mask is None or bool(mask[b % mask.shape[0],
                   h * mask.shape[1] // H, i % mask.shape[2], j])]
        if window is None or bias is None:
            chosen = allowed
        else:
            row = bias[b % bias.shape[0], h * bias.shape[1] // H, i % bias.shape[2]].double()
            candidates = [j for j in allowed if not (causal and scope == "visible") or j <= limit]
            chosen = sorted(candidates, key=lambda j: (-row[j].item(), j))[:window]
        for j in chosen:
            visible[b, h, i, j] = not causal or j <= limit
    return visible


def brute_topk(bias, mask, window):
    shapes = [bias.shape] + ([mask.shape] if mask is not None else [])
    Bs, Hs, Qs = (max(s[d] for s in shapes) for d in range(3))
    K = bias.shape[3]
    out = torch.full((Bs, Hs, Qs, min(window, K)), -1, dtype=torch.int64)
    for b, h, q in itertools.product(range(Bs), range(Hs), range(Qs)):
        row = bias[b % bias.shape[0], h * bias.shape[1] // Hs, q % bias.shape[2]].double()
        allowed = [j for j in range(K) if mask is None or bool(
            mask[b % mask.shape[0], h * mask.shape[1] // Hs, q % mask.shape[2], j])]
        chosen = sorted(sorted(allowed, key=lambda j: (-row[j].item(), j))[:window])
        out[b, h, q, :len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
    return out


def make_bias(shape, kind, generator):
    values = torch.randn(shape, generator=generator)
    if kind == "ties":
        return (values > 0).float()  # two levels: most comparisons are ties
    if kind == "bf16":
        return (values * 2).round().to(torch.bfloat16)
    if kind == "f16":
        return values.to(torch.float16)
    return values


def make_mask(shape, generator):
    return torch.rand(shape, generator=generator) > 0.3


def core_visible(bias, mask, *, Q, K, window, scope, causal, num_threads=2):
    out = torch.ones(B, H, Q, K, dtype=torch.bool)
    _C.visible_mask(bias, mask, out, B=B, H=H, Hkv=HKV, Q=Q, K=K, is_causal=causal,
                    window=window or 0, scope_global=scope == "global", num_threads=num_threads)
    return out


LENGTHS = [(1, 1), (1, 64), (64, 1), (63, 65), (65, 63), (64, 64)]


@pytest.mark.parametrize("scope", ["visible", "global"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("window", [1, 7, "K+3", None])
@pytest.mark.parametrize("QK", LENGTHS, ids=[f"Q{q}K{k}" for q, k in LENGTHS])
def test_visible_mask_lengths(QK, window, causal, scope):
    Q, K = QK
    window = K + 3 if window == "K+3" else window
    g = torch.Generator().manual_seed(Q * 1000 + K)
    bias = make_bias((1, HKV, 1, K), ["ties", "bf16", "f32"][(Q + K) % 3], g)
    kw = dict(Q=Q, K=K, window=window, scope=scope, causal=causal)
    assert torch.equal(core_visible(bias, None, **kw), brute_visible(bias, None, **kw))


BIAS_SHAPES = ["1,1,1,K", "B,1,1,K", "1,Hkv,1,K", "B,H,1,K", "1,H,Q,K", "B,Hkv,Q,K", "B,1,Q,K"]
MASK_SHAPES = [None, "1,1,1,K", "B,Hkv,1,K", "1,H,Q,K", "B,1,Q,K"]


def dims(spec, Q, K):
    sizes = {"B": B, "H": H, "Hkv": HKV, "Q": Q, "K": K, "1": 1}
    return tuple(sizes[s] for s in spec.split(","))


@pytest.mark.parametrize("scope", ["visible", "global"])
@pytest.mark.parametrize("mask_spec", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("bias_spec", BIAS_SHAPES)
def test_visible_mask_broadcast_forms(bias_spec, mask_spec, scope):
    Q, K, window = 33, 45, 6
    g = torch.Generator().manual_seed(len(bias_spec) + 7 * len(mask_spec or ""))
    bias = make_bias(dims(bias_spec, Q, K), "ties", g)
    mask = None if mask_spec is None else make_mask(dims(mask_spec, Q, K), g)
    for causal in (True, False):
        kw = dict(Q=Q, K=K, window=window, scope=scope, causal=causal)
        assert torch.equal(core_visible(bias, mask, **kw), brute_visible(bias, mask, **kw))


@pytest.mark.parametrize("bias_spec", ["1,Hkv,1,K", "1,H,Q,K"])
@pytest.mark.parametrize("scope", ["visible", "global"])
def test_visible_mask_many_blocks(bias_spec, scope):
    """Several query blocks and key tiles, with and without a mask, and thread counts agree."""
    Q, K, window = 150, 333, 40
    g = torch.Generator().manual_seed(3)
    bias = make_bias(dims(bias_spec, Q, K), "bf16", g)
    mask = make_mask((B, 1, 1, K), g)
    kw = dict(Q=Q, K=K, window=window, scope=scope, causal=True)
    expected = brute_visible(bias, mask, **kw)
    assert torch.equal(core_visible(bias, mask, **kw), expected)
    assert torch.equal(core_visible(bias, mask, num_threads=1, **kw), expected)


def test_visible_mask_matches_reference_large():
    Q = K = 1000
    g = torch.Generator().manual_seed(11)
    bias = make_bias((1, HKV, 1, K), "bf16", g)
    for scope, causal in itertools.product(["visible", "global"], [True, False]):
        got = core_visible(bias, None, Q=Q, K=K, window=100, scope=scope, causal=causal)
        want = reference.visible_mask(bias, None, B=B, H=H, Q=Q, K=K, window=100,
                                      topk_scope=scope, is_causal=causal)
        assert torch.equal(got, want)


TOPK_FORMS = [("1,1,1,K", None), ("B,Hkv,1,K", None), ("1,H,Q,K", None),
              ("1,1,1,K", "B,1,1,K"), ("1,Hkv,1,K", "1,H,Q,K"), ("B,H,Q,K", "1,Hkv,1,K")]


@pytest.mark.parametrize("kind", ["ties", "bf16", "f16", "f32"])
@pytest.mark.parametrize("window", [1, 5, 64])
@pytest.mark.parametrize("forms", TOPK_FORMS, ids=lambda f: f"{f[0]}|{f[1]}")
def test_topk_indices(forms, window, kind):
    Q, K = 9, 40
    g = torch.Generator().manual_seed(window)
    bias = make_bias(dims(forms[0], Q, K), kind, g)
    mask = None if forms[1] is None else make_mask(dims(forms[1], Q, K), g)
    expected = brute_topk(bias, mask, window)
    out = torch.full(expected.shape, 12345, dtype=torch.int64)
    _C.topk_indices(bias, mask, out, window=window, num_threads=2)
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------
# Attention


def attention_inputs(Q, K, D, dtype, bias_shape, mask_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Q, H, D, generator=g).to(dtype)
    k = torch.randn(B, K, HKV, D, generator=g).to(dtype)
    v = torch.randn(B, K, HKV, D, generator=g).to(dtype)
    # float32 bias with low-precision q/k/v (the bias's dtype is its own); float64 for float64.
    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g).to(bias_dtype)
    mask = None if mask_shape is None else make_mask(mask_shape, g)
    return q, k, v, bias, mask


def core_forward(q, k, v, bias, mask, *, window, scope, causal, scale, softcap, num_threads=2):
    out = torch.full_like(q, NAN)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), NAN)
    _C.fwd(q, k, v, bias, mask, out, lse, scale=scale, softcap=softcap or 0.0, is_causal=causal,
           window=window or 0, scope_global=scope == "global", num_threads=num_threads)
    return out, lse


def core_backward(q, k, v, bias, mask, out, dout, lse, *, window, scope, causal, scale, softcap,
                  want=("dq", "dk", "dv", "dbias"), num_threads=2):
    grads = {
        "dq": torch.full_like(q, NAN) if "dq" in want else None,
        "dk": torch.full_like(k, NAN) if "dk" in want else None,
        "dv": torch.full_like(v, NAN) if "dv" in want else None,
        "dbias": torch.full_like(bias, NAN) if bias is not None and "dbias" in want else None,
    }
    _C.bwd(q, k, v, bias, mask, out, dout, lse, grads["dq"], grads["dk"], grads["dv"],
           grads["dbias"], scale=scale, softcap=softcap or 0.0, is_causal=causal,
           window=window or 0, scope_global=scope == "global", deterministic=True,
           num_threads=num_threads)
    return grads


def reference_results(q, k, v, bias, mask, dout, upcast=True, **kw):
    """The reference's answer in float64, or (upcast=False) computed in the inputs' dtype."""
    def cast(t):
        return None if t is None else (t.double() if upcast else t)
    inputs = [cast(t) for t in (q, k, v, bias)]
    out, lse = reference.attention(*inputs, mask, **kw)
    dq, dk, dv, dbias = reference.attention_backward(*inputs, mask, cast(dout), **kw)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv, "dbias": dbias}


def assert_close(name, got, want, atol, rtol):
    got = got.double()
    assert not torch.isnan(got).any(), f"{name} has NaN"
    if name == "lse":
        assert torch.equal(torch.isinf(got), torch.isinf(want)), "lse: -inf rows differ"
        got, want = got[torch.isfinite(want)], want[torch.isfinite(want)]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


CASES = {
    "dense-causal": dict(Q=37, K=45, D=24, window=None, scope="visible", causal=True,
                         bias=(B, HKV, 1, 45), mask=None, softcap=None),
    "dense-mask-only": dict(Q=30, K=70, D=16, window=None, scope="visible", causal=False,
                            bias=None, mask=(1, H, 30, 70), softcap=None),
    "threshold": dict(Q=70, K=90, D=64, window=9, scope="visible", causal=True,
                      bias=(1, HKV, 1, 90), mask=(B, 1, 1, 90), softcap=None),
    "list-global": dict(Q=70, K=90, D=40, window=9, scope="global", causal=True,
                        bias=(B, 1, 1, 90), mask=None, softcap=None),
    "list-noncausal": dict(Q=20, K=130, D=8, window=33, scope="visible", causal=False,
                           bias=(1, H, 1, 130), mask=None, softcap=None),
    "per-row": dict(Q=66, K=75, D=33, window=11, scope="visible", causal=True,
                    bias=(B, H, 66, 75), mask=None, softcap=None),
    "per-row-global-mask": dict(Q=40, K=50, D=5, window=4, scope="global", causal=True,
                                bias=(1, HKV, 1, 50), mask=(1, 1, 40, 50), softcap=None),
    "q-longer-than-k": dict(Q=70, K=30, D=12, window=7, scope="visible", causal=True,
                            bias=(1, HKV, 1, 30), mask=None, softcap=None),
    "softcap": dict(Q=65, K=65, D=64, window=20, scope="visible", causal=True,
                    bias=(1, 1, 65, 65), mask=None, softcap=2.5),
    "length-one": dict(Q=1, K=1, D=1, window=1, scope="visible", causal=True,
                       bias=(1, 1, 1, 1), mask=None, softcap=None),
    "head-dim-256": dict(Q=17, K=19, D=256, window=None, scope="visible", causal=False,
                         bias=(1, 1, 1, 19), mask=None, softcap=1.5),
}
TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-5)}


def run_case(case, dtype, seed=0):
    """Runs forward and backward of CASES[case]; returns (results, reference, inputs)."""
    c = CASES[case]
    q, k, v, bias, mask = attention_inputs(c["Q"], c["K"], c["D"], dtype, c["bias"], c["mask"], seed)
    kw = dict(window=c["window"], scope=c["scope"], causal=c["causal"], scale=c["D"] ** -0.5,
              softcap=c["softcap"])
    out, lse = core_forward(q, k, v, bias, mask, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = core_backward(q, k, v, bias, mask, out, dout, lse, **kw)
    ref_kw = dict(window=kw["window"], topk_scope=kw["scope"], is_causal=kw["causal"],
                  scale=kw["scale"], softcap=kw["softcap"])
    inputs = dict(q=q, k=k, v=v, bias=bias, mask=mask, dout=dout, **ref_kw)
    return {"out": out, "lse": lse, **grads}, reference_results(**inputs), inputs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(case, dtype):
    got, want, _ = run_case(case, dtype)
    atol, rtol = TOLERANCES[dtype]
    assert_close("lse", got["lse"], want["lse"], 2e-5, 2e-6)
    for name in ("out", "dq", "dk", "dv", "dbias"):
        if got[name] is not None:
            assert_close(name, got[name], want[name], atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", ["threshold", "per-row", "softcap"])
def test_attention_low_precision(case, dtype):
    """Within twice what plain PyTorch loses at that precision, plus a small floor."""
    got, want, inputs = run_case(case, dtype)
    torch_low = reference_results(upcast=False, **inputs)
    for name in ("out", "dq", "dk", "dv", "dbias"):
        baseline = (torch_low[name].double() - want[name]).abs().max().item()
        error = (got[name].double() - want[name]).abs().max().item()
        assert error <= 2 * baseline + 1e-3, f"{name}: error {error} vs PyTorch {baseline}"


def test_empty_rows_are_zero_and_never_nan():
    Q, K, D = 6, 5, 8
    q, k, v, _, _ = attention_inputs(Q, K, D, torch.float32, None, None)
    mask = torch.ones(B, 1, Q, K, dtype=torch.bool)
    mask[:, :, 3] = False  # an all-False row
    bias = torch.zeros(1, HKV, 1, K)
    bias[..., 0] = float("-inf")  # query 0 (causal) sees only key 0: all its scores are -inf
    kw = dict(window=None, scope="visible", causal=True, scale=0.3, softcap=None)
    out, lse = core_forward(q, k, v, bias, mask, **kw)
    grads = core_backward(q, k, v, bias, mask, out, torch.randn_like(q), lse, **kw)
    assert torch.all(out[:, [0, 3]] == 0) and torch.all(torch.isneginf(lse[:, :, [0, 3]]))
    assert torch.all(grads["dq"][:, [0, 3]] == 0)
    for g in grads.values():
        assert not torch.isnan(g).any()


@pytest.mark.parametrize("want", [("dbias",), ("dq",), ("dk", "dv")], ids="+".join)
def test_partial_gradients(want):
    """Gradients left as None are skipped; the others are still right (bias-only training)."""
    got, ref, inputs = run_case("threshold", torch.float64)
    c = CASES["threshold"]
    kw = dict(window=c["window"], scope=c["scope"], causal=True, scale=c["D"] ** -0.5, softcap=None)
    grads = core_backward(inputs["q"], inputs["k"], inputs["v"], inputs["bias"], inputs["mask"],
                          got["out"], inputs["dout"], got["lse"], want=want, **kw)
    for name in want:
        assert_close(name, grads[name], ref[name], 1e-10, 1e-9)


@pytest.mark.parametrize("case", ["threshold", "per-row", "list-global", "dense-causal"])
def test_deterministic_across_runs_and_threads(case):
    c = CASES[case]
    q, k, v, bias, mask = attention_inputs(c["Q"], c["K"], c["D"], torch.float32, c["bias"], c["mask"])
    kw = dict(window=c["window"], scope=c["scope"], causal=c["causal"], scale=0.2,
              softcap=c["softcap"])
    dout = torch.randn_like(q)
    runs = []
    for threads in (2, 2, 1):
        out, lse = core_forward(q, k, v, bias, mask, num_threads=threads, **kw)
        grads = core_backward(q, k, v, bias, mask, out, dout, lse, num_threads=threads, **kw)
        runs.append([out, lse] + [g for g in grads.values() if g is not None])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_strided_inputs_and_outputs():
    Q, K, D = 33, 41, 16
    base = attention_inputs(Q, K, D, torch.float32, (1, HKV, 1, K), (B, 1, 1, K))
    q = base[0].permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # head-major memory
    k = torch.stack([base[1], torch.full_like(base[1], NAN)], dim=-1)[..., 0]  # stride 2 along D
    v = base[2].transpose(0, 1).contiguous().transpose(0, 1)
    bias = base[3][:, :, :1].expand(B, HKV, Q, K)  # stride 0 over B and Q, size Q
    mask = base[4].expand(B, HKV, 1, K)
    out = torch.full((B, H, Q, D), NAN).transpose(1, 2)
    lse = torch.full((B, Q, H), NAN).transpose(1, 2)
    _C.fwd(q, k, v, bias, mask, out, lse, scale=0.25, softcap=0.0, is_causal=True, window=7,
           scope_global=False, num_threads=2)
    ref_out, ref_lse = reference.attention(*(t.double() for t in base[:3]), base[3].double(),
                                           base[4], window=7, topk_scope="visible",
                                           is_causal=True, scale=0.25)
    assert_close("out", out, ref_out, 2e-5, 2e-5)
    assert_close("lse", lse, ref_lse, 2e-5, 2e-6)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_built_isa(isa, monkeypatch):
    if isa not in _C.info()["isas_built"]:
        pytest.skip(f"{isa} not built")
    monkeypatch.setenv("DMATTN_CPU_ISA", isa)
    got, want, _ = run_case("softcap", torch.float32)
    assert_close("out", got["out"], want["out"], 2e-5, 2e-5)
    assert_close("dq", got["dq"], want["dq"], 2e-5, 2e-5)
    got, want, _ = run_case("threshold", torch.float64)
    assert_close("dk", got["dk"], want["dk"], 1e-10, 1e-9)


def test_info():
    info = _C.info()
    assert info["isa"] in info["isas_built"] and "generic" in info["isas_built"]
    assert isinstance(info["openmp"], bool) and info["max_threads"] >= 1
    assert isinstance(info["compiler"], str)


def test_invalid_arguments_raise_value_error():
    q, k, v, bias, _ = attention_inputs(4, 5, 8, torch.float32, (1, HKV, 1, 5), None)
    out, lse = torch.empty_like(q), torch.empty(B, H, 4)
    kw = dict(scale=1.0, softcap=0.0, is_causal=False, scope_global=False, num_threads=1)
    with pytest.raises(ValueError, match="k"):
        _C.fwd(q, k.double(), v, bias, None, out, lse, window=0, **kw)
    with pytest.raises(ValueError, match="window requires a bias"):
        _C.fwd(q, k, v, None, None, out, lse, window=2, **kw)
    with pytest.raises(ValueError, match="bias"):
        _C.fwd(q, k, v, bias[..., :4], None, out, lse, window=2, **kw)
    with pytest.raises(ValueError, match="lse"):
        _C.fwd(q, k, v, bias, None, out, torch.empty(B, H, 4, dtype=torch.float64), window=0, **kw)
