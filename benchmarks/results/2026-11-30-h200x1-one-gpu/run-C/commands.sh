#!/usr/bin/env bash
# session 8, run C (one H200): the CUDA demo with two ranks on one GPU; where an ipc batch's
# worker time goes (timers around the transport's steps)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > $OUT/env.txt 2>&1
timeout 120 python3 examples/serve_while_rebalancing.py --device cuda --duration 6 --rounds 3 > $OUT/demo_cuda.txt 2>&1; echo "demo cuda exit $?"
tail -8 $OUT/demo_cuda.txt
timeout 120 python3 examples/serve_while_rebalancing.py --duration 6 --rounds 3 > $OUT/demo_cpu.txt 2>&1; echo "demo cpu exit $?"
tail -3 $OUT/demo_cpu.txt
for w in many-small eplb many-small eplb; do
  timeout 90 python3 .gpurun/instr.py --workload $w >> $OUT/instr.txt 2>&1; echo "instr $w exit $?"
done
cat $OUT/instr.txt
