#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $OUT/env.txt 2>&1
for spec in "nccl many-small" "ipc many-small" "nccl eplb"; do set -- $spec
  python3 benchmarks/host_profile.py --backend $1 --workload $2 --reps 20 --top 30 > $OUT/profile_$1_$2.txt 2>&1; echo "profile $1 $2 exit $?" | tee -a $OUT/env.txt; done
sed -n 1,30p $OUT/profile_nccl_many-small.txt | cut -c1-150
python3 -m aeplb.bench --workloads eplb,many-small --backends ipc,ipc:check_peers=0,nccl,pynccl:check_peers=0 --reps 10 --warmup 3 --gc-freeze --json $OUT/bench_gcfreeze.json > $OUT/bench_gcfreeze.log 2>&1
echo "bench exit $?" | tee -a $OUT/env.txt; grep -v '^  \.\.' $OUT/bench_gcfreeze.log | head -24
