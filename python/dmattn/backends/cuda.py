"""The CUDA backend (module ``dmattn._cuda``, through ``dmattn.cuda_ext``): CuTe kernels for sm_80+,
float16/bfloat16, the head dims the module was compiled for.

Three key-visiting paths. LIST: a window over a bias and mask shared by every query, with global
scope (or a selection that equals it: no causality, or a single query); the CUDA radix select
(``kernels/cuda/select.h``, through ``cuda_ext.list_selection``) builds the sorted key lists, the mask
folded into them, and the kernels gather those keys. PREFIX: the same window in the visible scope
with causality and Q > 1 (each query ranks its own causal prefix); ``kernels/cuda/visible.h``
(through ``cuda_ext.visible_selection``) gives each key its death position and each query block
its list of alive keys, and the kernels gather those and test ``j <= c_i < death_j``. DENSE:
everything else it accepts (no window, or a window that keeps every key); bias and mask are tested
per element. Calls with few queries (decode: Q <= 16, at most 32 query rows per kv head) on the
LIST and DENSE paths run the split forward (``kernels/cuda/fwd_split.h``: each list spread over
many thread blocks, then merged), unless ``cuda_ext.SPLIT_DECODE`` is off; on the LIST path the
selection and that forward go through one module call (``cuda_ext.decode``). A window over a
per-query bias or mask has no CUDA path: the Triton backend computes it. Nothing here needs Triton.

Registered after ``triton`` because it is slower today (H200, harness v6: T32k forward 2.78 vs 1.40
ms; visible scope T32k forward 6.55 vs 3.86 ms, docs/performance.md), so
``backend="auto"`` picks it only when Triton declines; ``backend="cuda"`` runs it by name.
"""

from __future__ import annotations

import torch

from .. import cuda_ext, reference
from .base import ALL_FEATURES, Backend, forward_outputs, gradient_outputs, new_output, plain


def _load_error():
    if not cuda_ext.available():
        return cuda_ext.LOAD_ERROR
    if not (cuda_ext.has_forward() and cuda_ext.has_backward()):
        return "dmattn._cuda was built without the attention forward and backward"
    if not hasattr(cuda_ext._cuda, "select_lists"):
        return "dmattn._cuda was built without the LIST selection (select_lists)"
    return None


def _head_dims() -> frozenset[int]:
    """Head dims both kernels were compiled for (``DMATTN_CUDA_HEADDIMS``), from the module itself."""
    if not (cuda_ext.has_forward() and cuda_ext.has_backward()):
        return frozenset()
    info = cuda_ext.info()
    parse = lambda key: {int(x) for x in str(info.get(key, "")).replace(",", " ").split()}  # noqa: E731
    return frozenset(parse("fwd_head_dims") & parse("bwd_head_dims"))


class CudaBackend(Backend):
    name = "cuda"
    device_types = frozenset({"cuda"})
    auto_devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = _head_dims()
    min_capability = (8, 0)
    # No atomics in the forward or the backward (dk/dv/dbias partials are reduced in fixed order).
    deterministic = True
    features = ALL_FEATURES - {"window_per_query"}

    _load_error_text = _load_error()

    def load_error(self):
        return self._load_error_text

    def extra_reasons(self, problem):
        p = problem
        if p.effective_window is not None and p.ranks_prefixes and p.query_broadcast:
            if not cuda_ext.has_visible():
                return ["was built without the visible-scope kernels (the visible top-k scope with is_causal "
                        "and Q > 1; the triton backend implements it)"]
            if p.bias_dtype == torch.float64:
                return ["does not implement the visible top-k scope (is_causal, Q > 1) with a float64 bias "
                        "(its rank keys pack 16- or 32-bit values; the triton backend implements it)"]
        return []

    def preferred(self, problem):
        """The windowed LIST calls that run the sm_90a kernels (H100/H200, head dim 64 or 128, a
        query-broadcast bias and mask, the global scope or no causal prefixes), where this backend
        beats ``triton`` ahead of it in the registry. Measured on an H200, harness v16 (bf16,
        docs/performance.md), cuda against triton, ms: T8k fwd 0.250 / 0.253, fwd+bwd 1.23 / 1.91;
        T32k fwd 1.32 / 1.39, fwd+bwd 5.81 / 7.71; B32k fwd 1.26 / 1.31, fwd+bwd 5.68 / 7.50; D128k
        decode 0.042 / 0.170 eager, 0.033 / 0.046 with one call replayed as a CUDA graph. The
        visible scope's PREFIX path, the sm_80 kernels and calls without a window stay behind
        triton."""
        p = problem
        if p.device.type != "cuda" or p.effective_window is None or p.ranks_prefixes or not p.query_broadcast:
            return False
        if p.dtype not in (torch.float16, torch.bfloat16) or not cuda_ext.SM90_BACKWARD:
            return False
        with cuda_ext.on_device(p.device):
            return cuda_ext.uses_sm90(p.D)

    def _keys(self, problem, bias, mask, block_m: int, backward: bool = False):
        """``(metadata, kernel_mask)``: the keyword arguments of ``cuda_ext.forward`` (or, with
        ``backward``, ``cuda_ext.backward``) for a windowed call, for query blocks of ``block_m``
        rows (LIST: idx and counts; PREFIX: ``cuda_ext.visible_selection``, in the backward with
        the dk/dv kernel's key order; the mask folded into both), else DENSE (no metadata, the mask
        tested per element)."""
        p = problem
        w = p.effective_window
        if w is None:
            return {}, mask
        if p.ranks_prefixes:  # reasons() leaves only query-broadcast bias and mask here
            meta = cuda_ext.visible_selection(bias, mask, window=w, Q=p.Q, block_m=block_m,
                                              dkdv_block_n=cuda_ext.bwd_dkdv_block_n(p.D) if backward else None)
            return meta, None
        meta = cuda_ext.list_selection(bias, mask, window=w, Q=p.Q, head_dim=p.D, is_causal=p.is_causal)
        if meta is None:
            # reasons() declines every windowed call that has no LIST path, so this is a bug there.
            raise RuntimeError(f"cuda backend: no LIST selection for an accepted problem {p}")
        idx, counts = meta
        return dict(idx=idx, counts=counts), None

    def forward(self, problem, q, k, v, bias, mask):
        p = problem
        out, lse = forward_outputs(p, q)
        with cuda_ext.on_device(q.device):
            if p.effective_window is not None and not p.ranks_prefixes:
                # Decode (few queries, LIST): selection and split forward in one module call.
                done = cuda_ext.decode(q, k, v, bias, mask, window=p.effective_window, scale=p.scale,
                                       softcap=p.softcap, is_causal=p.is_causal, out=out, lse=lse)
                if done is not None:
                    return out, lse
            meta, kernel_mask = self._keys(p, bias, mask, cuda_ext.fwd_block_m(p.D))
            cuda_ext.forward(q, k, v, bias, kernel_mask, scale=p.scale, softcap=p.softcap,
                             is_causal=p.is_causal, out=out, lse=lse, **meta)
        return out, lse

    def backward(self, problem, dout, q, k, v, bias, mask, out, lse, needs):
        p = problem
        dq, dk, dv, dbias = gradient_outputs((q, k, v, bias), needs)
        need_dkdv = dk is not None or dv is not None
        # The dk/dv kernel writes both: the one nobody asked for goes to a scratch buffer.
        dk_buf = dk if dk is not None or not need_dkdv else new_output(k.shape, k.dtype, k.device)
        dv_buf = dv if dv is not None or not need_dkdv else new_output(v.shape, v.dtype, v.device)
        with cuda_ext.on_device(q.device):
            # LIST: the backward rebuilds the counts for its dq block size from idx.
            meta, kernel_mask = self._keys(p, bias, mask, cuda_ext.bwd_dq_block_m(p.D), backward=True)
            got_dq, got_dk, got_dv, got_dbias = cuda_ext.backward(
                dout, q, k, v, out, lse, bias, kernel_mask, scale=p.scale, softcap=p.softcap,
                is_causal=p.is_causal, need_dq=dq is not None, need_dkdv=need_dkdv,
                need_dbias=dbias is not None, dq=dq, dk=dk_buf, dv=dv_buf, **meta)
            if dbias is not None:
                dbias.copy_(got_dbias)
        return (got_dq, got_dk if dk is not None else None, got_dv if dv is not None else None, dbias)

    def select(self, problem, bias, mask):
        p = problem
        if p.effective_window is None:
            return None
        with cuda_ext.on_device(bias.device):
            return self._keys(p, bias, mask, cuda_ext.fwd_block_m(p.D))[0]

    def visible_mask(self, problem, bias, mask):
        # A debugging helper: the reference's dense computation, exact by definition.
        p = problem
        return reference.visible_mask(*plain(bias, mask), B=p.B, H=p.H, Q=p.Q, K=p.K, window=p.window,
                                      topk_scope=p.topk_scope, is_causal=p.is_causal)

    def topk_indices(self, bias, mask, window):
        bias, mask = plain(bias, mask)
        K = bias.shape[-1]
        with cuda_ext.on_device(bias.device):
            if all(t is None or t.shape[2] == 1 for t in (bias, mask)):
                idx = cuda_ext.select_lists(bias, mask, window)[0].unsqueeze(2).long()
                return idx.masked_fill_(idx == K, -1)
            rows = tuple(max(t.shape[d] for t in (bias, mask) if t is not None) for d in range(3))
            return cuda_ext.topk_indices(bias, mask, window, rows)
