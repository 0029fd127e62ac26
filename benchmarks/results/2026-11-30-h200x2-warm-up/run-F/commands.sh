#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
timeout 280 python3 -m aeplb.bench --workloads eplb,many-small --backends ipc,nccl,pynccl,gloo --reps 10 --json $OUT/bench.json > $OUT/bench.txt 2>&1; echo "bench exit $?"
grep "^eplb\|^many\|^idle" $OUT/bench.txt | cut -c1-150
