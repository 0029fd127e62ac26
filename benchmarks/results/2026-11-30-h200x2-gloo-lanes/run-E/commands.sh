#!/usr/bin/env bash
# run E: where gloo's stall comes from: stripes (lane threads) and the GIL switch interval
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
V="gloo,gloo:stripes=2,gloo:stripes=4,gloo"
python3 -m aeplb.bench --workloads eplb,many-small --no-baselines --backends "$V" --reps 20 --json $OUT/gloo_stripes.json > $OUT/gloo_stripes.txt 2>&1; echo "stripes exit $?"
grep "^eplb\|^many-small\|^idle\|^gc" $OUT/gloo_stripes.txt | cut -c1-150
python3 -m aeplb.bench --workloads eplb,many-small --no-baselines --backends "$V" --reps 20 --switch-interval 0.5 --json $OUT/gloo_switch.json > $OUT/gloo_switch.txt 2>&1; echo "switch exit $?"
grep "^eplb\|^many-small\|^idle\|^gc" $OUT/gloo_switch.txt | cut -c1-150
