#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | cut -c1-300 | head
for i in 1 2; do
  timeout 120 python3 benchmarks/first_batch.py --backends ipc,nccl,pynccl,gloo,nccl --json $OUT/first_$i.json > $OUT/first_$i.txt 2>&1; echo "first $i exit $?"; cat $OUT/first_$i.txt | grep -v Warn | tail -6
done
timeout 200 python3 -m aeplb.bench --workloads eplb,many-small --backends "ipc,ipc:timeout=30,nccl,nccl:timeout=30,pynccl,pynccl:timeout=30" --reps 20 --json $OUT/bench.json > $OUT/bench.txt 2>&1; echo "bench exit $?"
grep "^eplb\|^many" $OUT/bench.txt | cut -c1-150
