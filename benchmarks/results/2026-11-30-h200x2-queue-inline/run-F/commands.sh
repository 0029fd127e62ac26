#!/usr/bin/env bash
# session 8, run F (2x H200): many-small, new (ab4fbfc) against old (752bd99), alternated
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > $OUT/env.txt 2>&1
OLD=$PWD/.gpurun/old
for i in 1 2; do
  for who in new old; do
    if [ $who = new ]; then d=$PWD; else d=$OLD; fi
    echo "== bench $who $i" >> $OUT/bench.txt
    (cd $d && PYTHONPATH=/tmp/site:$d timeout 110 python3 -m aeplb.bench --workloads many-small --backends ipc,nccl,pynccl --reps 10 --json $OUT/bench_${who}_$i.json) >> $OUT/bench.txt 2>&1
  done
done
grep "^==\|^many\|^idle" $OUT/bench.txt | cut -c1-150
