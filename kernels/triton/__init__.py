"""Triton kernels of dmattn (installed as ``dmattn.kernels.triton``): ``selection`` builds the
compact selection metadata with torch ops, and its LIST path with the radix select of ``topk``;
``attention`` holds the kernels and host wrappers."""
