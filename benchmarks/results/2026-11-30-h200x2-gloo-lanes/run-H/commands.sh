#!/usr/bin/env bash
# run H: packing before the manifest wait and ahead of unpacks; GPU suite, bench, one nccl timeline
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests -x -k "nccl or pynccl" > $OUT/gpu_tests_nccl.log 2>&1
echo "gpu tests (nccl) exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests_nccl.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests_nccl.log | cut -c1-300 | head
python3 -m aeplb.bench --workloads eplb,many-small,sweep --sweep-mb 256,2048 --backends "ipc,nccl,pynccl,nccl:staging_bytes=1476395008" --reps 20 --json $OUT/bench.json > $OUT/bench.txt 2>&1; echo "bench exit $?" | tee -a $OUT/env.txt
grep "^eplb\|^many\|^idle\|^sweep" $OUT/bench.txt | cut -c1-150
python3 benchmarks/trace_batch.py --backend nccl --reps 20 > $OUT/trace_nccl.txt 2>&1; echo "trace exit $?"
grep "median" $OUT/trace_nccl.txt
grep "^stream" $OUT/trace_nccl.txt | awk '{print $2, $3, $5, $7}' | awk 'BEGIN{p=""} {k=$1" "$4; if (k!=p) {print; p=k}}' | head -16
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests -k "not (nccl or pynccl)" > $OUT/gpu_tests_rest.log 2>&1
echo "gpu tests (rest) exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests_rest.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests_rest.log | cut -c1-300 | head
