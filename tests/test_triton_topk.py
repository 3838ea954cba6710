"""The Triton top-w selection kernels (``dmattn.kernels.triton.topk``) against the torch lists of
``selection.selected_lists`` (tested against the reference in test_triton_selection.py), bit for
bit: both launch plans (one program per row, and rows cut into chunks), every broadcast form of
bias and mask, masks that leave fewer than w candidates, heavy ties, -0.0 next to +0.0, -inf.

CPU tensors run under the Triton interpreter (TRITON_INTERPRET=1, conftest.py's default); CUDA
tensors when a GPU is present."""

from __future__ import annotations


import pytest
import torch

import dmattn
from cases import SELECTION_DEVICES
from dmattn import reference
from dmattn.kernels.triton import selection as sel
from dmattn.kernels.triton import topk

DEVICES = SELECTION_DEVICES
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_POISON = -7  # never an index nor the sentinel


@pytest.fixture(autouse=True)
def poisoned_int32(monkeypatch):
    """Every int32 ``torch.empty`` (the output and the workspace) starts as garbage, so a slot
    the kernels fail to write, or a workspace entry read before it is written, shows up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(_POISON) if t.dtype == torch.int32 else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _bias(shape, dtype, kind: str, seed: int, device: str, key_stride: int = 1) -> torch.Tensor:
    """``random``: normal values. ``ties``: three values only, with -0.0 next to +0.0 and -inf
    among them. ``key_stride`` > 1 gives a non-contiguous view (keys interleaved with others)."""
    g = torch.Generator().manual_seed(seed)
    B, H, _, K = shape
    if kind == "random":
        t = torch.randn(B, H, 1, K * key_stride, generator=g)
    else:
        t = torch.tensor([-1.5, 0.0, 2.0])[torch.randint(0, 3, (B, H, 1, K * key_stride), generator=g)]
        t[..., 1::5] = -0.0
        t[..., 3::7] = float("-inf")
    return t.to(dtype).to(device)[..., ::key_stride]


def _mask(shape, kind: str, seed: int, device: str) -> torch.Tensor:
    """``random``: 60 % allowed. ``few``: ~5 % allowed, so most rows have fewer than w candidates.
    ``empty_rows``: random, with the first row of every batch entry all False. Transposed storage
    (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    B, H, _, K = shape
    p = 0.05 if kind == "few" else 0.6
    m = (torch.rand(B, K, H, generator=g) < p).permute(0, 2, 1).unsqueeze(2)
    if kind == "empty_rows":
        m[:, 0] = False
    return m.to(device)


def _windows(K: int) -> list[int]:
    return sorted({1, max(1, K // 3), max(1, K - 1), K, K + 5})


def _check(bias, mask, window, rows, chunk=None):
    want = sel.selected_lists(bias, mask, window, rows).squeeze(2)
    got = topk.select_lists(bias, mask, window, *rows, chunk=chunk)
    assert got.dtype == torch.int32 and got.is_contiguous() and got.shape == want.shape
    assert torch.equal(got, want), (window, (got != want).nonzero()[:5].tolist())


# (K, bias shape, values, key stride, mask shape or None, mask kind, selection rows (B_s, H_s))
CASES = [
    (1, (1, 1, 1, 1), "random", 1, None, None, (1, 1)),
    (63, (1, 2, 1, 63), "ties", 1, (1, 4, 1, 63), "random", (1, 4)),
    (64, (1, 2, 1, 64), "random", 3, None, None, (2, 2)),
    (65, (2, 1, 1, 65), "ties", 1, (1, 1, 1, 65), "few", (2, 2)),
    (577, (1, 2, 1, 577), "ties", 2, (2, 2, 1, 577), "empty_rows", (2, 2)),
    (3001, (1, 2, 1, 3001), "random", 1, None, None, (1, 2)),
]


def _case_id(c):
    K, bshape, values, stride, mshape, mkind, rows = c
    strided = "-strided" if stride > 1 else ""
    return f"K{K}-bias{bshape[0]}x{bshape[1]}-{values}{strided}-mask{mkind}-rows{rows[0]}x{rows[1]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_row_kernel_matches_torch_lists(case, dtype, device):
    K, bshape, values, stride, mshape, mkind, rows = case
    bias = _bias(bshape, dtype, values, seed=K, device=device, key_stride=stride)
    mask = None if mshape is None else _mask(mshape, mkind, seed=K + 1, device=device)
    for w in _windows(K):
        _check(bias, mask, w, rows, chunk=None if device == "cpu" else 1 << 20)


# Chunked plan: C = 2 (last chunk holds one key), 5 and 10 (more chunks than one load of CB).
CHUNKED = [
    (65, 64, (1, 1, 1, 65), "ties", None, None, (1, 1), (1, 21, 70)),
    (577, 128, (1, 2, 1, 577), "ties", (1, 1, 1, 577), "empty_rows", (1, 2), (192, 576)),
    (577, 64, (1, 1, 1, 577), "random", (1, 1, 1, 577), "few", (1, 1), (20, 576)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CHUNKED, ids=lambda c: f"K{c[0]}-chunk{c[1]}-{c[3]}-mask{c[5]}")
def test_chunk_kernels_match_torch_lists(case, dtype, device):
    K, chunk, bshape, values, mshape, mkind, rows, windows = case
    bias = _bias(bshape, dtype, values, seed=K + chunk, device=device)
    mask = None if mshape is None else _mask(mshape, mkind, seed=K, device=device)
    for w in windows:
        _check(bias, mask, w, rows, chunk=chunk)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU sizes; too slow for the interpreter")
@pytest.mark.parametrize("shape, window", [((1, 8, 1, 32768), 2048), ((1, 8, 1, 131072), 2048),
                                           ((4, 2, 1, 8192), 1024), ((16, 64, 1, 4096), 512)], ids=str)
@pytest.mark.parametrize("values", ["random", "ties"])
def test_default_plan_on_gpu_sizes(shape, window, values):
    bias = _bias(shape, torch.bfloat16, values, seed=window, device="cuda")
    mask = _mask((1, shape[1], 1, shape[3]), "random", seed=1, device="cuda")
    for m in (None, mask):
        _check(bias, m, window, (shape[0], shape[1]))


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_earlier_key(device):
    """Exact expectations, both plans: equal values (and -0.0 == +0.0) are taken left to right."""
    bias = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, -0.0, 0.0, float("-inf"), 1.0] * 8, device=device)
    bias = bias.to(torch.bfloat16).view(1, 1, 1, -1)
    K = bias.shape[-1]
    for chunk in (None, 64):
        got = topk.select_lists(bias, None, 18, 1, 1, chunk=chunk)[0, 0].tolist()
        twos = [j for j in range(K) if j % 9 in (1, 3)]  # all 16 keys valued 2
        ones = [j for j in range(K) if j % 9 in (0, 2, 4, 8)]  # the first two ones follow
        assert got == sorted(twos + ones[:2])
        got = topk.select_lists(bias, None, K - 9, 1, 1, chunk=chunk)[0, 0].tolist()
        # every key but the 8 -inf ones and the last of the 16 zeros (-0.0 and +0.0 alike)
        assert got == [j for j in range(K) if j % 9 != 7 and j != 6 + 9 * 7]


@pytest.mark.parametrize("device", DEVICES)
def test_too_few_candidates_pad_with_sentinel(device):
    bias = torch.randn(1, 2, 1, 100, dtype=torch.float16, device=device)
    mask = torch.zeros(1, 2, 1, 100, dtype=torch.bool, device=device)
    mask[0, 1, 0, [3, 50, 99]] = True
    for chunk in (None, 64):
        got = topk.select_lists(bias, mask, 10, 1, 2, chunk=chunk)
        assert got[0, 0].tolist() == [100] * 10
        assert got[0, 1].tolist() == [3, 50, 99] + [100] * 7


@pytest.mark.parametrize("device", DEVICES)
def test_selection_and_topk_indices_use_the_kernel(device, monkeypatch):
    """make_selection's LIST path and the backend's topk_indices go through the kernel for
    16/32-bit floats; float64 keeps the torch path."""
    bias = _bias((2, 2, 1, 70), torch.float16, "ties", seed=3, device=device)
    mask = _mask((1, 2, 1, 70), "random", seed=4, device=device)
    want = reference.topk_indices(bias.cpu(), 9, mask.cpu())
    got = dmattn.topk_indices(bias, 9, mask, backend="triton")
    assert torch.equal(got.cpu(), want)

    def unused(*args, **kwargs):
        raise AssertionError("torch path taken")

    monkeypatch.setattr(sel, "selected_lists", unused)
    s = sel.make_selection(bias, mask, window=9, K=70, Q=5, scope="global", is_causal=True)
    assert s.path == sel.LIST
    want[want < 0] = 70
    assert torch.equal(s.idx.long().cpu(), want.squeeze(2))
    with pytest.raises(AssertionError, match="torch path"):
        sel.make_selection(bias.double(), mask, window=9, K=70, Q=5, scope="global", is_causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_must_be_a_power_of_two(device):
    bias = torch.randn(1, 1, 1, 300, device=device)
    with pytest.raises(ValueError, match="chunk"):
        topk.select_lists(bias, None, 5, 1, 1, chunk=96)
