#!/usr/bin/env bash
# run B: GPU suite, bench (eplb, many-small), host profiles, CUDA demo
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch,numpy; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "numpy", numpy.__version__)'; nproc; } > $OUT/env.txt 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -2 $OUT/gpu_tests.log
python3 -m aeplb.bench --workloads eplb,many-small --backends ipc,ipc:check_peers=0,nccl,pynccl:check_peers=0,gloo --reps 10 --warmup 3 --json $OUT/bench.json > $OUT/bench.log 2>&1
echo "bench exit $?" | tee -a $OUT/env.txt; grep -v '^  \.\.' $OUT/bench.log | head -24
for b in nccl ipc; do python3 benchmarks/host_profile.py --backend $b --workload many-small --reps 20 > $OUT/profile_$b.txt 2>&1; echo "profile $b exit $?" | tee -a $OUT/env.txt; done
grep -A14 "== worker" $OUT/profile_nccl.txt | cut -c1-140
python3 examples/serve_while_rebalancing.py --device cuda --duration 6 --rounds 3 > $OUT/demo_cuda.log 2>&1
echo "demo exit $?" | tee -a $OUT/env.txt; tail -4 $OUT/demo_cuda.log | cut -c1-300
