#!/usr/bin/env bash
# session 8, run G (2x H200): NCCL user-buffer registration for one op per tensor
set -u
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > $OUT/env.txt 2>&1
for i in 1 2; do
  echo "== default env, run $i" >> $OUT/registered.txt
  timeout 100 python3 benchmarks/nccl_registered.py --reps 20 >> $OUT/registered.txt 2>&1; echo "exit $?" >> $OUT/registered.txt
  echo "== NCCL_LEGACY_CUDA_REGISTER=1, run $i" >> $OUT/registered.txt
  NCCL_LEGACY_CUDA_REGISTER=1 timeout 100 python3 benchmarks/nccl_registered.py --reps 20 >> $OUT/registered.txt 2>&1; echo "exit $?" >> $OUT/registered.txt
done
echo "== NCCL_DEBUG=INFO REG, default env" >> $OUT/debug.txt
NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=REG,INIT timeout 100 python3 benchmarks/nccl_registered.py --reps 3 >> $OUT/debug.txt 2>&1
grep -v "^\[W" $OUT/registered.txt | tail -60
grep -i "reg" $OUT/debug.txt | head -30
