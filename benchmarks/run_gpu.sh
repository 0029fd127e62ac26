#!/usr/bin/env bash
# One pass on a GPU machine: the GPU tests, then the benchmark, logs and JSON into $1.
#   bash benchmarks/run_gpu.sh OUTDIR [pytest -k expression] [bench backends]
# Needs torch with CUDA, anyio, trio, pytest, pytest-asyncio, pytest-timeout.
set -u
out=${1:?output directory}
select=${2:-}
backends=${3:-ipc,nccl,pynccl,gloo}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} AEPLB_REQUIRE_GPU=1
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version())'
  nvidia-smi topo -m | head -4
} >"$out/env.txt" 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=300 ${select:+-k "$select"} \
  --junitxml="$out/junit.xml" -rA tests >"$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $?" | tee -a "$out/env.txt"
tail -3 "$out/gpu_tests.log"
python3 -m aeplb.bench --reps 8 --warmup 2 --sweep-mb 4,64,256,2048 --backends "$backends" \
  --json "$out/bench.json" --plot "$out/bench.png" >"$out/bench.log" 2>&1
echo "bench: exit $?" | tee -a "$out/env.txt"
grep -v '^  \.\.' "$out/bench.log" | tail -30
