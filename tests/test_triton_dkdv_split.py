"""The Triton dk/dv kernel with the group split over programs (``attention.SPLIT_GROUP_DKDV``):
per-head float32 partials by list position, summed over the group by ``dkdv_gather_kernel``.
Checked against the float64 reference like the shared matrix, on LIST calls whose query heads
share their kv head's list (the only calls it changes), with the split forced on."""

from __future__ import annotations

import pytest

from cases import (Case, SELECTION_DEVICES, assert_close_to_reference, backend_fn, make_inputs, reference_fn,
                   run_with_grads)
from dmattn.kernels.triton import attention

CASES = [
    Case(window=9, scope="global", causal=True),                                    # GQA 4/2, bias (B, H_kv, 1, K)
    Case(window=9, scope="global", causal=False),
    Case(H=6, H_kv=2, window=40, scope="global", causal=True, bias="1_1_1"),        # one list for every head
    Case(H=4, H_kv=1, window=17, scope="visible", causal=False, mask="b_hkv_1"),    # MQA, mask folded in
    Case(B=1, Q=130, K=61, window=20, scope="global", causal=True, softcap=2.5),    # Q > K: empty rows
    Case(B=1, Q=17, K=200, window=100, scope="global", causal=True, ties=True),     # padding in the list
]


@pytest.mark.parametrize("device", SELECTION_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_split_group_dkdv_matches_reference(device, case, monkeypatch):
    import torch
    monkeypatch.setattr(attention, "SPLIT_GROUP_DKDV", True)
    gather = _Spy(attention.dkdv_gather_kernel)
    monkeypatch.setattr(attention, "dkdv_gather_kernel", gather)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        q, k, v, bias, mask = make_inputs(case, dtype, device)
        got = run_with_grads(backend_fn(case, "triton"), q, k, v, bias, mask)
        low = run_with_grads(reference_fn(case, dtype), q, k, v, bias, mask)
        truth = run_with_grads(reference_fn(case, torch.float64), q, k, v, bias, mask)
        assert_close_to_reference(got, low, truth, dtype, label=f"[triton split {dtype}] ")
    assert gather.launches == len(dtypes)  # the split path ran, once per backward


class _Spy:
    """Counts the launches of a Triton kernel (``kernel[grid](...)``) and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]
