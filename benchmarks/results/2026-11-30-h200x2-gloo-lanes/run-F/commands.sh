#!/usr/bin/env bash
# run F: gloo lanes wait for copies on blocking-sync events; the GPU suite; gloo bench
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
V="gloo,gloo:stripes=4,gloo"
python3 -m aeplb.bench --workloads eplb,many-small --backends "$V" --reps 20 --json $OUT/gloo.json > $OUT/gloo.txt 2>&1; echo "gloo exit $?"
grep "^eplb\|^many-small\|^idle\|^gc" $OUT/gloo.txt | cut -c1-150
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)|STALL gloo" $OUT/gpu_tests.log | cut -c1-300 | head
