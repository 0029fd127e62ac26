#!/usr/bin/env bash
# run C: nccl chunk size against staging slots per lane (eplb: packed; sweep 2 GiB: in place)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
V="nccl,nccl:chunk_bytes=352321536,nccl:chunk_bytes=536870912,nccl:chunk_bytes=1073741824:staging_bytes=2147483648"
for i in 1 2; do
  python3 -m aeplb.bench --workloads eplb,sweep --sweep-mb 2048 --reps 20 --no-baselines --backends "$V" --json $OUT/nccl_chunks_$i.json > $OUT/nccl_chunks_$i.txt 2>&1; echo "nccl chunks $i exit $?"
  grep "^eplb\|^sweep" $OUT/nccl_chunks_$i.txt | cut -c1-150
done
python3 -m aeplb.bench --workloads eplb,many-small --backends gloo --reps 10 --json $OUT/gloo.json > $OUT/gloo.txt 2>&1; echo "gloo exit $?"
grep "^eplb  *gloo\|^many-small  *gloo\|^idle" $OUT/gloo.txt | cut -c1-150
