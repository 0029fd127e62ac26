#!/usr/bin/env bash
# run I: packing during the manifest wait (HEAD) against the packer of ccdd02b, alternated; nccl GPU tests
# (.gpurun/old/aeplb was `git archive ccdd02b aeplb`, the packer before this change)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT (before: ccdd02b)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
B="--workloads eplb,many-small --backends nccl,pynccl --reps 20"
for i in 1 2; do
  (cd .gpurun/old && PYTHONPATH=/tmp/site python3 -m aeplb.bench $B --json $OUT/before_$i.json > $OUT/before_$i.txt 2>&1); echo "before $i exit $?"
  grep "^eplb\|^many" $OUT/before_$i.txt | cut -c1-140
  python3 -m aeplb.bench $B --json $OUT/after_$i.json > $OUT/after_$i.txt 2>&1; echo "after $i exit $?"
  grep "^eplb\|^many" $OUT/after_$i.txt | cut -c1-140
done
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests -x -k "nccl or pynccl" > $OUT/gpu_tests_nccl.log 2>&1
echo "gpu tests (nccl) exit $?" | tee -a $OUT/env.txt; tail -1 $OUT/gpu_tests_nccl.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests_nccl.log | cut -c1-300 | head
