#!/usr/bin/env bash
# session 8, run E (2x H200, lent late in the session): the final code: GPU suite, every backend
# in the bench, the CUDA demo
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > $OUT/env.txt 2>&1
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.txt 2>&1; echo "gpu tests exit $?"
tail -2 $OUT/gpu_tests.txt
timeout 260 python3 -m aeplb.bench --workloads eplb,many-small --backends ipc,nccl,pynccl,gloo --reps 10 --json $OUT/bench.json > $OUT/bench.txt 2>&1; echo "bench exit $?"
grep "^eplb\|^many\|^idle\|^phases" $OUT/bench.txt | cut -c1-150
timeout 70 python3 examples/serve_while_rebalancing.py --device cuda --duration 6 --rounds 3 > $OUT/demo_cuda.txt 2>&1; echo "demo cuda exit $?"
tail -2 $OUT/demo_cuda.txt
