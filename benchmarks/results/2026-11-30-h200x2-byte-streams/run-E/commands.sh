#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $OUT/env.txt 2>&1
python3 -m aeplb.bench --workloads many-small,eplb --backends nccl,pynccl --reps 20 --no-baselines --json $OUT/bench_C.json > $OUT/bench_C.txt 2>&1; echo "bench C exit $?" | tee -a $OUT/env.txt; grep "^eplb\|^many" $OUT/bench_C.txt | cut -c1-150
python3 -m aeplb.bench --workloads many-small,eplb --backends gloo,nccl --reps 20 --no-baselines --json $OUT/bench_D.json > $OUT/bench_D.txt 2>&1; echo "bench D exit $?" | tee -a $OUT/env.txt; grep "^eplb\|^many" $OUT/bench_D.txt | cut -c1-150
