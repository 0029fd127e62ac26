#!/usr/bin/env bash
# One H200, two ranks sharing it: the GPU suite on the hardening code (the tests that need
# NCCL between two GPUs skip), then `python -m aeplb.bench --ranks 2`, which used to crash in
# the interference workload on one GPU, with every workload. Run from the repository root;
# wheels of pytest-asyncio and trio (and trio's needs) in .whl/; results in $OUT.
set -u
OUT=${OUT:-results}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; echo "commit ${COMMIT:-?}"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; python3 -c 'import torch; print(torch.__version__, torch.cuda.nccl.version(), torch.cuda.device_count())'; } > "$OUT/env.txt" 2>&1
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=60 -rA tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -3; echo "gpu tests exit ${PIPESTATUS[0]}"
timeout 150 python3 -m aeplb.bench --ranks 2 --workloads eplb,many-small,interference --reps 5 --warmup 1 --gc-freeze --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1; echo "bench exit $?"
python3 - "$OUT/bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("failures", d["failures"])
print("left out", sorted({(o["variant"], o["reason"]) for o in d["left_out"]}))
assert not [r for r in d["rows"] if "nccl" in r["variant"]], "an NCCL row ran on a shared GPU"
print("interference rows", [r["variant"] for r in d["rows"] if r["workload"] == "interference"])
PY
# Run B, after mending test_gpu_swap_is_refused_in_band (its expected payload came from the
# CPU generator, the sent one from CUDA's): the hardening GPU tests alone.
# timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=60 -rA tests/test_hardening.py
# Run C, on the final code (a broken gloo communicator closes its groups' connections): the
# whole GPU suite again, output in run-C/.
# timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=60 -rA tests
# Run D, after the review's refactors: the whole GPU suite again, output in run-D/ (paths
# relative to the repository).
# timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=60 -rA tests | sed "s#$PWD/##g"
