#!/usr/bin/env bash
# run A: GPU suite + bench (eplb, many-small) + bench with gc-freeze & 0.5 ms switch interval
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch,numpy; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "numpy", numpy.__version__)'; nproc; } > $OUT/env.txt 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -2 $OUT/gpu_tests.log
B=ipc,ipc:check_peers=0,nccl,pynccl:check_peers=0
python3 -m aeplb.bench --workloads eplb,many-small --backends $B,gloo --reps 10 --json $OUT/bench.json > $OUT/bench.log 2>&1
echo "bench exit $?" | tee -a $OUT/env.txt; grep -v '^  \.\.' $OUT/bench.log | tail -25
python3 -m aeplb.bench --workloads eplb,many-small --backends $B --reps 10 --no-baselines --gc-freeze --switch-interval 0.5 --json $OUT/bench_tuned.json > $OUT/bench_tuned.log 2>&1
echo "bench tuned exit $?" | tee -a $OUT/env.txt; grep -v '^  \.\.' $OUT/bench_tuned.log | tail -22
