#!/usr/bin/env bash
# run B: gloo lanes per stripe with lazy pieces and a copy lock, against the lanes before this session
# (.gpurun/old_gloo.py was `git show 05e34b7:aeplb/transports/gloo.py`, the lanes before this session)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r aeplb /tmp/old/ && cp .gpurun/old_gloo.py /tmp/old/aeplb/transports/gloo.py
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests -k "gloo" > $OUT/gpu_tests_gloo.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests_gloo.log | cut -c1-300; grep -E "^(FAILED|ERROR)|STALL gloo" $OUT/gpu_tests_gloo.log | cut -c1-200 | head
B="--workloads eplb,many-small --backends gloo --reps 10"
for i in 1 2; do
  (cd /tmp/old && PYTHONPATH=/tmp/site python3 -m aeplb.bench $B --json $OUT/gloo_before_$i.json > $OUT/gloo_before_$i.txt 2>&1); echo "before $i exit $?"
  grep "^eplb  *gloo\|^many-small  *gloo\|^idle" $OUT/gloo_before_$i.txt | cut -c1-150
  python3 -m aeplb.bench $B --json $OUT/gloo_after_$i.json > $OUT/gloo_after_$i.txt 2>&1; echo "after $i exit $?"
  grep "^eplb  *gloo\|^many-small  *gloo\|^idle" $OUT/gloo_after_$i.txt | cut -c1-150
done
python3 -m aeplb.bench --workloads eplb --reps 20 --no-baselines --backends "nccl,nccl:chunk_bytes=352321536:staging_bytes=2147483648,nccl,nccl:chunk_bytes=352321536:staging_bytes=2147483648,nccl:chunk_bytes=352321536:staging_bytes=1073741824" --json $OUT/nccl_chunks.json > $OUT/nccl_chunks.txt 2>&1; echo "nccl chunks exit $?"
grep "^eplb" $OUT/nccl_chunks.txt | cut -c1-150
