#!/usr/bin/env bash
set -u
# (.gpurun/old/aeplb was `git archive ee07e29 aeplb`, the queueing before this change)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT (before: ee07e29)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
PYTHONPATH=/tmp/site:$PWD/.gpurun/old:$PWD timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=60 tests -k gloo_device_cuda > $OUT/old_gloo_device_cuda.log 2>&1
echo "the gloo device='cuda' test on ee07e29: exit $? (1 = failed, as expected)"; grep -m3 "InvalidTransferError\|passed\|failed" $OUT/old_gloo_device_cuda.log | cut -c1-250
B="--workloads many-small,eplb --backends ipc,nccl,pynccl --reps 20"
for i in 1 2; do
  (cd .gpurun/old && PYTHONPATH=/tmp/site python3 -m aeplb.bench $B --json $OUT/before_$i.json > $OUT/before_$i.txt 2>&1); echo "before $i exit $?"
  grep "^eplb\|^many" $OUT/before_$i.txt | cut -c1-140
  python3 -m aeplb.bench $B --json $OUT/after_$i.json > $OUT/after_$i.txt 2>&1; echo "after $i exit $?"
  grep "^eplb\|^many" $OUT/after_$i.txt | cut -c1-140
done
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | cut -c1-300 | head
cd $OUT && tar czf runs.tgz before_* after_* && rm before_* after_*
