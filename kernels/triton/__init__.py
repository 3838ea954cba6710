"""Triton kernels of dmattn (installed as ``dmattn.kernels.triton``): ``selection`` builds the
compact selection metadata with torch ops; ``attention`` holds the kernels and host wrappers."""
