#!/usr/bin/env bash
# One call on a GPU machine: build the extension with its CUDA kernels, run the CUDA tests, run the
# kernel and compression benchmarks; JSON and logs under $OUT (default ./gpu-out). Sized for < 8 minutes
# on one H200. Uses the machine's python3 (with a CUDA torch); extra wheels in .whl/ are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DELTACOMP_CUDA_KERNELS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; python3 -c \
  "import torch; print('torch', torch.__version__, torch.version.cuda)"; } 2>&1 | tee "$OUT/device.txt"
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 DELTACOMP_REQUIRE_EXT=1 \
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py tests/test_cuda_serving.py tests/test_cuda_compress.py ${GPU_EXTRA_TESTS:-} \
  -rf --tb=short --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -45
echo "tests: $(( $(date +%s) - t0 )) s"
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/kernels_cuda.py --out "$OUT/kernels_cuda.json" ${KERNEL_ARGS:-} \
  2>&1 | tee "$OUT/kernels.log" | tail -40
echo "kernels: $(( $(date +%s) - t0 )) s"
# svd-mixed and lowrank at 16x on three 7B-width tensors on the GPU; the same command with --device cpu
# on the development machine gives the CPU side (benchmarks/results/compress_speed_cpu_1thread.json)
COMPRESS_ARGS=${COMPRESS_ARGS:---device cuda --methods svd-mixed,lowrank --tensors q_proj,gate_proj,down_proj}
timeout ${COMPRESS_TIMEOUT:-150} python3 benchmarks/compress_speed.py $COMPRESS_ARGS --out "$OUT/compress_cuda.json" \
  2>&1 | tee "$OUT/compress.log" | tail -15
echo "total: $(( $(date +%s) - t0 )) s"
