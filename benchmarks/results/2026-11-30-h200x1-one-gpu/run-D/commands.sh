#!/usr/bin/env bash
# session 8, run D (one H200): the final code: GPU suite with two ranks on one GPU, CUDA demo,
# bench of ipc and gloo
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > $OUT/env.txt 2>&1
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.txt 2>&1; echo "gpu tests exit $?"
tail -2 $OUT/gpu_tests.txt
timeout 120 python3 examples/serve_while_rebalancing.py --device cuda --duration 6 --rounds 3 > $OUT/demo_cuda.txt 2>&1; echo "demo cuda exit $?"
tail -3 $OUT/demo_cuda.txt
timeout 150 python3 -m aeplb.bench --ranks 2 --workloads eplb,many-small --backends ipc,gloo --reps 10 --gc-freeze --json $OUT/bench.json > $OUT/bench.txt 2>&1; echo "bench exit $?"
grep "^eplb\|^many\|^idle\|^phases" $OUT/bench.txt | cut -c1-170
