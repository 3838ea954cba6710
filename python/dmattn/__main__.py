"""``python -m dmattn``: what is built, what is available on this machine, and why not."""

from __future__ import annotations

import platform

import torch

import dmattn
from dmattn.backends import BACKENDS
from dmattn.problem import make_problem


def _probe_problem(device: str, dtype: torch.dtype):
    """A typical windowed call (GQA, causal, query-broadcast bias, global top-k scope, which every
    GPU backend implements: the visible scope is a feature ``dmattn.explain`` reports per call) on
    ``device``, as sizes only."""
    q = torch.zeros((), dtype=dtype, device=device).expand(1, 128, 8, 128)
    k = torch.zeros((), dtype=dtype, device=device).expand(1, 128, 2, 128)
    bias = torch.zeros((), dtype=dtype, device=device).expand(1, 2, 1, 128)
    return make_problem(q, k, k, bias, window=64, is_causal=True, topk_scope="global")


def report() -> str:
    lines = [f"dmattn {dmattn.__version__}  torch {torch.__version__}  python {platform.python_version()}"]
    try:
        from dmattn import _C
        info = _C.info()
        lines.append("cpu module: built (" + ", ".join(f"{k}={v}" for k, v in info.items()) + ")")
    except ImportError as exc:
        lines.append(f"cpu module: not importable ({exc})")
    from dmattn import cuda_ext
    lines.append("cuda module: " + (f"built ({cuda_ext.info()})" if cuda_ext.available() else cuda_ext.LOAD_ERROR))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        lines.append(f"cuda device: {torch.cuda.get_device_name()}")
    else:
        lines.append("cuda device: none")
    lines.append("backends (priority order), for a bf16/fp32 windowed causal GQA call with D=128 "
                 "(global top-k scope):")
    for name, b in BACKENDS.items():
        for device in devices:
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            why = b.reasons(_probe_problem(device, dtype))
            state = "available" if not why else "; ".join(why)
            auto = "" if device in b.auto_devices else " (by name only)"
            lines.append(f"  {name:<10} {device:<5} {state}{auto}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
