"""GPU benchmark harness: dmattn's backends against dense SDPA, FlexAttention and flash-dmattn, in one
process, on the workloads of BENCHMARKS.md (plus shapes given on the command line).

    python -m dmattn.bench --out-dir benchmarks/results          # the full default run (CUDA)
    python -m dmattn.bench --workloads T8k B32k --impls dmattn sdpa_cudnn flex --quick
    python -m dmattn.bench --shape Q=4096,K=4096,H=16,H_kv=4,D=128,window=512,causal=1,scope=global,B=1
    python -m dmattn.bench --smoke --out-dir /tmp/bench_smoke    # CPU, seconds: checks the harness only

What one run does, per workload (bf16, random data, never zeros):
1. Correctness first. Every implementation runs a small version of the workload (Q=K=256, w=32, the
   same flags and head sizes) and is compared with ``dmattn.reference.attention`` in float64, output
   and, when the workload times fwd+bwd, the gradients. The tolerance is the test suite's rule:
   ``|impl - truth| <= 2 |reference in bf16 - truth| + floor``. Dense peers are compared with the
   reference without window and without bias (they compute dense causal attention); FlexAttention,
   flash-dmattn and dmattn with the windowed reference. An implementation that fails is marked
   "WRONG (...)" and not timed for that workload; one that raises gets a row saying why.
2. Timing: ``triton.testing.do_bench(..., return_mode="median")`` (a median of repeated calls; on the
   CPU of ``--smoke``, a plain timer). Times are end to end from the bias: dmattn and flash-dmattn
   include their selection; FlexAttention's selection (per-key tables plus ``create_block_mask``) is
   timed on its own and added to its attention-only time, both are reported. For dmattn rows the
   selection column times ``dmattn.topk_indices`` as a proxy (the backends select inside the call).
   Forward rows also time one call captured in a CUDA graph and replayed (``graph_ms``): the GPU
   time without the host's launch work, which dominates an eager decode call of every
   implementation and part of calls of a few hundred microseconds (T8k); a serving loop that
   captures its decode step pays that. They also record ``host_ms``, the host time to enqueue one
   eager call: do_bench clears the L2 (a 256 MB write, ~0.07 ms on an H200) before each call, so
   the host gets that much head start, and an eager time well above ``graph_ms`` with ``host_ms``
   above graph + clear is the host's, not the kernels'.
3. Report: median ms, useful TFLOP/s (only visible (query, key) pairs count: 4*D*pairs forward,
   3.5x that for fwd+bwd), peak GPU memory above the inputs, ratios against the faster dense peer;
   a JSON file, a Markdown file and a PNG plot (time against sequence length, the T family) named
   after the card and the date.

Implementations (one ``build_*`` function each; every one returns a ``Runner``):
- ``dmattn:<backend>``: each registered backend but "reference" that ``dmattn.explain`` accepts.
- ``sdpa_flash`` / ``sdpa_cudnn`` (``sdpa_math`` on CPU): dense causal SDPA under ``sdpa_kernel``.
- ``flex``: FlexAttention, compiled, with the same sparsity as dmattn (a mask_mod over per-key tables,
  the bias as score_mod, block mask from ``create_block_mask(_compile=True)``).
- ``flash_dmattn``: flash-dmattn 1.x's Triton backend, when ``import flash_dmattn`` works.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

import dmattn
from dmattn import reference
from dmattn.backends import BACKENDS
from dmattn.problem import make_problem

DTYPE = torch.bfloat16
BLOCK = 64  # key block of the block-level workload (B32k): the bias is constant within each block
# The test suite's tolerance floor per dtype, relative to the magnitude of the true value.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DENSE_PEERS = ("sdpa_flash", "sdpa_cudnn", "sdpa_math")


class Skip(Exception):
    """An implementation that does not run this workload, with the reason (not an error)."""


# ----------------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """One shape and option set. ``bias``: "token" (a random score per key) or "block" (random
    scores per 64-key block, repeated over the block, so the top-w keys are the top w/64 blocks)."""

    name: str
    B: int
    Q: int
    K: int
    H: int = 32
    H_kv: int = 8
    D: int = 128
    window: Optional[int] = None
    causal: bool = True
    scope: str = "global"
    bias: str = "token"
    passes: tuple = ("fwd", "fwd+bwd")
    seq: Optional[int] = None  # the sequence-length axis of the plot (T family only)

    def shape(self) -> dict:
        return dict(B=self.B, Q=self.Q, K=self.K, H=self.H, H_kv=self.H_kv, D=self.D, window=self.window,
                    causal=self.causal, scope=self.scope, bias=self.bias)

    def small(self) -> "Workload":
        """The correctness-check version: same flags and heads, 256 keys, w=32 (128 = two blocks)."""
        if self.Q == 1:
            Q, K = 1, 256
        elif self.Q == self.K:
            Q = K = min(self.Q, 256)
        else:
            Q, K = (128, 256) if self.Q < self.K else (256, 128)
        w = None if self.window is None else min(self.window, 2 * BLOCK if self.bias == "block" else 32)
        return dataclasses.replace(self, name=f"check:{self.name}", B=min(self.B, 2), Q=Q, K=K, window=w,
                                   seq=None)


def _t_family(S: int, scope: str, H=32, H_kv=8, D=128) -> Workload:
    """The T workloads: Q=K=S, token-level top-k; w = S/8 up to 2048 (T8k: 1024, T32k: 2048)."""
    label = f"T{S // 1024}k" if S % 1024 == 0 else f"T{S}"
    return Workload(f"{label}/{scope}", 1, S, S, H, H_kv, D, window=min(S // 8, 2048), scope=scope, seq=S)


def standard_workloads(seqs=(), scopes=("global", "visible")) -> list[Workload]:
    """BENCHMARKS.md's table (H=32, H_kv=8, D=128, causal unless said), plus T points for ``seqs``."""
    # Global scope first (BENCHMARKS.md's headline numbers): if --budget-s runs out, the visible-scope
    # rows are the ones left untimed.
    out = [_t_family(S, "global") for S in (8192, 32768)]
    out += [Workload("B32k", 1, 32768, 32768, window=2048, bias="block"),
            Workload("D128k", 1, 1, 131072, window=2048, causal=False, passes=("fwd",)),
            Workload("D32k-B8", 8, 1, 32768, window=2048, causal=False, passes=("fwd",))]
    out += [_t_family(S, "visible") for S in (8192, 32768)]
    return _add_seqs(out, seqs, scopes, _t_family)


def smoke_workloads(seqs=(), scopes=("global", "visible")) -> list[Workload]:
    """Tiny stand-ins of each kind for ``--smoke`` (CPU, seconds)."""
    small = dict(H=4, H_kv=2, D=32)
    out = [_t_family(256, scope, **small) for scope in ("global", "visible")]
    out += [Workload("B512", 1, 512, 512, window=128, bias="block", **small),
            Workload("D1k", 1, 1, 1024, window=64, causal=False, passes=("fwd",), **small),
            Workload("D1k-B2", 2, 1, 1024, window=64, causal=False, passes=("fwd",), **small)]
    return _add_seqs(out, seqs or (128,), scopes, lambda S, scope: _t_family(S, scope, **small))


def _add_seqs(out, seqs, scopes, make):
    names = {w.name for w in out}
    for S in seqs:
        for scope in scopes:
            w = make(S, scope)
            if w.name not in names:
                out.append(w)
                names.add(w.name)
    return out


def parse_shape(text: str) -> Workload:
    """``Q=4096,K=4096,H=16,H_kv=4,D=128,window=512,causal=1,scope=global,B=1[,bias=block][,passes=fwd|fwd+bwd|both]``
    (unnamed fields take BENCHMARKS.md's defaults; window=0 or absent means no window)."""
    f = dict(B=1, H=32, H_kv=8, D=128, causal=True, scope="global", bias="token", window=None)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        value = value.strip()
        if key == "window":
            f[key] = int(value) if int(value) > 0 else None
        elif key in ("B", "Q", "K", "H", "H_kv", "D"):
            f[key] = int(value)
        elif key == "causal":
            f[key] = value.lower() in ("1", "true", "yes")
        elif key in ("scope", "bias"):
            f[key] = value
        elif key == "passes":  # fwd | fwd+bwd | both
            f[key] = {"fwd": ("fwd",), "fwd+bwd": ("fwd+bwd",), "both": ("fwd", "fwd+bwd")}[value]
        else:
            raise ValueError(f"--shape: unknown field {key!r} in {text!r}")
    if "Q" not in f or "K" not in f:
        raise ValueError(f"--shape needs Q and K: {text!r}")
    if f["scope"] not in ("global", "visible") or f["bias"] not in ("token", "block"):
        raise ValueError(f"--shape: scope must be global|visible and bias token|block: {text!r}")
    f.setdefault("passes", ("fwd",) if f["Q"] == 1 else ("fwd", "fwd+bwd"))
    name = "custom:" + text.replace(" ", "")
    return Workload(name=name, **f)


def make_inputs(wl: Workload, device, seed: int = 0) -> dict:
    """Random bf16 q, k, v (B, S, H, D) and bias (B, H_kv, 1, K): a query-broadcast per-key score."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=DTYPE)  # noqa: E731
    q, k, v = rnd(wl.B, wl.Q, wl.H, wl.D), rnd(wl.B, wl.K, wl.H_kv, wl.D), rnd(wl.B, wl.K, wl.H_kv, wl.D)
    if wl.bias == "block":
        blocks = rnd(wl.B, wl.H_kv, 1, -(-wl.K // BLOCK))
        bias = blocks.repeat_interleave(BLOCK, dim=-1)[..., :wl.K].contiguous()
    else:
        bias = rnd(wl.B, wl.H_kv, 1, wl.K)
    return dict(q=q, k=k, v=v, bias=bias)


# ----------------------------------------------------------------------------------------------
# Useful work


def useful_pairs(wl: Workload, bias: torch.Tensor) -> int:
    """Exact number of visible (query, key) pairs summed over batch and query heads, cheaply:
    global scope from each row's sorted selection (searchsorted against each query's causal limit);
    visible scope sum_i min(|C_i|, w); no window: the causal triangle (or Q*K)."""
    off = wl.K - wl.Q
    i = torch.arange(wl.Q, device=bias.device)
    last = i + off if wl.causal else torch.full_like(i, wl.K - 1)  # last key index a query may see
    n_seen = (last + 1).clamp(0, wl.K)
    if wl.window is None:
        return int(n_seen.sum()) * wl.B * wl.H
    if wl.scope == "visible" and wl.causal:
        return int(n_seen.clamp(max=wl.window).sum()) * wl.B * wl.H
    sel = dmattn.topk_indices(bias, wl.window)  # (B, H_kv, 1, w'), ascending, -1 padded at the end
    sel = torch.where(sel < 0, wl.K, sel).reshape(-1, sel.shape[-1]).contiguous()
    counts = torch.searchsorted(sel, last.expand(sel.shape[0], -1).contiguous(), right=True)
    return int(counts.sum()) * (wl.H // wl.H_kv)


# ----------------------------------------------------------------------------------------------
# Implementations: each build_* returns a Runner over fresh leaves in the implementation's layout


@dataclasses.dataclass
class Runner:
    """``fn()`` computes the output (B, Q, H, D) end to end from the bias (for FlexAttention: from a
    prebuilt block mask; ``select`` then rebuilds that mask, and ``e2e`` does both). ``grads()`` maps
    the leaves' gradients back to (dq, dk, dv, dbias) in the standard layouts (dbias None if none)."""

    fn: Callable[[], torch.Tensor]
    leaves: list
    grads: Callable[[], tuple]
    select: Optional[Callable[[], object]] = None
    select_note: str = ""
    e2e: Optional[Callable[[], torch.Tensor]] = None
    notes: list = dataclasses.field(default_factory=list)


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone().contiguous().requires_grad_(grad)


def build_dmattn(x: dict, wl: Workload, grad: bool, backend: str) -> Runner:
    """``dmattn.dma_attention(..., backend=name)``, when ``dmattn.explain`` says it takes the call."""
    opts = dict(window=wl.window, topk_scope=wl.scope, is_causal=wl.causal)
    ex = dmattn.explain(x["q"], x["k"], x["v"], x["bias"], backend=backend, **opts)
    if ex.chosen != backend:
        raise Skip("declined: " + ("; ".join(ex.reasons.get(backend, [])) or "not chosen"))
    q, k, v, bias = (_leaf(x[n], grad) for n in ("q", "k", "v", "bias"))
    plain_bias = x["bias"]
    select, note = None, None
    if wl.window:
        impl = BACKENDS[backend]
        problem = make_problem(x["q"], x["k"], x["v"], plain_bias, **opts)
        if impl.select(problem, plain_bias, None) is not None:
            select = lambda: impl.select(problem, plain_bias, None)  # noqa: E731
            note = "the backend's own selection metadata, built alone (also included in ms)"
        else:
            select = lambda: dmattn.topk_indices(plain_bias, wl.window)  # noqa: E731
            note = ("dmattn.topk_indices (global-scope selection; a proxy: the backend selects inside "
                    "its kernels, and that time is in ms)")
    return Runner(fn=lambda: dmattn.dma_attention(q, k, v, bias, backend=backend, **opts),
                  leaves=[q, k, v, bias], grads=lambda: (q.grad, k.grad, v.grad, bias.grad),
                  select=select, select_note=note)


def build_sdpa(x: dict, wl: Workload, grad: bool, which: str) -> Runner:
    """Dense SDPA (no window, no bias: what a dense model runs) under one ``sdpa_kernel`` backend.
    GQA through ``enable_gqa=True`` when the backend takes it; otherwise k/v are repeated per query
    head before timing (generous to the peer: the copy and the gradient sum are not timed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_math": SDPBackend.MATH}[which]
    F = torch.nn.functional
    G = wl.H // wl.H_kv
    qh = _leaf(x["q"].transpose(1, 2), grad)
    kh, vh = (x[n].transpose(1, 2) for n in ("k", "v"))
    kw = {}
    if wl.causal and wl.Q == wl.K:
        kw["is_causal"] = True
    elif wl.causal:  # SDPA's is_causal is top-left aligned; SPEC's causality is bottom-right
        from torch.nn.attention.bias import causal_lower_right
        kw["attn_mask"] = causal_lower_right(wl.Q, wl.K)

    def call(q, k, v, gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kw).transpose(1, 2)

    notes = []
    expanded = False
    if G > 1:
        k1, v1 = _leaf(kh, grad), _leaf(vh, grad)
        try:  # the kernel choice depends on grad mode too, so try in the pass's mode
            with torch.set_grad_enabled(grad):
                call(qh, k1, v1, True)
            notes.append("GQA via enable_gqa=True")
        except RuntimeError as exc:
            expanded = True
            notes.append("GQA via repeat_interleave of k/v outside the timing (enable_gqa refused: "
                         + _short(exc, 120) + ")")
    if expanded:
        k1 = _leaf(kh.repeat_interleave(G, dim=1), grad)
        v1 = _leaf(vh.repeat_interleave(G, dim=1), grad)
    elif G == 1:
        k1, v1 = _leaf(kh, grad), _leaf(vh, grad)

    def grads():
        dk, dv = k1.grad, v1.grad
        if expanded:
            dk, dv = (t.unflatten(1, (wl.H_kv, G)).sum(2) for t in (dk, dv))
        return qh.grad.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None

    return Runner(fn=lambda: call(qh, k1, v1, G > 1 and not expanded), leaves=[qh, k1, v1], grads=grads,
                  notes=notes)


_FLEX = None
# Tests set this to run the Flex runner eagerly on CPU (forward only: eager Flex has no CPU backward),
# which checks its mask_mod, score_mod and GQA wiring against the reference without a GPU.
FLEX_EAGER_ON_CPU = False


def _flex_compiled():
    """One ``torch.compile``d flex_attention for the whole run (static shapes; each new shape or
    mask_mod compiles once, and the recompile limit is raised so that 32k never falls back to the
    unfused eager path)."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo.config as dcfg
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 256))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def key_rank(bias3: torch.Tensor) -> torch.Tensor:
    """Each key's position in SPEC order (bias descending, ties to the earlier key): (R.., K) int64.
    A stable sort gives the tie rule; pure PyTorch, as a FlexAttention user would write it."""
    order = torch.sort(bias3, dim=-1, descending=True, stable=True).indices
    ar = torch.arange(bias3.shape[-1], device=bias3.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def prefix_wth_smallest(x: torch.Tensor, w: int, chunk: int = 128) -> torch.Tensor:
    """thr[r, p] = the w-th smallest of x[r, :p+1], or K where that prefix holds fewer than w values.
    ``x``: (R, K) distinct integers in [0, K) (key ranks).

    Why it is cheap: per chunk of C positions, the w smallest values before the chunk (X, one topk)
    and the sorted chunk prefixes (Y, C x C per chunk) suffice, because the w-th smallest of the union
    of two sorted lists is min over i + j = w of max(X_i, Y_j) (1-based order statistics, X_0 = Y_0
    = -inf). Memory O(R * K * (nchunks + C)), no O(K^2) per row beyond that."""
    R, K = x.shape
    big = K
    if w > K:
        return torch.full_like(x, big)
    C = chunk
    nc = -(-K // C)
    xp = torch.nn.functional.pad(x, (0, nc * C - K), value=big)
    pos = torch.arange(nc * C, device=x.device)
    starts = torch.arange(nc, device=x.device) * C
    before = torch.where(pos < starts[:, None], xp[:, None, :], big)           # (R, nc, Kp)
    X = torch.topk(before, w, dim=-1, largest=False, sorted=True).values       # (R, nc, w) ascending
    del before
    tri = torch.arange(C, device=x.device)[None, :] <= torch.arange(C, device=x.device)[:, None]
    Y = torch.sort(torch.where(tri, xp.view(R, nc, 1, C), big), dim=-1).values  # (R, nc, C, C)
    J = min(C, w)
    lo = torch.full((R, nc, 1), -1, dtype=x.dtype, device=x.device)
    Xs = torch.cat([lo, X], -1)[..., w - torch.arange(J + 1, device=x.device)]  # X_{w-j}, j = 0..J
    Ys = torch.cat([lo.unsqueeze(-1).expand(R, nc, C, 1), Y[..., :J]], -1)      # Y_j,     j = 0..J
    thr = torch.maximum(Xs.unsqueeze(2), Ys).amin(-1)                           # (R, nc, C)
    return thr.reshape(R, nc * C)[:, :K]


class FlexMask:
    """FlexAttention's form of the workload's sparsity: per-(batch, kv head) tables filled by
    ``fill(bias3)`` in place (so the mask_mod is one function object per workload and the compiled
    ``create_block_mask`` is reused), and a ``mask_mod`` reading them.

    - global scope: ``sel[b, g, kv]`` = key among the top w of its row (rank < w), & causal;
    - visible scope (causal): per-query threshold: ``rank[b, g, kv] <= thr[b, g, q]``, where thr is
      the w-th smallest rank among the keys query q can see; & causal;
    - no window: causal only (or no block mask at all when not causal)."""

    def __init__(self, wl: Workload, device):
        self.wl, self.G, self.off = wl, wl.H // wl.H_kv, wl.K - wl.Q
        R = (wl.B, wl.H_kv)
        self.kind = ("none" if wl.window is None or wl.window >= wl.K else
                     "visible" if wl.scope == "visible" and wl.causal else "global")
        if self.kind == "global":
            self.sel = torch.zeros(*R, wl.K, dtype=torch.bool, device=device)
        elif self.kind == "visible":
            self.rank = torch.zeros(*R, wl.K, dtype=torch.int32, device=device)
            self.thr = torch.zeros(*R, wl.Q, dtype=torch.int32, device=device)
        self.mask_mod = self._make_mask_mod()

    def _make_mask_mod(self):
        G, off, causal = self.G, self.off, self.wl.causal
        if self.kind == "global":
            sel = self.sel

            def mask_mod(b, h, q, kv):
                keep = sel[b, h // G, kv]
                return keep & (kv <= q + off) if causal else keep
        elif self.kind == "visible":
            rank, thr = self.rank, self.thr

            def mask_mod(b, h, q, kv):
                return (kv <= q + off) & (rank[b, h // G, kv] <= thr[b, h // G, q])
        elif causal:
            def mask_mod(b, h, q, kv):
                return kv <= q + off
        else:
            mask_mod = None
        return mask_mod

    @torch.no_grad()
    def fill(self, bias3: torch.Tensor) -> None:
        """Selection from the bias (B, H_kv, K), in pure PyTorch."""
        wl = self.wl
        if self.kind == "none":
            return
        rank = key_rank(bias3)
        if self.kind == "global":
            self.sel.copy_(rank < wl.window)
            return
        r2 = rank.reshape(-1, wl.K).to(torch.int32)
        thr = prefix_wth_smallest(r2, wl.window)
        p = (torch.arange(wl.Q, device=bias3.device) + self.off).clamp(0, wl.K - 1)
        self.rank.copy_(r2.view_as(self.rank))
        self.thr.copy_(thr[:, p].view_as(self.thr))

    def dense(self) -> torch.Tensor:
        """The mask_mod evaluated on every (b, h, q, kv): (B, H, Q, K) bool (for tests)."""
        wl = self.wl
        b = torch.arange(wl.B).view(-1, 1, 1, 1)
        h = torch.arange(wl.H).view(1, -1, 1, 1)
        q = torch.arange(wl.Q).view(1, 1, -1, 1)
        kv = torch.arange(wl.K).view(1, 1, 1, -1)
        if self.mask_mod is None:
            return torch.ones(wl.B, wl.H, wl.Q, wl.K, dtype=torch.bool)
        return self.mask_mod(b, h, q, kv).expand(wl.B, wl.H, wl.Q, wl.K)


def build_flex(x: dict, wl: Workload, grad: bool) -> Runner:
    """FlexAttention, ``torch.compile``d, same sparsity as dmattn (see ``FlexMask``); the bias as a
    score_mod reading a (B, H_kv, K) leaf, so fwd+bwd also yields dbias. Block mask from
    ``create_block_mask(..., _compile=True)`` over all query heads (the mask depends on h // G)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    cpu = x["q"].device.type != "cuda"
    if cpu and not FLEX_EAGER_ON_CPU:
        raise Skip("FlexAttention is timed on CUDA only (its compiled kernels are Triton GPU kernels)")
    flex = flex_attention if cpu else _flex_compiled()
    G = wl.H // wl.H_kv
    qh, kh, vh = (_leaf(x[n].transpose(1, 2), grad) for n in ("q", "k", "v"))
    bias3 = _leaf(x["bias"][:, :, 0, :], grad)
    fm = FlexMask(wl, qh.device)

    def score_mod(score, b, h, q, kv):
        return score + bias3[b, h // G, kv]

    def select():
        fm.fill(bias3.detach())
        if fm.mask_mod is None:
            return None
        return create_block_mask(fm.mask_mod, wl.B, wl.H, wl.Q, wl.K, device=qh.device, _compile=not cpu)

    state = {"block_mask": select()}

    def attend(block_mask):
        out = flex(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, enable_gqa=G > 1)
        return out.transpose(1, 2)

    return Runner(fn=lambda: attend(state["block_mask"]), leaves=[qh, kh, vh, bias3],
                  grads=lambda: (qh.grad.transpose(1, 2), kh.grad.transpose(1, 2), vh.grad.transpose(1, 2),
                                 bias3.grad.unsqueeze(2)),
                  select=select, e2e=lambda: attend(select()),
                  select_note="per-key tables (stable sort of the bias"
                              + (", per-query rank thresholds" if fm.kind == "visible" else "")
                              + ") + create_block_mask(_compile=True)",
                  notes=[f"mask: {fm.kind}"])


def build_flash_dmattn(x: dict, wl: Workload, grad: bool) -> Runner:
    """flash-dmattn 1.x Triton backend, selection as its transformers integration does it
    (torch.topk of the bias scattered into a bool mask, ties broken arbitrarily by torch.topk)."""
    if x["q"].device.type != "cuda":
        raise Skip("flash-dmattn runs on CUDA only")
    try:
        from flash_dmattn import flash_dmattn_func_auto
    except Exception as exc:  # noqa: BLE001  (any import failure means "not available here")
        raise Skip(f"flash_dmattn not installed here (import failed: {_short(exc, 100)})") from None
    if wl.window is not None and wl.scope == "visible" and wl.causal:
        raise Skip("flash-dmattn 1.x computes the global top-k scope only")
    if wl.causal and wl.Q != wl.K:
        raise Skip("flash-dmattn 1.x aligns causality top-left; SPEC aligns bottom-right (Q != K)")
    attn = flash_dmattn_func_auto(backend="triton")
    q, k, v, bias = (_leaf(x[n], grad) for n in ("q", "k", "v", "bias"))
    shape = (wl.B, wl.H_kv, wl.Q, wl.K)

    def fn():
        mask = None
        if wl.window is not None and wl.window < wl.K:
            idx = torch.topk(bias.detach(), wl.window, dim=-1).indices
            mask = torch.zeros(bias.shape, dtype=torch.bool, device=bias.device).scatter_(-1, idx, True)
            mask = mask.expand(shape)
        return attn(q, k, v, attn_mask=mask, attn_bias=bias.expand(shape), is_causal=wl.causal)

    return Runner(fn=fn, leaves=[q, k, v, bias], grads=lambda: (q.grad, k.grad, v.grad, bias.grad),
                  notes=["untested harness path: the API of flash-dmattn 1.2.3 as documented"])


def implementations(device: torch.device, smoke: bool) -> dict:
    """name -> builder(x, wl, grad), in table order."""
    out = {}
    names = ["cpu"] if smoke else [n for n in dmattn.backends() if n != "reference"]
    for name in names:
        out[f"dmattn:{name}"] = lambda x, wl, grad, _n=name: build_dmattn(x, wl, grad, _n)
    dense = ("sdpa_math",) if device.type == "cpu" else ("sdpa_flash", "sdpa_cudnn")
    for name in dense:
        out[name] = lambda x, wl, grad, _n=name: build_sdpa(x, wl, grad, _n)
    out["flex"] = build_flex
    out["flash_dmattn"] = build_flash_dmattn
    return out


# ----------------------------------------------------------------------------------------------
# Correctness


def _short(exc: BaseException, n: int = 300) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return (type(exc).__name__ + (": " + text[0] if text else ""))[:n]


def _reference_grads(x: dict, wl: Workload, dout, dtype, dense: bool, grad: bool):
    """The reference at ``dtype`` (float64 = truth): (out, dq, dk, dv, dbias) for the cotangent."""
    leaves = [x[n].detach().to(dtype).requires_grad_(grad) for n in ("q", "k", "v", "bias")]
    q, k, v, bias = leaves
    with torch.set_grad_enabled(grad):
        if dense:
            out, _ = reference.attention(q, k, v, is_causal=wl.causal)
        else:
            out, _ = reference.attention(q, k, v, bias, window=wl.window, topk_scope=wl.scope, is_causal=wl.causal)
    if not grad:
        return (out.detach(),)
    wanted = leaves[:3] if dense else leaves
    g = torch.autograd.grad(out, wanted, dout.to(dtype))
    return (out.detach(),) + tuple(g) + ((None,) if dense else ())


def check(name: str, build, wl_small: Workload, device, grad: bool) -> tuple[str, str]:
    """Runs ``name`` on the small workload and compares with the float64 reference (output, and the
    gradients when ``grad``). Returns (status, detail): "ok", "WRONG" or an exception's text."""
    x = make_inputs(wl_small, device, seed=1)
    dense = name in DENSE_PEERS
    try:
        runner = build(x, wl_small, grad)
        call = runner.e2e or runner.fn
        with torch.set_grad_enabled(grad):
            out = call()
            got = (out.detach(),)
            gd = torch.Generator(device=device).manual_seed(2)
            dout = torch.randn(out.shape, generator=gd, device=device, dtype=out.dtype)
            if grad:
                out.backward(dout)
                got += tuple(runner.grads())
    except Skip:
        raise
    except Exception as exc:  # noqa: BLE001  (the row says why; never crash the run)
        return "error", "correctness run failed: " + _short(exc)
    truth = _reference_grads(x, wl_small, dout, torch.float64, dense, grad)
    low = _reference_grads(x, wl_small, dout, DTYPE, dense, grad)
    worst = []
    for label, g, lo, t in zip(("out", "dq", "dk", "dv", "dbias"), got, low, truth):
        if t is None or g is None:
            continue
        g64, lo64, t64 = (a.detach().to("cpu", torch.float64) for a in (g, lo, t))
        if g64.shape != t64.shape:
            return "WRONG", f"{label} shape {tuple(g64.shape)} != {tuple(t64.shape)}"
        if not torch.isfinite(g64).all():
            return "WRONG", f"{label} has NaN/inf"
        err = (g64 - t64).abs().max().item()
        tol = 2 * (lo64 - t64).abs().max().item() + FLOOR[DTYPE] * max(1.0, t64.abs().max().item())
        worst.append((err / tol, label, err, tol))
    ratio, label, err, tol = max(worst)
    if ratio > 1:
        return "WRONG", f"max err {err:.3g} > tol {tol:.3g} on {label}"
    return "ok", f"max err/tol {ratio:.2f} (worst: {label})"


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn, device, warmup_ms: float, rep_ms: float, grad_to_none=None) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, a plain timer on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    fn()  # warm-up
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(fn, device, warmup_ms: float, rep_ms: float) -> tuple[Optional[float], Optional[str]]:
    """Median milliseconds of replaying one call of ``fn`` captured in a CUDA graph: the GPU time of
    the call without the host's launch work, which is most of an eager decode call's time (for
    dmattn as for the dense peers). Returns (None, why) when the capture fails."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = bench_ms(graph.replay, device, warmup_ms, rep_ms)
        del graph
        return ms, None
    except Exception as exc:  # noqa: BLE001  (a peer that cannot be captured gets its reason)
        _sync(device)
        return None, _short(exc, 160)


def host_ms(fn, device, calls: int = 20, repeats: int = 7) -> float:
    """Median over ``repeats`` of the host time per call to enqueue ``calls`` back-to-back calls of
    ``fn`` (no synchronisation between them, so the GPU does not hold the host back unless its
    launch queue fills, which 20 calls do not)."""
    fn()
    _sync(device)
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) * 1e3 / calls)
        _sync(device)
    return statistics.median(per_call)


def peak_mib(fn, device) -> Optional[float]:
    """Peak memory one call allocates above what is live before it (the inputs), in MiB."""
    if device.type != "cuda":
        return None
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def time_impl(name: str, build, x: dict, wl: Workload, pas: str, device, args, sel_cache: dict) -> dict:
    """Times one implementation on one workload and pass; returns the result row's fields."""
    grad = pas == "fwd+bwd"
    runner = build(x, wl, grad)
    row = dict(notes=list(runner.notes))
    if grad:
        gd = torch.Generator(device=device).manual_seed(3)
        dout = torch.randn(wl.B, wl.Q, wl.H, wl.D, generator=gd, device=device, dtype=DTYPE)

        def step(f):
            def run():
                f().backward(dout)
            return run
        attn, e2e = step(runner.fn), step(runner.e2e) if runner.e2e else None
    else:
        def nograd(f):
            def run():
                with torch.no_grad():
                    return f()
            return run
        attn, e2e = nograd(runner.fn), nograd(runner.e2e) if runner.e2e else None
    attn()  # compile / autotune / first-call work stays out of every number
    _sync(device)
    for t in runner.leaves:
        t.grad = None
    row["peak_mib"] = peak_mib(e2e or attn, device)
    for t in runner.leaves:
        t.grad = None
    ms = bench_ms(attn, device, args.warmup_ms, args.rep_ms, grad_to_none=runner.leaves if grad else None)
    if runner.select is not None:
        key = (wl.name, name)
        if key not in sel_cache:  # the same selection serves both passes
            with torch.no_grad():
                sel_cache[key] = bench_ms(runner.select, device, args.warmup_ms, args.rep_ms)
        row["selection_ms"] = sel_cache[key]
        row["selection_what"] = runner.select_note
    if device.type == "cuda" and not grad and runner.e2e is None:
        row["graph_ms"], why = graph_ms(attn, device, args.warmup_ms, args.rep_ms)
        row["host_ms"] = host_ms(attn, device)
        if why:
            row["notes"].append(f"no CUDA-graph time: {why}")
    if runner.e2e is not None:  # Flex: the selection is not inside fn; e2e = selection + attention
        row["attn_ms"] = ms
        row["ms"] = ms + row["selection_ms"]
        row["notes"].append("ms = selection_ms + attn_ms (medians, timed separately)")
    else:
        row["ms"] = ms
    return row


# ----------------------------------------------------------------------------------------------
# Report


def machine(device) -> dict:
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
                torch=torch.__version__, dmattn=dmattn.__version__, host_cpu=platform.processor() or platform.machine(),
                device=str(device), backends=dmattn.backends())
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"not importable ({_short(exc, 80)})"
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except Exception:  # noqa: BLE001  (no nvidia-smi: the driver is simply not reported)
            info["driver"] = None
    else:
        info["card"] = "cpu"
    try:
        from dmattn import cuda_ext
        info["dmattn_cuda_module"] = cuda_ext.info() if cuda_ext.available() else cuda_ext.LOAD_ERROR
    except Exception as exc:  # noqa: BLE001
        info["dmattn_cuda_module"] = _short(exc)
    return info


def _fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if v < 100 else f"{v:.0f}"


def best_dense(rows) -> Optional[dict]:
    dense = [r for r in rows if r["impl"] in DENSE_PEERS and r["status"] == "ok"]
    return min(dense, key=lambda r: r["ms"]) if dense else None


def markdown(report: dict) -> str:
    """Two tables: ms per workload x implementation (with speed-up over the faster dense peer), then
    every row in detail; then every skip, decline and failure with its reason."""
    m = report["machine"]
    impls = report["impls"]
    lines = [f"# dmattn benchmark: {m['card']}, {m['date']}",
             "", f"torch {m['torch']}, triton {m['triton']}, CUDA {m.get('cuda', '-')}, driver {m.get('driver', '-')}; "
             f"bf16; median ms (do_bench), end to end from the bias; (Nx) = speed-up over the faster dense "
             f"SDPA peer of that row.", ""]
    lines.append("| workload | pass | " + " | ".join(impls) + " |")
    lines.append("|---|---|" + "---|" * len(impls))
    groups = {}
    for r in report["results"]:
        groups.setdefault((r["workload"], r["pass"]), []).append(r)
    for (wl, pas), rows in groups.items():
        ref = best_dense(rows)
        cells = []
        by = {r["impl"]: r for r in rows}
        for name in impls:
            r = by.get(name)
            if r is None or r["status"] != "ok":
                cells.append("-" if r is None else r["status"])
                continue
            ratio = f" ({ref['ms'] / r['ms']:.1f}x)" if ref and r["impl"] not in DENSE_PEERS else ""
            cells.append(_fmt(r["ms"]) + ratio)
        lines.append(f"| {wl} | {pas} | " + " | ".join(cells) + " |")
    lines += ["", "| workload | pass | impl | ms | attention-only ms | selection ms | useful TFLOP/s | "
              "peak MiB | vs best dense |", "|---|---|---|---|---|---|---|---|---|"]
    for (wl, pas), rows in groups.items():
        ref = best_dense(rows)
        for r in rows:
            if r["status"] != "ok":
                continue
            ratio = f"{ref['ms'] / r['ms']:.2f}x" if ref else "-"
            lines.append(f"| {wl} | {pas} | {r['impl']} | {_fmt(r['ms'])} | {_fmt(r.get('attn_ms'))} | "
                         f"{_fmt(r.get('selection_ms'))} | {_fmt(r.get('tflops'))} | {_fmt(r.get('peak_mib'))} | {ratio} |")
    graphs = [r for r in report["results"] if r["status"] == "ok" and r.get("graph_ms") is not None]
    if graphs:
        lines += ["", "Forward calls in a CUDA graph (replay of one captured call: its GPU time without the "
                  "host's launch work; eager = the ms above; host = the host's time to enqueue one eager call):", "",
                  "| workload | impl | eager ms | graph ms | host ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['workload']} | {r['impl']} | {_fmt(r['ms'])} | {_fmt(r['graph_ms'])} | "
                  f"{_fmt(r.get('host_ms'))} |" for r in graphs]
    lines += ["", "Not timed (reasons):", ""]
    seen = set()
    for r in report["results"]:
        if r["status"] == "ok":
            continue
        key = (r["workload"], r["impl"], r["status"], r.get("reason"))
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- {r['workload']} {r['pass']} {r['impl']}: {r['status']}: {r.get('reason', '')}")
    notes = {}
    for r in report["results"]:
        for n in r.get("notes", []):
            if "reused" not in n:
                notes.setdefault((r["impl"], n), r["workload"])
    if notes:
        lines += ["", "Notes:", ""] + [f"- {impl} ({wl}): {n}" for (impl, n), wl in notes.items()]
    lines += ["", "Correctness (small shapes, against the float64 reference):", ""]
    for c in report["correctness"]:
        lines.append(f"- {c['check']} {c['pass']} {c['impl']}: {c['status']} ({c['detail']})")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> Optional[str]:
    """Time against sequence length (T family), log-log, one line per implementation and scope
    (visible dashed), one panel per pass. Returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"plot skipped: matplotlib not importable ({_short(exc, 80)})"
    seq = {w["name"]: w for w in report["workloads"] if w.get("seq")}
    passes = ["fwd", "fwd+bwd"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, pas in zip(axes, passes):
        lines = {}
        for r in report["results"]:
            w = seq.get(r["workload"])
            if w is None or r["pass"] != pas or r["status"] != "ok":
                continue
            if r["impl"] in DENSE_PEERS and w["scope"] != "global":
                continue  # dense attention ignores the scope: one line
            label = r["impl"] if r["impl"] in DENSE_PEERS else f"{r['impl']} ({w['scope']})"
            lines.setdefault((label, w["scope"]), []).append((w["seq"], r["ms"]))
        for (label, scope), pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="--" if scope == "visible" else "-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (Q = K)")
        ax.set_ylabel("median ms")
        ax.set_title(f"{pas}, bf16, H=32/H_kv=8, D=128" if report["machine"]["card"] != "cpu" else pas)
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"dmattn vs peers on {report['machine']['card']} ({report['machine']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def write_outputs(report: dict, out_dir: str, stem: str, final: bool) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(json=os.path.join(out_dir, stem + ".json"), md=os.path.join(out_dir, stem + ".md"),
                 png=os.path.join(out_dir, stem + ".png"))
    if final:
        note = plot(report, paths["png"])
        if note:
            print(note)
            report["plot"] = note
            paths.pop("png")
        else:
            report["plot"] = os.path.basename(paths["png"])
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(report))
    return paths


# ----------------------------------------------------------------------------------------------
# Driver


def _select(items, wanted):
    """Keeps names equal to a wanted entry or starting with it followed by '/' or ':'."""
    if not wanted:
        return list(items)
    return [n for n in items if any(n == w or n.startswith(w + "/") or n.startswith(w + ":") for w in wanted)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dmattn.bench", description="Benchmark dmattn's backends against dense SDPA, FlexAttention and flash-dmattn "
                                 "on the workloads of BENCHMARKS.md (see the module docstring).")
    ap.add_argument("--out-dir", default="benchmarks/results", help="where the JSON/Markdown/PNG go")
    ap.add_argument("--workloads", nargs="+", help="ids or prefixes: T8k T32k/visible B32k D128k D32k-B8 ...")
    ap.add_argument("--impls", nargs="+", help="names or prefixes: dmattn dmattn:triton sdpa_flash sdpa_cudnn flex ...")
    ap.add_argument("--shape", action="append", default=[], help="a user shape, e.g. Q=4096,K=4096,H=16,H_kv=4,"
                    "D=128,window=512,causal=1,scope=global,B=1 (repeatable; always run)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[], help="extra T-family points (Q=K=S, w=min(S/8, 2048))")
    ap.add_argument("--scopes", nargs="+", default=["global", "visible"], choices=["global", "visible"],
                    help="top-k scopes of the --seqs points")
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--quick", action="store_true", help="shorter warm-up and repetition (noisier)")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop timing new rows after this many seconds (their rows say so); JSON is always written")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the harness, not speed")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = ap.parse_args(argv)
    args.warmup_ms = args.warmup_ms or (5.0 if args.smoke else 10.0 if args.quick else 25.0)
    args.rep_ms = args.rep_ms or (20.0 if args.smoke else 40.0 if args.quick else 100.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cpu" and not args.smoke and not args.shape:
        print("no CUDA device: the standard workloads need a GPU. Use --smoke (tiny CPU shapes) or --shape.")
        return 2
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device refuses a device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if args.smoke:
        # The smoke run checks the pipeline, not speed. One thread: on a small shared machine, tiny
        # calls alternating between torch's thread pool and the CPU backend's OpenMP threads took
        # 10-100x longer than alone (threads waiting for a busy core), turning seconds into a minute.
        torch.set_num_threads(1)
    make = smoke_workloads if args.smoke else standard_workloads
    workloads = [] if (device.type == "cpu" and not args.smoke) else make(args.seqs, args.scopes)
    by_name = {w.name: w for w in workloads}
    workloads = [by_name[n] for n in _select(by_name, args.workloads)]
    workloads += [parse_shape(s) for s in args.shape]
    impls_all = implementations(device, args.smoke)
    impls = {n: impls_all[n] for n in _select(impls_all, args.impls)}

    info = machine(device)
    stem = f"bench-{_slug(info['card'])}-{info['date'][:10]}" + ("-smoke" if args.smoke else "")
    report = dict(machine=info, impls=list(impls),
                  settings=dict(dtype="bfloat16", warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                                timer="triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median",
                                flops="4*D*pairs fwd, 3.5x for fwd+bwd; pairs = visible (query, key) pairs x heads x batch",
                                smoke=args.smoke, argv=sys.argv[1:]),
                  workloads=[], correctness=[], results=[])
    print(f"{info['card']}  torch {info['torch']}  triton {info['triton']}  impls: {', '.join(impls)}", flush=True)

    checks, dense_cache, sel_cache = {}, {}, {}
    for wl in workloads:
        small = wl.small()
        try:
            x = make_inputs(wl, device)
            pairs = useful_pairs(wl, x["bias"])
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory for a user shape)
            report["workloads"].append(dict(name=wl.name, **wl.shape(), error=_short(exc)))
            for pas in wl.passes:
                for name in impls:
                    report["results"].append({"workload": wl.name, "pass": pas, "impl": name, "status": "error",
                                              "reason": "inputs: " + _short(exc)})
            continue
        report["workloads"].append(dict(name=wl.name, **wl.shape(), passes=list(wl.passes), seq=wl.seq,
                                        useful_pairs=pairs, useful_gflop_fwd=4 * wl.D * pairs / 1e9))
        for pas in [p for p in wl.passes if p in args.passes]:
            grad = pas == "fwd+bwd"
            flops = 4 * wl.D * pairs * (3.5 if grad else 1.0)
            for name, build in impls.items():
                row = {"workload": wl.name, "pass": pas, "impl": name}
                report["results"].append(row)
                if time.monotonic() - start > args.budget_s:
                    row.update(status="skipped", reason=f"time budget (--budget-s {args.budget_s:g}) used up")
                    continue
                # Correctness first, once per small shape, implementation and pass kind.
                ckey = (small, name, grad)
                if ckey not in checks:
                    try:
                        checks[ckey] = check(name, build, small, device, grad)
                    except Skip as s:
                        checks[ckey] = ("skipped", str(s))
                    report["correctness"].append({"check": small.name, "pass": pas, "impl": name,
                                                  "status": checks[ckey][0], "detail": checks[ckey][1]})
                status, detail = checks[ckey]
                if status != "ok":
                    row.update(status=status, reason=detail if status != "WRONG" else f"WRONG ({detail})")
                    continue
                dkey = (name, wl.B, wl.Q, wl.K, wl.H, wl.H_kv, wl.D, wl.causal, pas)
                if name in DENSE_PEERS and dkey in dense_cache:  # dense ignores window, scope and bias
                    row.update({k: v for k, v in dense_cache[dkey].items() if k not in row})
                    row["notes"] = row.get("notes", []) + [f"same dense problem as {dense_cache[dkey]['workload']}: reused"]
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12  # useful pairs differ per workload
                    continue
                try:
                    row.update(time_impl(name, build, x, wl, pas, device, args, sel_cache))
                    row["status"] = "ok"
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    if name in DENSE_PEERS:
                        dense_cache[dkey] = dict(row)
                except Skip as s:
                    row.update(status="skipped", reason=str(s))
                except Exception as exc:  # noqa: BLE001  (the row says why; the run goes on)
                    row.update(status="error", reason=_short(exc))
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if row["status"] == "ok":
                    extra = f" sel {row['selection_ms']:.3f}" if "selection_ms" in row else ""
                    extra += f" graph {row['graph_ms']:.3f}" if row.get("graph_ms") is not None else ""
                    extra += f" host {row['host_ms']:.3f}" if row.get("host_ms") is not None else ""
                    print(f"[{time.monotonic() - start:6.1f}s] {wl.name:<16} {pas:<7} {name:<16} "
                          f"{row['ms']:9.3f} ms{extra}  {row['tflops']:7.1f} TFLOP/s", flush=True)
                else:
                    print(f"[{time.monotonic() - start:6.1f}s] {wl.name:<16} {pas:<7} {name:<16} "
                          f"{row['status']}: {row.get('reason', '')}", flush=True)
        del x
        write_outputs(report, args.out_dir, stem, final=False)  # partial results survive a timeout

    report["elapsed_s"] = time.monotonic() - start
    paths = write_outputs(report, args.out_dir, stem, final=True)
    print()
    print(markdown(report).split("\n\n| workload | pass | impl")[0].split("\n", 3)[-1])
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
