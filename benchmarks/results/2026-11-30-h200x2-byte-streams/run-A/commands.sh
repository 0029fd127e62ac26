#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $OUT/env.txt 2>&1
python3 benchmarks/host_costs.py > $OUT/host_costs.txt 2>&1; echo "exit $?" >> $OUT/env.txt
cat $OUT/host_costs.txt | grep -v '^{'
