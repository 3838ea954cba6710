"""SPEC "Errors, never silent": every bad argument raises before any kernel, naming the argument."""

from __future__ import annotations

import pytest
import torch

import dmattn

B, Q, K, H, H_KV, D = 2, 5, 7, 4, 2, 8


def good(**over):
    args = dict(query=torch.randn(B, Q, H, D), key=torch.randn(B, K, H_KV, D), value=torch.randn(B, K, H_KV, D),
                bias=torch.randn(B, H_KV, 1, K), mask=None)
    args.update(over)
    return args


BAD = [
    # (overrides, exception, words the message must contain)
    (dict(query=torch.randn(B, Q, H)), ValueError, ["query", "4-D"]),
    (dict(key=[1, 2]), TypeError, ["key", "torch.Tensor"]),
    (dict(query=torch.randn(B, Q, H, D).int()), TypeError, ["query", "float16"]),
    (dict(key=torch.randn(B, K, H_KV, D).half()), TypeError, ["key", "dtype"]),
    (dict(value=torch.randn(B, K + 1, H_KV, D)), ValueError, ["key and value", "shape"]),
    (dict(key=torch.randn(B + 1, K, H_KV, D), value=torch.randn(B + 1, K, H_KV, D)), ValueError, ["batch"]),
    (dict(key=torch.randn(B, K, H_KV, D + 1), value=torch.randn(B, K, H_KV, D + 1)), ValueError, ["head dim"]),
    (dict(key=torch.randn(B, K, 3, D), value=torch.randn(B, K, 3, D), bias=None), ValueError, ["multiple", "H_kv=3"]),
    (dict(query=torch.randn(B, Q, H, 300), key=torch.randn(B, K, H_KV, 300), value=torch.randn(B, K, H_KV, 300)),
     ValueError, ["head dim", "256"]),
    (dict(query=torch.randn(B, 0, H, D)), ValueError, [">= 1"]),
    (dict(bias=torch.randn(B, 3, 1, K)), ValueError, ["bias", "dimension 1", "size 3", "4 or 2 or 1"]),
    (dict(bias=torch.randn(3, H_KV, 1, K)), ValueError, ["bias", "dimension 0", "size 3", "2 or 1"]),
    (dict(bias=torch.randn(B, H_KV, 2, K)), ValueError, ["bias", "dimension 2", "size 2", "5 or 1"]),
    (dict(bias=torch.randn(B, H_KV, 1, K + 1)), ValueError, ["bias", "dimension 3", "size 8", "7"]),
    (dict(bias=torch.randn(H_KV, 1, K)), ValueError, ["bias", "4-D"]),
    (dict(bias=torch.ones(B, H_KV, 1, K, dtype=torch.int32)), TypeError, ["bias", "floating"]),
    (dict(mask=torch.ones(B, H_KV, 1, K)), TypeError, ["mask", "bool"]),
    (dict(mask=torch.ones(B, 3, 1, K, dtype=torch.bool)), ValueError, ["mask", "dimension 1", "size 3"]),
    (dict(mask=torch.ones(B, 1, Q, K + 2, dtype=torch.bool)), ValueError, ["mask", "dimension 3"]),
]


@pytest.mark.parametrize("over,exc,words", BAD, ids=lambda x: str(x)[:40] if not isinstance(x, dict) else ",".join(x))
def test_bad_tensors(over, exc, words):
    with pytest.raises(exc) as info:
        dmattn.dma_attention(**good(**over))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


OPTIONS = [
    (dict(window=0), ValueError, ["window", ">= 1"]),
    (dict(window=-3), ValueError, ["window", ">= 1"]),
    (dict(window=2.5), TypeError, ["window", "int"]),
    (dict(window=True), TypeError, ["window", "int"]),
    (dict(topk_scope="local"), ValueError, ["topk_scope", "'local'"]),
    (dict(is_causal=1), TypeError, ["is_causal", "bool"]),
    (dict(deterministic="yes"), TypeError, ["deterministic", "bool"]),
    (dict(scale="x"), TypeError, ["scale"]),
    (dict(scale=float("nan")), ValueError, ["scale", "finite"]),
    (dict(softcap=0.0), ValueError, ["softcap", "> 0"]),
    (dict(softcap=-1.0), ValueError, ["softcap", "> 0"]),
    (dict(backend="nope"), ValueError, ["backend", "'nope'", "cpu"]),
    (dict(backend=3), TypeError, ["backend", "str"]),
]


@pytest.mark.parametrize("opts,exc,words", OPTIONS, ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items())
                         if isinstance(x, dict) else "")
def test_bad_options(opts, exc, words):
    with pytest.raises(exc) as info:
        dmattn.dma_attention(**good(), **opts)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_window_requires_bias():
    with pytest.raises(ValueError, match="window requires bias"):
        dmattn.dma_attention(**good(bias=None), window=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_devices_must_match():
    with pytest.raises(ValueError, match="key is on"):
        dmattn.dma_attention(**good(key=torch.randn(B, K, H_KV, D, device="cuda")))
    with pytest.raises(ValueError, match="bias is on"):
        dmattn.dma_attention(**good(bias=torch.randn(B, H_KV, 1, K, device="cuda")))


def test_device_mismatch_on_meta_device():
    """Devices that differ are caught without a GPU: the meta device is a different device."""
    with pytest.raises(ValueError, match="value is on meta"):
        dmattn.dma_attention(**good(value=torch.randn(B, K, H_KV, D, device="meta")))
    with pytest.raises(ValueError, match="mask is on meta"):
        dmattn.dma_attention(**good(mask=torch.ones(B, 1, 1, K, dtype=torch.bool, device="meta")))


def test_named_backend_that_cannot_run_says_why():
    args = good(query=torch.randn(B, Q, H, D, device="meta"), key=torch.randn(B, K, H_KV, D, device="meta"),
                value=torch.randn(B, K, H_KV, D, device="meta"), bias=None)
    with pytest.raises(ValueError, match=r"backend 'reference' cannot run this call: runs on cpu/cuda tensors, got meta"):
        dmattn.dma_attention(**args, backend="reference")


def test_auto_without_capable_backend_lists_every_backend():
    args = good(query=torch.randn(B, Q, H, D, device="meta"), key=torch.randn(B, K, H_KV, D, device="meta"),
                value=torch.randn(B, K, H_KV, D, device="meta"), bias=None)
    with pytest.raises(ValueError) as info:
        dmattn.dma_attention(**args)
    text = str(info.value)
    assert "no dmattn backend can run this call" in text
    for name in dmattn.backends():
        assert name in text


def test_selection_helpers_validate():
    bias = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="window"):
        dmattn.topk_mask(bias, 0)
    with pytest.raises(TypeError, match="bias"):
        dmattn.topk_indices([1.0], 2)
    with pytest.raises(ValueError, match="4-D"):
        dmattn.topk_indices(torch.randn(8), 2)
    with pytest.raises(TypeError, match="mask"):
        dmattn.topk_indices(bias, 2, mask=torch.ones(1, 2, 1, 8))
    with pytest.raises(ValueError, match="query_len"):
        dmattn.topk_mask(torch.randn(1, 2, 4, 8), 2, query_len=5)
    with pytest.raises(ValueError, match="bias and mask dimension 1 .head. sizes 2 and 3"):
        dmattn.topk_mask(torch.randn(1, 2, 1, 8), 2, mask=torch.ones(1, 3, 1, 8, dtype=torch.bool))
