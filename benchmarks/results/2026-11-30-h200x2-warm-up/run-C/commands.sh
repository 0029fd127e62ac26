#!/usr/bin/env bash
set -u
# (.gpurun/old/aeplb was `git archive 9ff14cc aeplb`, the unpacking before this change)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT (before: 9ff14cc)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests -k "packing_paths" > $OUT/gpu_tests_packing.log 2>&1
echo "packing tests exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests_packing.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests_packing.log | cut -c1-300 | head
B="--workloads many-small,eplb --backends nccl,pynccl --reps 20"
for i in 1 2; do
  (cd .gpurun/old && PYTHONPATH=/tmp/site python3 -m aeplb.bench $B --json $OUT/before_$i.json > $OUT/before_$i.txt 2>&1); echo "before $i exit $?"
  grep "^eplb\|^many" $OUT/before_$i.txt | cut -c1-140
  python3 -m aeplb.bench $B --json $OUT/after_$i.json > $OUT/after_$i.txt 2>&1; echo "after $i exit $?"
  grep "^eplb\|^many" $OUT/after_$i.txt | cut -c1-140
done
python3 examples/serve_while_rebalancing.py --device cuda --duration 6 --rounds 3 > $OUT/demo.txt 2>&1; echo "demo exit $?"; tail -4 $OUT/demo.txt
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | cut -c1-300 | head
cd $OUT && tar czf runs.tgz before_* after_* && rm before_* after_*
