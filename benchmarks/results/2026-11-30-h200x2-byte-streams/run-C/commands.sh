#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 AEPLB_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit $COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())'; } > $OUT/env.txt 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=100 -rA tests > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/env.txt; tail -2 $OUT/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | head
python3 benchmarks/host_costs.py > $OUT/host_costs.txt 2>&1; echo "host_costs exit $?" | tee -a $OUT/env.txt; grep "MiB\|eplb" $OUT/host_costs.txt | grep -v '^{'
python3 -m aeplb.bench --workloads many-small,eplb --reps 20 --json $OUT/bench.json > $OUT/bench.txt 2>&1; echo "bench exit $?" | tee -a $OUT/env.txt; grep -v '^  \.\.' $OUT/bench.txt | cut -c1-170 | tail -22
python3 -m aeplb.bench --workloads many-small --backends nccl,pynccl:check_peers=0,ipc --reps 20 --no-baselines --gc-freeze --json $OUT/bench_gcfreeze.json > $OUT/bench_gcfreeze.txt 2>&1; echo "bench gc-freeze exit $?" | tee -a $OUT/env.txt; grep -v '^  \.\.' $OUT/bench_gcfreeze.txt | cut -c1-170 | tail -8
