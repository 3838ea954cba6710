#!/usr/bin/env bash
# Tile sweep of the CUDA kernels for one head dim, on a GPU machine with nvcc, cmake, ninja and
# nanobind (the device image has them; carry the nvidia-cutlass wheel for the CuTe headers).
#
#   benchmarks/cuda_tile_sweep.sh OUT_DIR NAME:FWD_M,FWD_N,FWD_WARPS:DQ_M,DQ_N,DKDV_N,DKDV_M,BWD_WARPS ...
#   e.g. benchmarks/cuda_tile_sweep.sh $OUT now:128,32,4:64,32,64,32,4 fwd64:128,64,4:64,32,64,32,4
#
# For each candidate: builds only the _cuda module (kernels/cuda/tiles.h's DMATTN_SWEEP_* definitions,
# head dim SWEEP_D (default 128), sm_90 machine code: not sm_90a, so the forward timed is the sm_80
# kernel the visible scope, per-query calls and D = 32/96/256 use, not the wgmma one that global-scope
# calls at D = 64/128 take on an H100/H200) into its own build folder (about 40 s on 2 cores), lays it over the
# installed dmattn (Python from this checkout, the CPU module from the installed wheel), checks it
# against the float64 reference (tests/test_cuda_fwd.py and tests/test_cuda_bwd.py at that head
# dim), then times it with benchmarks/cuda_fwd.py and benchmarks/cuda_bwd.py (T32k-like, JSON per
# candidate in OUT_DIR). A candidate the kernels cannot take stops at its compile step, reported.
set -uo pipefail
OUT=$1; shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
D=${SWEEP_D:-128}
BUILD=${SWEEP_BUILD:-/tmp/dmattn-sweep}
SP=$(cd /tmp && python3 -c "import os, dmattn; print(os.path.dirname(dmattn.__file__))")
mkdir -p "$OUT" "$BUILD"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
for spec in "$@"; do
  IFS=: read -r name fwd bwd <<< "$spec"
  IFS=, read -r fm fn fw <<< "$fwd"
  IFS=, read -r qm qn kn km bw <<< "$bwd"
  flags="-DDMATTN_SWEEP_D=$D -DDMATTN_SWEEP_FWD_M=$fm -DDMATTN_SWEEP_FWD_N=$fn -DDMATTN_SWEEP_FWD_WARPS=$fw"
  flags+=" -DDMATTN_SWEEP_DQ_M=$qm -DDMATTN_SWEEP_DQ_N=$qn -DDMATTN_SWEEP_DKDV_N=$kn -DDMATTN_SWEEP_DKDV_M=$km"
  flags+=" -DDMATTN_SWEEP_BWD_WARPS=$bw"
  echo "== $name: $flags"
  b="$BUILD/$name"
  if ! { cmake -S "$REPO" -B "$b" -G Ninja -DDMATTN_CUDA=ON -DDMATTN_CUDA_HEADDIMS="$D" \
           -DDMATTN_CUDA_ARCHS=90-real -DDMATTN_NVCC_THREADS=4 -DCMAKE_CUDA_FLAGS="$flags" \
         && ninja -C "$b" _cuda; } > "$OUT/sweep-$name-build.log" 2>&1; then
    echo "$name: build failed (see sweep-$name-build.log)"; grep -m3 -E "error|static assert" "$OUT/sweep-$name-build.log"
    continue
  fi
  o="$b/overlay"
  rm -rf "$o"; mkdir -p "$o/dmattn/kernels"
  cp -r "$REPO/python/dmattn/." "$o/dmattn/"; cp -r "$REPO/kernels/triton" "$o/dmattn/kernels/"
  cp "$SP"/_C*.so "$o/dmattn/"; cp "$(find "$b" -name '_cuda*.so' | head -1)" "$o/dmattn/"
  (cd /tmp && PYTHONPATH="$o" timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
     "$REPO/tests/test_cuda_fwd.py" "$REPO/tests/test_cuda_bwd.py" -k "head_dims and $D" 2>&1 | tail -1)
  (cd "$REPO/benchmarks" && PYTHONPATH="$o" python3 cuda_fwd.py --seq 32768 8192 --dense-seq 0 \
     --head-dim "$D" --json "$OUT/sweep-$name-fwd.json" 2>&1 | grep -E "cuda|triton" | head -8)
  (cd "$REPO/benchmarks" && PYTHONPATH="$o" python3 cuda_bwd.py --head-dim "$D" \
     --json "$OUT/sweep-$name-bwd.json" 2>&1 | grep -E "cuda|triton" | head -8)
done
