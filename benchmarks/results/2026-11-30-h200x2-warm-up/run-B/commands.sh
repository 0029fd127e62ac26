#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
timeout 100 python3 benchmarks/host_costs.py > $OUT/host_costs.txt 2>&1; echo "host_costs exit $?"; grep -i "unpack\|pack torch" $OUT/host_costs.txt
for i in 1 2; do
  timeout 120 python3 benchmarks/first_batch.py --backends ipc,nccl,pynccl,gloo,nccl:warm_up=0,pynccl:warm_up=0 --json $OUT/first_$i.json > $OUT/first_$i.txt 2>&1; echo "first $i exit $?"; cat $OUT/first_$i.txt | grep -v Warn | tail -6
done
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | cut -c1-300 | head; grep "FIRST" $OUT/gpu_tests.log
