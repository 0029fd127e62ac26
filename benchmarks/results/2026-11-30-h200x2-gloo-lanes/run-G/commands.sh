#!/usr/bin/env bash
# run G: where an nccl EPLB batch's time goes with the new cut (2 x 336 MiB, one slot per stream)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
for b in nccl nccl:check_peers=0 nccl:chunk_bytes=352321536:staging_bytes=1476395008 nccl:coalesce=0; do
  f=$(echo $b | tr ':=' '__')
  python3 benchmarks/trace_batch.py --backend $b --reps 20 > $OUT/trace_$f.txt 2>&1; echo "trace $b exit $?"
  grep "median\|^span" $OUT/trace_$f.txt | cut -c1-200
done
python3 benchmarks/host_profile.py --backend nccl --workload eplb --reps 30 --top 30 > $OUT/profile_nccl_eplb.txt 2>&1; echo "profile exit $?"
head -60 $OUT/profile_nccl_eplb.txt | cut -c1-160
