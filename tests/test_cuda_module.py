"""The CUDA module: built when nvcc was present; its GPU selection matches the reference."""

from __future__ import annotations

import pytest
import torch

from dmattn import cuda_ext, reference

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_ext.available()),
                               reason="needs a CUDA device and the dmattn._cuda module")


@needs_gpu
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shapes", [
    ((2, 2, 1, 300), None, 17),
    ((1, 2, 5, 64), (2, 4, 1, 64), 9),
    ((1, 1, 1, 40), (1, 1, 3, 40), 100),
    ((2, 8, 1, 4096), None, 512),
], ids=str)
def test_gpu_topk_indices_matches_reference(shapes, bias_dtype):
    bshape, mshape, window = shapes
    g = torch.Generator().manual_seed(0)
    bias = (torch.randint(0, 7, bshape, generator=g) * 0.5).to(bias_dtype)  # many ties
    mask = None if mshape is None else torch.rand(mshape, generator=g) < 0.6
    rows = tuple(max(bshape[d], 1 if mshape is None else mshape[d]) for d in range(3))
    got = cuda_ext.topk_indices(bias.cuda(), None if mask is None else mask.cuda(), window, rows)
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), reference.topk_indices(bias, window, mask), rtol=0, atol=0)


@needs_gpu
def test_gpu_topk_indices_strided_bias():
    bias = torch.randn(2, 3, 1, 128, device="cuda")[:, 1:2].expand(2, 4, 1, 128)
    got = cuda_ext.topk_indices(bias, None, 10, (2, 4, 1))
    torch.testing.assert_close(got.cpu(), reference.topk_indices(bias.cpu(), 10), rtol=0, atol=0)


def test_cuda_module_reports_itself():
    if not cuda_ext.available():
        pytest.skip(f"CUDA module not built here: {cuda_ext.LOAD_ERROR}")
    info = cuda_ext.info()
    assert info["cuda_runtime"] >= 12000 and "90a" in info["archs"]


def test_cuda_backend_does_not_need_triton():
    """The cuda backend's LIST selection is the CUDA select: with triton unimportable, the backend
    still loads (or, without the module, says why without naming Triton)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from dmattn.backends import BACKENDS\n"
        "print(BACKENDS['cuda'].load_error())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if cuda_ext.available():
        assert out == "None", out
    assert "triton" not in out.lower(), out
