#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $OUT/env.txt 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -2 $OUT/gpu_tests.log
python3 benchmarks/trace_batch.py --backend nccl --reps 5 > $OUT/trace_nccl.txt 2>&1; echo "trace exit $?" | tee -a $OUT/env.txt; tail -2 $OUT/trace_nccl.txt | cut -c1-200
python3 benchmarks/host_profile.py --backend ipc --workload eplb --reps 10 --top 15 > $OUT/profile_ipc_eplb.txt 2>&1; echo "profile exit $?" | tee -a $OUT/env.txt; head -1 $OUT/profile_ipc_eplb.txt
