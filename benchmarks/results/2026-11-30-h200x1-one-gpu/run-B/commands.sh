#!/usr/bin/env bash
# session 8, run B (one H200): queue cost per op (CPU and CUDA tensors, gc on/off/frozen),
# new vs 752bd99; host profiles of an ipc many-small batch; bench with --gc-freeze, new vs old
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > $OUT/env.txt 2>&1
OLD=$PWD/.gpurun/old
for i in 1 2; do
  for who in new old; do
    if [ $who = new ]; then lib=$PWD; else lib=$OLD; fi
    for dev in cpu cuda; do
      echo "== queue $who $i $dev" >> $OUT/queue.txt
      PYTHONPATH=/tmp/site:$lib python3 benchmarks/queue_cost.py --device $dev --reps 300 >> $OUT/queue.txt 2>&1
      PYTHONPATH=/tmp/site:$lib python3 .gpurun/q2.py $dev >> $OUT/queue.txt 2>&1
    done
  done
done
cat $OUT/queue.txt
export PYTHONPATH=/tmp/site:$PWD
for t in worker caller; do
  timeout 90 python3 benchmarks/host_profile.py --backend ipc --workload many-small --reps 30 --thread $t --top 30 > $OUT/profile_ipc_many_small_$t.txt 2>&1; echo "profile $t exit $?"
  head -45 $OUT/profile_ipc_many_small_$t.txt | cut -c1-140
done
for i in 1 2; do
  for who in new old; do
    if [ $who = new ]; then d=$PWD; else d=$OLD; fi
    echo "== bench gc-freeze $who $i" >> $OUT/bench.txt
    (cd $d && PYTHONPATH=/tmp/site:$d timeout 100 python3 -m aeplb.bench --ranks 2 --workloads many-small,eplb --backends ipc --reps 10 --gc-freeze $( [ $who = new ] && echo --json $OUT/bench_${who}_$i.json )) >> $OUT/bench.txt 2>&1
  done
done
grep "^==\|^eplb\|^many\|^idle\|^phases\|^gc" $OUT/bench.txt | cut -c1-170
