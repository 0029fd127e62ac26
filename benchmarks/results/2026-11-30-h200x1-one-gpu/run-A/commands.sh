#!/usr/bin/env bash
# session 8, run A (one H200): GPU suite with two ranks sharing the GPU where backends allow;
# queue fast path A/B against 752bd99; ipc host profile
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > $OUT/env.txt 2>&1
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.txt 2>&1; echo "gpu tests exit $?"
tail -3 $OUT/gpu_tests.txt
for i in 1 2; do
  for who in new old; do
    if [ $who = new ]; then d=$PWD; else d=$PWD/.gpurun/old; fi
    echo "== queue_cost $who" >> $OUT/queue_cost.txt
    (cd $d && PYTHONPATH=/tmp/site:$d python3 benchmarks/queue_cost.py --reps 200) >> $OUT/queue_cost.txt 2>&1
    echo "== bench $who $i" >> $OUT/bench.txt
    (cd $d && PYTHONPATH=/tmp/site:$d timeout 100 python3 -m aeplb.bench --ranks 2 --workloads eplb,many-small --backends ipc,gloo --reps 10 --json $OUT/bench_${who}_$i.json) >> $OUT/bench.txt 2>&1
  done
done
cat $OUT/queue_cost.txt
grep "^==\|^eplb\|^many\|^idle\|^phases" $OUT/bench.txt | cut -c1-160
timeout 90 python3 benchmarks/host_profile.py --backend ipc --workload many-small --reps 20 --top 30 > $OUT/host_profile_ipc_many_small.txt 2>&1; echo "profile exit $?"
head -60 $OUT/host_profile_ipc_many_small.txt | cut -c1-150
