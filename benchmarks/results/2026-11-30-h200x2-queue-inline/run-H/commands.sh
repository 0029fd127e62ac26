#!/usr/bin/env bash
# session 8, run H (2x H200): manifests through shared memory: GPU suite, bench new against
# the code before (3cddc71)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > $OUT/env.txt 2>&1
AEPLB_REQUIRE_GPU=1 PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.txt 2>&1; echo "gpu tests exit $?"
tail -2 $OUT/gpu_tests.txt
OLD=$PWD/.gpurun/old
for i in 1 2; do
  for who in new old; do
    if [ $who = new ]; then d=$PWD; else d=$OLD; fi
    echo "== bench $who $i" >> $OUT/bench.txt
    (cd $d && PYTHONPATH=/tmp/site:$d timeout 80 python3 -m aeplb.bench --workloads eplb,many-small --backends nccl,pynccl --reps 10 --no-baselines $( [ $i = 1 ] && echo --json $OUT/bench_${who}.json )) >> $OUT/bench.txt 2>&1
  done
done
grep "^==\|^eplb\|^many\|^idle" $OUT/bench.txt | cut -c1-150
